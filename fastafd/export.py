"""Export one trained peer (ONE/CL: one branch with the trunk) as a plain timm state dict (safetensors)."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from safetensors import SafetensorError

from fastafd import atomic, checkpoint, rundir
from fastafd.errors import UserError
from fastafd.methods import registry
from fastafd.models.peers import build_kwargs


def export_peer(run: Path, peer: int, out: Path, which: str = "best") -> dict:
    """Write peer ``peer`` of run ``run`` (the checkpoint ``which`` names, see :func:`fastafd.checkpoint.choose`)
    to ``out``; returns a description.

    The file loads with ``timm.create_model(name, num_classes=N, pretrained=True,
    pretrained_cfg_overlay=dict(file=out))``; for a timm model whose default class count differs
    from N (e.g. resnet18 and its 1000 classes) add ``num_classes=N`` to the overlay too, or timm drops
    the classifier.

    An existing ``out`` is replaced atomically (a unique temporary file, fsync, rename): a reader sees
    the old file or the new one. An unwritable place is one line, and no temporary file is left.
    """
    run, out = Path(run), Path(out)
    if out.suffix != ".safetensors":
        raise UserError(f"--out {out} must end in .safetensors (timm picks the loader by extension)")
    if out.is_dir():
        raise UserError(f"--out {out} is a folder: pass a file name ending in .safetensors (an existing file is replaced)")
    cfg_path = run / rundir.CONFIG_FILE
    if not cfg_path.is_file():
        raise UserError(f"{run} is not a fastafd run directory (no {rundir.CONFIG_FILE}): pass the folder `fastafd train` wrote")
    cfg = json.loads(cfg_path.read_text())
    names = cfg["model"]["peers"]
    if not 0 <= peer < len(names):
        raise UserError(f"--peer {peer} is out of range: the run has {len(names)} peers (0..{len(names) - 1}: {', '.join(names)})")
    ckpt, why = checkpoint.choose(run, which)
    # the task says what its deployable networks are (peer k; for ONE/CL: the trunk + branch k)
    state = registry.get(cfg["method"]["name"]).deployable_state(ckpt.tensors(checkpoint.MODEL), peer)
    num_classes = int(json.loads((run / rundir.ENV_FILE).read_text())["dataset"]["num_classes"]) if not cfg["model"]["num_classes"] else int(cfg["model"]["num_classes"])
    name = names[peer]
    extra = build_kwargs(name, int(cfg["data"]["image_size"]))  # a transformer is built for the run's image size
    meta = {"model": name, "num_classes": num_classes, "create_kwargs": extra, "checkpoint": str(ckpt.path), "step": ckpt.step,
            "chosen": why}
    _write(out, state, {k: json.dumps(v) if not isinstance(v, str) else v for k, v in meta.items()})  # safetensors metadata: strings
    kwargs = "".join(f", {k}={v!r}" for k, v in extra.items())
    # the CIFAR networks are fastafd's: timm knows them once fastafd is imported
    prefix = "import fastafd; " if name.startswith("cifar_") else ""
    return {
        "file": str(out),
        **meta,
        "load": f"{prefix}timm.create_model({name!r}, num_classes={num_classes}{kwargs}, pretrained=True, "
        f"pretrained_cfg_overlay=dict(file={str(out)!r}, num_classes={num_classes}))",
    }


def _write(out: Path, state: dict, meta: dict[str, str]) -> None:
    created = [p for p in (out.parent, *out.parent.parents) if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        checkpoint.save_weights(out, state, meta)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(out, 0o666 & ~umask)  # a file to share, like any other the user writes (safetensors makes it 0600)
    except (OSError, SafetensorError) as e:
        for path in created:  # deepest first: only what this call made, and only if still empty
            with contextlib.suppress(OSError):
                path.rmdir()
        code = atomic.io_errno(e)
        if code is None:
            raise
        raise UserError(f"cannot write {out} ({atomic.describe(code)}): pass a writable --out") from None
