"""DALI pipelines and the loader that turns their output into model-ready torch tensors.

Importing this module imports DALI; ``fastafd.data`` imports it only when a folder dataset is
used, so the package works without DALI for synthetic data.

Layout: crop_mirror_normalize writes HWC when the model wants channels-last (the NHWC batch
permuted to logical NCHW is exactly channels-last memory) and CHW otherwise, so neither case
copies on the host.

Sharding and epochs:

* Training: the file list is pre-shuffled with ``numpy.random.default_rng(seed)`` and truncated to
  a multiple of ``world_size`` (at most ``world_size - 1`` images left out), so every shard has
  the same size. ``shuffle_after_epoch`` reshuffles the whole list each epoch with a seed that is
  the same on all ranks: every epoch is a new global permutation and the shards are disjoint.
  ``pad_last_batch`` keeps the reader from reading into the next epoch to fill the last
  partial batch, which ``LastBatchPolicy.DROP`` then drops: epochs stay aligned with the reader.
* Validation: no shuffle, ``stick_to_shard``, ``pad_last_batch`` with ``LastBatchPolicy.PARTIAL``:
  the padding is trimmed, so every image is seen exactly once over all ranks.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from fastafd.config import DataConfig
from fastafd.data.base import to_model_layout
from fastafd.data.folder import Split
from fastafd.errors import UserError

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
except ImportError as exc:  # pragma: no cover - exercised by a test that hides DALI
    raise UserError(
        "NVIDIA DALI is needed to read image folders but is not installed: pip install nvidia-dali-cuda130 "
        "(or use data.format=synthetic)"
    ) from exc

READER = "Reader"


@dataclass(frozen=True)
class PipelineSettings:
    """Everything one rank's pipeline needs besides the file list."""

    batch: int
    """Per-rank batch size."""
    num_threads: int
    device_id: int | None
    """CUDA device of the pipeline; None builds a CPU-only pipeline."""
    decoder: str
    """'mixed' (nvJPEG) or 'cpu'."""
    rank: int
    world_size: int
    seed: int
    channels_last: bool
    """Output HWC (permuted to channels-last NCHW) instead of CHW (contiguous NCHW)."""


def _derive_seed(*parts: int) -> int:
    """A well-mixed non-negative 31-bit seed from integers (stable across runs and machines)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0] & 0x7FFFFFFF)


def _normalize_args(cfg: DataConfig, s: PipelineSettings) -> dict:
    """crop_mirror_normalize's output: float, normalised, HWC for channels-last, else CHW."""
    return dict(
        dtype=types.FLOAT,
        output_layout="HWC" if s.channels_last else "CHW",
        mean=[255.0 * m for m in cfg.mean],
        std=[255.0 * s for s in cfg.std],
    )


@pipeline_def
def train_pipeline(files: list[str], labels: list[int], file_root: str, cfg: DataConfig,
                   s: PipelineSettings, shuffle_seed: int):
    """Read (sharded, reshuffled every epoch), random-resized-crop, flip, normalize; HWC float."""
    jpegs, lab = fn.readers.file(
        file_root=file_root, files=files, labels=labels, shard_id=s.rank, num_shards=s.world_size,
        shuffle_after_epoch=True, shuffle_after_epoch_seed=shuffle_seed, pad_last_batch=True, name=READER,
    )
    images = fn.decoders.image_random_crop(
        jpegs, device=s.decoder, output_type=types.RGB,
        random_area=list(cfg.scale), random_aspect_ratio=list(cfg.ratio),
    )
    images = fn.resize(images, resize_x=cfg.image_size, resize_y=cfg.image_size)
    if s.device_id is not None:
        images, lab = images.gpu(), lab.gpu()
    mirror = fn.random.coin_flip(probability=cfg.hflip)
    images = fn.crop_mirror_normalize(images, mirror=mirror, **_normalize_args(cfg, s))
    return images, lab


