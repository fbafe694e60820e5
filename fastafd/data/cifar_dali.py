"""CIFAR-100 through DALI: the archive's arrays fed by ``fn.external_source``, pad-4 random crop +
flip + normalize in the pipeline (split from :mod:`fastafd.data.dali`, whose helpers it shares)."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from fastafd.config import DataConfig
from fastafd.data import position
from fastafd.data.base import check_split_sizes, to_model_layout
from fastafd.data.dali import (
    DALIGenericIterator,
    PipelineSettings,
    derive_seed,
    fn,
    normalize_args,
    pipeline_base,
    pipeline_def,
    shard_range,
)

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
                                          **normalize_args(cfg, s))
    else:
        images = fn.crop_mirror_normalize(images, crop=size, **normalize_args(cfg, s))
    return images, lab


class CifarTrainLoader:
    """CIFAR-100 training loader; the epoch contract of :mod:`fastafd.data.position`. The epoch's sequence
    (a permutation) and every sample's crop offsets and flip are drawn for the whole epoch from
    (seed, epoch), so a resume on any number of processes is exact, augmentation included, and needs
    no random state of DALI's (the pipeline has no random operator)."""

    kind = "cifar100"

    def __init__(self, split, cfg: DataConfig, settings: PipelineSettings, *, device: torch.device, global_batch: int) -> None:
        self._split, self._cfg, self._s, self._device = split, cfg, settings, device
        self._global_batch = global_batch
        self._len = len(split) // global_batch
        self._pos = position.EpochPosition(self._len)

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int) -> None:
        self._pos.set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from fastafd.data.cifar import epoch_plan, train_batches

        s = self._s
        epoch, start, _ = self._pos.begin()
        if start >= self._len:
            self._pos.end()
            return
        plan = epoch_plan(len(self._split), seed=s.seed, epoch=epoch, pad=self._cfg.crop_padding, hflip=self._cfg.hflip)
        take = plan.take(position.rank_positions(range(start, self._len), s.rank, s.world_size, s.batch))
        source = train_batches(self._split, take, s.batch, self._cfg.crop_padding)
        pipe = cifar_pipeline(source, True, self._cfg, s, batch_size=s.batch, num_threads=s.num_threads,
                              device_id=s.device_id, seed=derive_seed(s.seed, s.rank, epoch, 2))
        it = DALIGenericIterator(pipe, ["images", "labels"], auto_reset=False)
        for step, out in zip(range(start, self._len), it):
            labels = out[0]["labels"].reshape(-1).to(device=self._device, dtype=torch.int64, non_blocking=True)
            self._pos.advance(step)
            yield to_model_layout(out[0]["images"], self._device, channels_last=s.channels_last, dtype=s.dtype), labels
        self._pos.end()

    def state_dict(self) -> dict:
        s = self._s
        epoch, step = self._pos.saved()
        return position.state(self.kind, seed=s.seed, global_batch=self._global_batch, rank=s.rank, world_size=s.world_size,
                              epoch=epoch, step=step)

    def load_state_dict(self, state: dict) -> None:
        s = self._s
        self._pos.load(position.check(state, kind=self.kind, seed=s.seed, global_batch=self._global_batch, rank=s.rank,
                                      world_size=s.world_size))


class CifarEvalLoader:
    """CIFAR-100 test set: this rank's contiguous shard, in order, last batch partial."""

    def __init__(self, split, cfg: DataConfig, settings: PipelineSettings, *, device: torch.device) -> None:
        self._split, self._cfg, self._s, self._device = split, cfg, settings, device
        self._begin, self._end = shard_range(len(split), settings.rank, settings.world_size)
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
                              device_id=s.device_id, seed=derive_seed(s.seed, s.rank, 0, 3))
        for out in DALIGenericIterator(pipe, ["images", "labels"], auto_reset=False):
            labels = out[0]["labels"].reshape(-1).to(device=self._device, dtype=torch.int64, non_blocking=True)
            yield to_model_layout(out[0]["images"], self._device, channels_last=s.channels_last, dtype=s.dtype), labels


def build_cifar_loaders(ds, cfg: DataConfig, *, rank: int, world_size: int, local_rank: int, device: torch.device,
                        seed: int, channels_last: bool, train_batch: int, val_batch: int, dtype: torch.dtype = torch.float32,
                        train: bool = True) -> tuple[CifarTrainLoader | None, CifarEvalLoader]:
    base = pipeline_base(cfg, rank=rank, world_size=world_size, local_rank=local_rank, device=device, seed=seed,
                         channels_last=channels_last, dtype=dtype)
    base["decoder"] = "cpu"  # nothing to decode
    check_split_sizes(train=(f"{ds.root}/train", len(ds.train)) if train else None, val=(f"{ds.root}/test", len(ds.val)),
                      global_batch=world_size * train_batch, world_size=world_size)
    train_loader = None
    if train:
        train_loader = CifarTrainLoader(ds.train, cfg, PipelineSettings(batch=train_batch, **base), device=device,
                                        global_batch=world_size * train_batch)
    return train_loader, CifarEvalLoader(ds.val, cfg, PipelineSettings(batch=val_batch, **base), device=device)
