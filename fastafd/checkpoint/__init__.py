"""Checkpoints on disk: tensors in safetensors, everything else in JSON; never pickle.

A checkpoint is a folder ``<run>/checkpoints/step-<9 digits>/`` holding ``model.safetensors``
(peers, transfer layers, discriminators), ``optim.safetensors`` (optimizer state tensors),
``state.json`` (epoch, step, optimizer hyper-parameters, schedules, loss scale, skip counters,
per-rank RNG states and data-reader positions, the resolved config) and, written last,
``MANIFEST.json`` with the size and SHA-256 of each file.

Writes are atomic: everything goes to a hidden temporary folder, each file is fsynced, the
manifest is written, the folder is renamed into place and the parent folder fsynced. A process
killed mid-write leaves only a temporary folder (``.tmp-step-N-<pid>-<random>``), which is ignored
and removed by the next write once its writer is dead.
Loading verifies the manifest; a corrupt or partial checkpoint is skipped with a warning naming the
bad file, and the previous good one is used.

| module | job |
| --- | --- |
| ``paths`` | the folder's names: ``checkpoints/step-N/`` and its files, the checkpoints of a run newest first |
| ``store`` | writing a checkpoint atomically, verifying its manifest, loading it (:class:`store.Checkpoint`); plain weights (export) |
| ``schema`` | what ``state.json`` must hold for :func:`fastafd.state.restore` |
| ``retain`` | ``best.json`` and pruning to ``checkpoint.keep`` |
| ``choice`` | which checkpoint: ``checkpoint.resume`` (:func:`choice.resolve`), eval and export (:func:`choice.choose`) |
| ``codec`` | optimizer state <-> safetensors + JSON, loading weights into a model, the shape checks of both |
"""
