"""CIFAR-100 through DALI: the archive's arrays fed by ``fn.external_source``, pad-4 random crop +
flip + normalize in the pipeline (split from :mod:`fastafd.data.dali`, whose helpers it shares)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from fastafd.config import DataConfig
from fastafd.data.base import to_model_layout
from fastafd.data.dali import (
    STATE_VERSION,
    DALIGenericIterator,
    PipelineSettings,
    _derive_seed,
    _normalize_args,
    _shard_range,
    check_state,
    fn,
    pipeline_base,
    pipeline_def,
)
from fastafd.errors import UserError

# -- CIFAR-100 --------------------------------------------------------------------------------------


@pipeline_def
def cifar_pipeline(source, training: bool, cfg: DataConfig, s: PipelineSettings):
    """CIFAR batches from numpy: pad + random crop + flip (positions drawn by the loader), normalize."""
    if training:
        images, lab, pos_x, pos_y, mirror = fn.external_source(source=source, num_outputs=5, batch=True,
                                                               layout=["HWC", "", "", "", ""])
    else:
        images, lab = fn.external_source(source=source, num_outputs=2, batch=True, layout=["HWC", ""])
    if s.device_id is not None:
        images, lab = images.gpu(), lab.gpu()
    size = (cfg.image_size, cfg.image_size)
    if training:
        pad = cfg.crop_padding
        if pad:  # centred window larger than the image: zero padding on every side
            images = fn.crop(images, crop=(32 + 2 * pad, 32 + 2 * pad), out_of_bounds_policy="pad", fill_values=0)
        images = fn.crop_mirror_normalize(images, crop=size, crop_pos_x=pos_x, crop_pos_y=pos_y, mirror=mirror,
                                          **_normalize_args(cfg, s))
    else:
        images = fn.crop_mirror_normalize(images, crop=size, **_normalize_args(cfg, s))
    return images, lab


class CifarTrainLoader:
    """CIFAR-100 training loader; same epoch, sharding and resume contract as :class:`TrainLoader`."""

    kind = "cifar100"

    def __init__(self, split, cfg: DataConfig, settings: PipelineSettings, *, device: torch.device) -> None:
        self._split, self._cfg, self._s, self._device = split, cfg, settings, device
        self._len = len(split) // settings.world_size // settings.batch
        self._epoch, self._active, self._consumed, self._resume = 0, None, 0, None

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int) -> None:
        if self._resume is not None and epoch > self._resume["epoch"]:
            self._resume = None
        elif self._resume is not None and epoch < self._resume["epoch"]:
            raise ValueError(f"set_epoch({epoch}) before the restored position (epoch {self._resume['epoch']})")
        self._epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from fastafd.data.cifar import epoch_plan, train_batches

        s, epoch = self._s, self._epoch
        start = self._resume["batch"] if self._resume is not None and self._resume["epoch"] == epoch else 0
        self._resume = None
        if start >= self._len:
            self._epoch = epoch + 1
            return
        plan = epoch_plan(len(self._split), seed=s.seed, epoch=epoch, rank=s.rank, world_size=s.world_size,
                          pad=self._cfg.crop_padding, hflip=self._cfg.hflip)
        source = train_batches(self._split, plan, s.batch, start, self._len, self._cfg.crop_padding)
        pipe = cifar_pipeline(source, True, self._cfg, s, batch_size=s.batch, num_threads=s.num_threads,
                              device_id=s.device_id, seed=_derive_seed(s.seed, s.rank, epoch, 2))
        it = DALIGenericIterator(pipe, ["images", "labels"], auto_reset=False)
        self._active, self._consumed = epoch, start
        for b, out in zip(range(start, self._len), it):
            labels = out[0]["labels"].reshape(-1).to(device=self._device, dtype=torch.int64, non_blocking=True)
            self._consumed = b + 1
            yield to_model_layout(out[0]["images"], self._device, channels_last=s.channels_last, dtype=s.dtype), labels
        self._active = None
        self._epoch = epoch + 1

    def state_dict(self) -> dict:
        s = self._s
        state = {"version": STATE_VERSION, "kind": self.kind, "rank": s.rank, "world_size": s.world_size,
                 "seed": s.seed, "epoch": self._epoch, "batch": 0, "checkpoint": None}
        if self._resume is not None:
            state.update(epoch=self._resume["epoch"], batch=self._resume["batch"])
        elif self._active is not None:
            done = self._consumed >= self._len
            state.update(epoch=self._active + done, batch=0 if done else self._consumed)
        return state

    def load_state_dict(self, state: dict) -> None:
        check_state(state, kind=self.kind, s=self._s)
        self._epoch = int(state["epoch"])
        self._resume = dict(state) if state["batch"] else None


class CifarEvalLoader:
    """CIFAR-100 test set: this rank's contiguous shard, in order, last batch partial."""

    def __init__(self, split, cfg: DataConfig, settings: PipelineSettings, *, device: torch.device) -> None:
        self._split, self._cfg, self._s, self._device = split, cfg, settings, device
        self._begin, self._end = _shard_range(len(split), settings.rank, settings.world_size)
        self._len = -(-(self._end - self._begin) // settings.batch)

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int) -> None:
        """Validation does not depend on the epoch."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Validation is never resumed mid-way."""

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        s, split = self._s, self._split

        def source():
            for lo in range(self._begin, self._end, s.batch):
                hi = min(lo + s.batch, self._end)
                yield list(split.images[lo:hi]), list(split.labels[lo:hi].reshape(-1, 1))

        pipe = cifar_pipeline(source(), False, self._cfg, s, batch_size=s.batch, num_threads=s.num_threads,
                              device_id=s.device_id, seed=_derive_seed(s.seed, s.rank, 0, 3))
        for out in DALIGenericIterator(pipe, ["images", "labels"], auto_reset=False):
            labels = out[0]["labels"].reshape(-1).to(device=self._device, dtype=torch.int64, non_blocking=True)
            yield to_model_layout(out[0]["images"], self._device, channels_last=s.channels_last, dtype=s.dtype), labels


def build_cifar_loaders(ds, cfg: DataConfig, *, rank: int, world_size: int, local_rank: int, device: torch.device,
                        seed: int, channels_last: bool, train_batch: int, val_batch: int,
                        dtype: torch.dtype = torch.float32) -> tuple[CifarTrainLoader, CifarEvalLoader]:
    base = pipeline_base(cfg, rank=rank, world_size=world_size, local_rank=local_rank, device=device, seed=seed,
                         channels_last=channels_last, dtype=dtype)
    base["decoder"] = "cpu"  # nothing to decode
    if len(ds.train) < world_size * train_batch:
        raise UserError(f"{ds.root}/train has {len(ds.train)} images, fewer than one global batch of "
                        f"{world_size * train_batch}: lower data.batch_size")
    if len(ds.val) < world_size:
        raise UserError(f"{ds.root}/test has {len(ds.val)} images, fewer than the {world_size} processes")
    return (CifarTrainLoader(ds.train, cfg, PipelineSettings(batch=train_batch, **base), device=device),
            CifarEvalLoader(ds.val, cfg, PipelineSettings(batch=val_batch, **base), device=device))
