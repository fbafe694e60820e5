"""Tensors to and from safetensors: optimizer state (tensors + a JSON-ready rest), a checkpoint's weights into a model,
and the checks that what is read fits the model and its optimizers."""

from __future__ import annotations

import torch
from torch import nn

from fastafd.checkpoint.paths import MODEL, OPTIM
from fastafd.checkpoint.store import Checkpoint
from fastafd.errors import UserError

# -- optimizer state <-> safetensors + JSON -------------------------------------------------------


def optimizer_to_safe(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``opt.state_dict()`` into tensors (safetensors) and a JSON-ready rest."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for key, value in st.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}/{pid}/{key}"] = value
            else:
                scalars[f"{pid}/{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_safe(tensors: dict[str, torch.Tensor], meta: dict, prefix: str) -> dict:
    """Inverse of :func:`optimizer_to_safe`: a state dict for ``optimizer.load_state_dict``."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        p, pid, name = key.split("/", 2)
        if p == prefix:
            state.setdefault(int(pid), {})[name] = value
    for key, value in meta["scalars"].items():
        pid, name = key.split("/", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


# -- weights into a model (eval, resume) ----------------------------------------------------------------


def load_model(ckpt: Checkpoint, module: nn.Module) -> None:
    """Load a checkpoint's model tensors into ``module`` (strict: same names, same shapes)."""
    state = ckpt.tensors(MODEL)
    own = module.state_dict()
    wrong = [(key, tuple(state[key].shape), tuple(own[key].shape)) for key in own if key in state and state[key].shape != own[key].shape]
    if wrong:
        key, theirs, ours = wrong[0]
        raise UserError(
            f"checkpoint {ckpt.path} does not match the model: {key} has shape {theirs} in {MODEL} but {ours} in this run's model "
            f"({len(wrong)} tensors differ): another class count or architecture? Resume with the run's settings, or start a new run"
        )
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(
            f"checkpoint {ckpt.path} does not match the model (missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]}): "
            "check the run's config"
        )


def check_optimizer_state(ckpt: Checkpoint, prefix: str, state_dict: dict, optimizer: torch.optim.Optimizer) -> None:
    """Refuse optimizer state (from :func:`optimizer_from_safe`) that does not fit ``optimizer``'s parameters:
    ``load_state_dict`` does not check, and a wrong-shaped buffer would fail, or silently broadcast, at the next step."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for pid, entries in state_dict["state"].items():
        if not 0 <= pid < len(params):
            raise UserError(f"checkpoint {ckpt.path}: {OPTIM} holds state for parameter {pid} of stage {prefix}, which has {len(params)}: "
                            "it does not belong to this run")
        for key, value in entries.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape != params[pid].shape:
                raise UserError(
                    f"checkpoint {ckpt.path} does not match the model: {prefix}/{pid}/{key} has shape {tuple(value.shape)} in {OPTIM} "
                    f"but the parameter {tuple(params[pid].shape)}: resume from another checkpoint (pass its folder to --checkpoint.resume)"
                )
