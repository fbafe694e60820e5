"""Export one trained peer (ONE/CL: one branch with the trunk) as a plain timm state dict (safetensors)."""

from __future__ import annotations

import json
from pathlib import Path

from fastafd.checkpoint import choice, paths, store
from fastafd.errors import UserError
from fastafd.methods import registry
from fastafd.models.peers import build_kwargs
from fastafd.run import outputs, readback, rundir


def export_peer(run: Path, peer: int, out: Path, which: str = "best") -> dict:
    """Write peer ``peer`` of run ``run`` (the checkpoint ``which`` names, see :func:`fastafd.checkpoint.choice.choose`)
    to ``out``; returns a description.

    The file loads with ``timm.create_model(name, num_classes=N, pretrained=True,
    pretrained_cfg_overlay=dict(file=out))``; for a timm model whose default class count differs
    from N (e.g. resnet18 and its 1000 classes) add ``num_classes=N`` to the overlay too, or timm drops
    the classifier.

    ``out`` ending in ``.safetensors`` is the file; anything else a folder for ``peer<K>.safetensors``. It is written
    through :mod:`fastafd.run.outputs`: atomically, and over an existing file only when fastafd wrote it (an earlier export);
    an unwritable place is one line, and no temporary file is left.
    """
    run = Path(run)
    outputs.check_empty(out)
    if Path(out).suffix and Path(out).suffix != ".safetensors" and not Path(out).is_dir():
        raise UserError(f"--out {out} must end in .safetensors (timm picks the loader by extension), or be a folder")
    folder, stem = outputs.resolve(Path(out), Path(out), ".safetensors", f"peer{peer}")
    out = folder / f"{stem}.safetensors"
    writer = outputs.Outputs([out], folder=None)
    if (blocker := folder if folder.exists() and not folder.is_dir() else None) is not None:
        raise UserError(f"--out {blocker} is a file, not a folder: pass a file name ending in .safetensors or a folder")
    writer.check()
    cfg_path = run / rundir.CONFIG_FILE
    if not cfg_path.is_file():
        raise UserError(f"{run} is not a fastafd run directory (no {rundir.CONFIG_FILE}): pass the folder `fastafd train` wrote")
    cfg = readback.read_json(cfg_path)
    try:
        names = readback.strings(cfg["model"], "peers")
        method = readback.string(cfg["method"], "name")
        num_classes = readback.integer(cfg["model"], "num_classes", 0, 10**9)
        image_size = readback.integer(cfg["data"], "image_size", 1, 10**6)
        if not num_classes:
            env = readback.read_json(run / rundir.ENV_FILE)
            num_classes = readback.integer(env["dataset"], "num_classes", 1, 10**9)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{cfg_path} (or {rundir.ENV_FILE} beside it) is not what `fastafd train` wrote ({type(e).__name__}: {e}): "
                        "pass the folder `fastafd train` wrote") from None
    if not 0 <= peer < len(names):
        raise UserError(f"--peer {peer} is out of range: the run has {len(names)} peers (0..{len(names) - 1}: {', '.join(names)})")
    ckpt, why = choice.choose(run, which)
    # the task says what its deployable networks are (peer k; for ONE/CL: the trunk + branch k)
    state = registry.get(method).deployable_state(ckpt.tensors(paths.MODEL), peer)
    name = names[peer]
    extra = build_kwargs(name, image_size)  # a transformer is built for the run's image size
    meta = {"model": name, "num_classes": num_classes, "create_kwargs": extra, "checkpoint": str(ckpt.path), "step": ckpt.step,
            "chosen": why}
    strings = {k: json.dumps(v) if not isinstance(v, str) else v for k, v in meta.items()}  # safetensors metadata: strings
    writer.write(out, lambda tmp: store.save_weights(tmp, state, strings))
    outputs.fix_mode(out)  # a file to share, like any other the user writes (safetensors makes it 0600)
    kwargs = "".join(f", {k}={v!r}" for k, v in extra.items())
    # the CIFAR networks are fastafd's: timm knows them once fastafd is imported
    prefix = "import fastafd; " if name.startswith("cifar_") else ""
    return {
        "file": str(out),
        **meta,
        "load": f"{prefix}timm.create_model({name!r}, num_classes={num_classes}{kwargs}, pretrained=True, "
        f"pretrained_cfg_overlay=dict(file={str(out)!r}, num_classes={num_classes}))",
    }
