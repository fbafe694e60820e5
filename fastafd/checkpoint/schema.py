"""The shape ``state.json`` must have before :func:`fastafd.state.restore` reads it (a damaged file is a
:class:`~fastafd.checkpoint.store.CorruptCheckpoint`, never a KeyError mid-restore)."""

from __future__ import annotations

_JSON_TYPES = {int: "an integer", str: "a string", list: "a list", dict: "an object"}
_STATE_KEYS = {"epoch": int, "epoch_step": int, "step": int, "stages": dict, "guard": dict, "meter": dict, "ranks": list, "config": dict}
"""What ``state.json`` must hold, and of which JSON type, for :func:`fastafd.state.restore` (``data``: optional)."""


def _kind_problem(where: str, value: object, kind: type) -> str | None:
    if isinstance(value, kind) and not isinstance(value, bool):
        return None
    return f"{where} is {'null' if value is None else type(value).__name__}, not {_JSON_TYPES[kind]}"


def _state_problem(state: object) -> str | None:
    """What is wrong with a parsed ``state.json`` (None: its shape is right)."""
    if not isinstance(state, dict):
        return f"is {type(state).__name__}, not a JSON object"
    for key, kind in _STATE_KEYS.items():
        if key not in state:
            return f"has no '{key}'"
        if problem := _kind_problem(f"'{key}'", state[key], kind):
            return problem
    if state["epoch"] < 1 or state["epoch_step"] < 0 or state["step"] < 0:
        return f"has an impossible position (epoch {state['epoch']}, epoch_step {state['epoch_step']}, step {state['step']})"
    if not state["ranks"]:
        return "has no per-process state ('ranks' is empty)"
    for i, rank in enumerate(state["ranks"]):
        where = f"ranks[{i}]"
        if problem := _kind_problem(where, rank, dict) or _kind_problem(f"{where}.rng", rank.get("rng"), dict):
            return problem
        if rank.get("loader") is not None and (problem := _kind_problem(f"{where}.loader", rank["loader"], dict)):
            return problem
        for key, kind in (("python", list), ("numpy", list), ("torch", str)):
            if problem := _kind_problem(f"{where}.rng.{key}", rank["rng"].get(key), kind):
                return problem
    for name, stage in state["stages"].items():
        where = f"stages.{name}"
        if problem := _kind_problem(where, stage, dict) or _kind_problem(f"{where}.scheduler", stage.get("scheduler"), dict):
            return problem
        optimizer = stage.get("optimizer")
        if problem := _kind_problem(f"{where}.optimizer", optimizer, dict):
            return problem
        for key, kind in (("param_groups", list), ("scalars", dict)):
            if problem := _kind_problem(f"{where}.optimizer.{key}", optimizer.get(key), kind):
                return problem
    if "data" in state and (problem := _kind_problem("'data'", state["data"], dict)):
        return problem
    return None