@pipeline_def
def val_pipeline(files: list[str], labels: list[int], file_root: str, cfg: DataConfig, s: PipelineSettings):
    """Read this rank's fixed shard in order, resize the shorter side, center-crop, normalize."""
    jpegs, lab = fn.readers.file(
        file_root=file_root, files=files, labels=labels, shard_id=s.rank, num_shards=s.world_size,
        random_shuffle=False, stick_to_shard=True, pad_last_batch=True, name=READER,
    )
    images = fn.decoders.image(jpegs, device=s.decoder, output_type=types.RGB)
    images = fn.resize(images, resize_shorter=round(cfg.image_size / cfg.val_crop_ratio))
    if s.device_id is not None:
        images, lab = images.gpu(), lab.gpu()
    images = fn.crop_mirror_normalize(images, crop=(cfg.image_size, cfg.image_size), **_normalize_args(cfg, s))
    return images, lab


_PATH_IN_ERROR = re.compile(r"(?:File mapping failed|[Ff]ile|[Pp]ath)[^:\n]*:\s*(/[^\s'\"]+)")
_OPERATOR_IN_ERROR = re.compile(r"Error in \w+ operator `([\w.]+)`")


def decode_error(exc: Exception, root: str) -> RuntimeError:
    """A readable error for a DALI failure, naming the failing file when DALI's message has it.

    DALI's text is a multi-line report; its cause is the first line after ``encountered:``
    (e.g. ``File mapping failed: <path>`` for an empty file, ``nvImageCodec failure`` for a
    corrupt one, which names no file).
    """
    text = str(exc)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    cause = next((lines[i + 1] for i, ln in enumerate(lines[:-1]) if ln == "encountered:"), lines[0] if lines else "")
    op = _OPERATOR_IN_ERROR.search(text)
    where = f" in {op.group(1)}" if op else ""
    tail = text.split("encountered:", 1)[-1]  # skip DALI's traceback of the pipeline definition
    path = _PATH_IN_ERROR.search(tail)
    if path:
        return RuntimeError(f"DALI could not read {path.group(1)}{where} ({cause}): replace or remove that file")
    return RuntimeError(
        f"DALI failed{where} on an image under {root} ({cause}); DALI does not say which file: "
        "find it by opening the images with PIL and replace or remove it"
    )


def _shard_size(n: int, shard: int, shards: int) -> int:
    """Samples of ``shard`` when DALI splits ``n`` samples into ``shards`` (its documented formula)."""
    return (shard + 1) * n // shards - shard * n // shards


