"""Checkpoints on disk: tensors in safetensors, everything else in JSON; never pickle. A checkpoint is a folder
``<run>/checkpoints/step-<9 digits>/``, written atomically and verified against its manifest when loaded
(:mod:`fastafd.checkpoint.store` says how).

| module | job |
| --- | --- |
| ``paths`` | the folder's names: ``checkpoints/step-N/`` and its files, the checkpoints of a run newest first |
| ``store`` | writing a checkpoint atomically, verifying its manifest, loading it (:class:`store.Checkpoint`); plain weights (export) |
| ``schema`` | what ``state.json`` must hold for :func:`fastafd.state.restore` |
| ``retain`` | ``best.json`` and pruning to ``checkpoint.keep`` |
| ``choice`` | which checkpoint: ``checkpoint.resume`` (:func:`choice.resolve`), eval and export (:func:`choice.choose`) |
| ``codec`` | optimizer state <-> safetensors + JSON, loading weights into a model, the shape checks of both |
"""
