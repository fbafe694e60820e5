"""Metric accumulation on the device; values reach the host only when they are read."""

from __future__ import annotations

import torch
from torch import Tensor


class RunningMeans:
    """Sums per-step metric tensors on the device. :meth:`means` is the only host synchronisation."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.steps = 0

    def add(self, metrics: dict[str, Tensor]) -> None:
        for key, value in metrics.items():
            value = value.detach().float()
            self.sums[key] = self.sums[key] + value if key in self.sums else value.clone()
        self.steps += 1

    def state_dict(self) -> dict:
        return {"steps": self.steps, "sums": {k: v.reshape(-1).tolist() for k, v in self.sums.items()}}  # host read (checkpoint only)

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        self.steps = int(state["steps"])
        self.sums = {k: torch.tensor(v, device=device) for k, v in state["sums"].items()}

    def means(self) -> dict[str, list[float]]:
        """Per-step means, as lists (one value per peer); a single device-to-host copy."""
        if not self.steps:
            return {}
        keys = list(self.sums)
        flat = torch.cat([self.sums[k].reshape(-1) for k in keys]).div(self.steps).tolist()  # host sync
        out, i = {}, 0
        for k in keys:
            n = self.sums[k].numel()
            out[k] = flat[i : i + n]
            i += n
        return out


def topk_correct(logits: Tensor, target: Tensor, ks: tuple[int, ...] = (1, 5)) -> Tensor:
    """Number of samples whose label is among the top-k scores, for each k: ``(..., B, C)`` -> ``(..., len(ks))``."""
    maxk = min(max(ks), logits.shape[-1])
    top = logits.topk(maxk, dim=-1).indices  # (..., B, maxk)
    hit = top == target.unsqueeze(-1)
    return torch.stack([hit[..., : min(k, maxk)].any(dim=-1).sum(dim=-1) for k in ks], dim=-1)


def summarize_eval(sums: dict[str, Tensor], names: list[str]) -> dict:
    """Turn summed eval counts (see ``Task.eval_step``) into percentages and per-peer means."""
    host = {k: v.double().cpu() for k, v in sums.items()}  # host sync (once per evaluation)
    count = float(host.pop("count"))
    correct = host.pop("correct") * (100.0 / count)
    ensemble = host.pop("ensemble") * (100.0 / count)
    peers = []
    for k, name in enumerate(names):
        row = {"name": name, "top1": float(correct[k, 0]), "top5": float(correct[k, 1])}
        row.update({key: float(v[k]) / count for key, v in host.items()})
        peers.append(row)
    return {"peers": peers, "ensemble_top1": float(ensemble[0]), "ensemble_top5": float(ensemble[1]), "val_images": int(count)}