class DaliLoader:
    """One rank's loader over a DALI pipeline (see the module docstring for the epoch semantics).

    The pipeline is built once and reused epoch after epoch. It is rebuilt, with seeds that mix in
    the epoch, when an epoch was left unfinished (e.g. ``max_steps_per_epoch``) or when
    :meth:`set_epoch` announces an epoch other than the next one (resuming): the order is then
    deterministic from (seed, epoch) but differs from that of an uninterrupted run.
    """

    def __init__(self, split: Split, cfg: DataConfig, settings: PipelineSettings, *, training: bool,
                 device: torch.device) -> None:
        self._cfg, self._s, self._training, self._device = cfg, settings, training, device
        self._root = str(split.root)
        files, labels = list(split.files), list(split.labels)
        if training:
            order = np.random.default_rng(settings.seed).permutation(len(files))
            order = order[: len(files) // settings.world_size * settings.world_size]
            files, labels = [files[i] for i in order], [labels[i] for i in order]
            self._len = len(files) // settings.world_size // settings.batch
        else:
            self._len = -(-_shard_size(len(files), settings.rank, settings.world_size) // settings.batch)
        self._files, self._labels = files, labels
        self._epoch = 0  # the epoch the next __iter__ produces
        self._built_at = 0  # epoch at which the current pipeline started
        self._done = 0  # epochs finished by the current pipeline
        self._dirty = False  # an epoch was started and not finished
        self._it: DALIGenericIterator | None = None
        self._build(0)

    def _build(self, epoch: int) -> None:
        s, common = self._s, dict(files=self._files, labels=self._labels, file_root=self._root, cfg=self._cfg)
        kw = dict(batch_size=s.batch, num_threads=s.num_threads, device_id=s.device_id,
                  seed=_derive_seed(s.seed, s.rank, epoch, int(self._training)))
        self._it = None  # release the previous pipeline's threads and buffers first
        try:
            if self._training:
                pipe = train_pipeline(**common, s=s, shuffle_seed=_derive_seed(s.seed, epoch), **kw)
                policy = LastBatchPolicy.DROP
            else:
                pipe = val_pipeline(**common, s=s, **kw)
                policy = LastBatchPolicy.PARTIAL
            pipe.build()
            self._it = DALIGenericIterator(pipe, ["images", "labels"], reader_name=READER,
                                           last_batch_policy=policy, auto_reset=False)
        except RuntimeError as exc:
            raise decode_error(exc, self._root) from exc
        self._built_at, self._done, self._dirty = epoch, 0, False

    def set_epoch(self, epoch: int) -> None:
        """Announce the epoch of the next ``iter()``; only a jump (resume) changes anything."""
        self._epoch = epoch

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch = self._epoch
        if self._it is None or self._dirty or self._built_at + self._done != epoch:
            self._build(epoch)
        it = self._it
        assert it is not None
        self._dirty = True
        while True:
            try:
                out = next(it)
            except StopIteration:
                break
            except RuntimeError as exc:
                self._it = None  # DALI pipelines are unusable after an error
                raise decode_error(exc, self._root) from exc
            images, labels = out[0]["images"], out[0]["labels"]
            if labels.shape[0] == 0:  # a shard one sample short of the others ends with an empty batch
                continue
            labels = labels.reshape(-1).to(device=self._device, dtype=torch.int64, non_blocking=True)
            yield to_model_layout(images, self._device, channels_last=self._s.channels_last), labels
        it.reset()  # starts prefetching the next epoch
        self._dirty = False
        self._done += 1
        self._epoch = epoch + 1


def num_threads(cfg: DataConfig, world_size: int) -> int:
    """``cfg.num_threads``, or this process's share of the CPU cores it may run on."""
    if cfg.num_threads > 0:
        return cfg.num_threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0) or world_size
    return max(1, cores // local)


def build_dali_loaders(train: Split, val: Split, cfg: DataConfig, *, rank: int, world_size: int, local_rank: int,
                       device: torch.device, seed: int, channels_last: bool, train_batch: int,
                       val_batch: int) -> tuple[DaliLoader, DaliLoader]:
    """Train and validation loaders for one rank of an ImageFolder dataset.

    On CUDA the pipelines run on ``device`` (``local_rank`` when it has no index) and their outputs
    stay there; on CPU they are CPU-only pipelines (``device_id=None``).
    """
    gpu = device.type == "cuda"
    decode = cfg.decode_device if cfg.decode_device != "auto" else ("gpu" if gpu else "cpu")
    if decode == "gpu" and not gpu:
        raise UserError(
            f"data.decode_device=gpu needs a CUDA device but the device is {device}: set data.decode_device to auto or cpu"
        )
    device_id = (device.index if device.index is not None else local_rank) if gpu else None
    base = dict(num_threads=num_threads(cfg, world_size), device_id=device_id,
                decoder="mixed" if decode == "gpu" else "cpu", rank=rank, world_size=world_size, seed=seed,
                channels_last=channels_last)
    if len(train) < world_size * train_batch:
        raise UserError(
            f"{train.root} has {len(train)} images, fewer than one global batch of {world_size * train_batch}: "
            "lower data.batch_size or add images"
        )
    if len(val) < world_size:
        raise UserError(f"{val.root} has {len(val)} images, fewer than the {world_size} processes: add validation images")
    train_loader = DaliLoader(train, cfg, PipelineSettings(batch=train_batch, **base), training=True, device=device)
    val_loader = DaliLoader(val, cfg, PipelineSettings(batch=val_batch, **base), training=False, device=device)
    return train_loader, val_loader
