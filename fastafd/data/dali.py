"""DALI pipelines and the loaders that turn their output into model-ready torch tensors.

Importing this module imports DALI; ``fastafd.data`` imports it only when real data is read, so
the package works without DALI for synthetic data.

Readers (:mod:`fastafd.data.dali_readers`): an image folder is read by ``fn.readers.file`` from the
file list made by one scan at start-up (no directory walk per epoch); shards by
``fn.readers.webdataset`` with their DALI index files. Both are sharded by the *global* rank
(``shard_id=rank, num_shards=world_size``). A decode failure is turned into a one-line error naming
the file by :mod:`fastafd.data.decode_errors`.

Training epochs (:class:`TrainLoader`): one pipeline per epoch, built from (seed, epoch, rank,
world size) alone, so an epoch never depends on how the previous one ended (``max_steps_per_epoch``)
and a resumed run needs only the epoch, the batch and DALI's checkpoint of that epoch's pipeline.

* Folder: the file list is permuted with ``numpy.random.default_rng((seed, epoch))`` (the same on
  every rank) and truncated to a multiple of ``world_size``; DALI cuts it into contiguous equal
  shards and reads them in order (``random_shuffle=False``). Every epoch is a new global
  permutation, the shards are disjoint, and the at most ``world_size - 1`` images left out change
  from epoch to epoch. Since the order is known, a file that fails to decode can be named.
* Shards: the tars are split into ``world_size`` contiguous ranges of samples; rank r reads range
  ``(r + epoch) % world_size`` (DALI's own rotation), with DALI's shuffle buffer
  (``random_shuffle``, ``initial_fill=SHUFFLE_BUFFER``) seeded per (seed, epoch, rank); pack wrote
  the training samples in a random order, so every range mixes all classes.
* Every rank yields ``(N // world_size) // batch`` batches: the last partial batch is dropped
  (``pad_last_batch`` keeps DALI from reading into the next epoch to fill it).

Augmentation: ``fn.decoders.image_random_crop`` decodes only the random-resized-crop window (ROI
decode: scale 0.08-1, ratio 3/4-4/3 by default) and ``fn.random.coin_flip`` draws the flips. On
CUDA, decoding is "mixed" (nvJPEG; DALI uses the hardware JPEG decoder of A100/H100-class GPUs when
there is one), then resize, flip and normalize run in DALI on the GPU (``crop_mirror_normalize``,
whose output is HWC (the NHWC batch permuted to logical NCHW is exactly channels-last memory) or
CHW, in float32 or float16). Without a GPU, DALI decodes on CPU threads and returns the crops and
flips as they are; :class:`~fastafd.data.cpu_finish.CpuFinish` resizes, flips and normalizes them
in torch (DALI's CPU resize is not vectorised; see that module). Validation: no shuffle,
``stick_to_shard``, ``pad_last_batch`` and ``LastBatchPolicy.PARTIAL``: every image is seen exactly
once over all ranks.
"""

from __future__ import annotations

import base64
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from fastafd.config import DataConfig
from fastafd.data.base import DataError, to_model_layout
from fastafd.data.cpu_finish import CpuFinish
from fastafd.data.decode_errors import decode_error
from fastafd.data.folder import Split
from fastafd.data.shards import ShardSplit
from fastafd.errors import UserError

try:
    from nvidia.dali import fn, pipeline_def, types
    from nvidia.dali.plugin.pytorch import DALIGenericIterator, DALIRaggedIterator, LastBatchPolicy
except ImportError as exc:  # pragma: no cover - exercised by a test that hides DALI
    raise UserError(
        "NVIDIA DALI is needed to read image data but is not installed: pip install nvidia-dali-cuda130 "
        "(or use data.format=synthetic)"
    ) from exc

from fastafd.data.dali_readers import READER, SHUFFLE_BUFFER, FolderReader, ShardReader  # noqa: E402 - after the DALI check

STATE_VERSION = 2
"""2: the CPU training pipeline hands crops to :class:`CpuFinish` (its DALI graph, and so its checkpoints, changed)."""


@dataclass(frozen=True)
class PipelineSettings:
    """Everything one rank's pipeline needs besides the data."""

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
    dtype: torch.dtype = torch.float32
    """Images handed to the model: float32, float16 (written by DALI) or bfloat16 (cast on the device)."""
    cpu_finish: bool = True
    """CPU-only pipeline: resize, flip and normalize in torch (:class:`CpuFinish`); False runs DALI's
    CPU operators for them, the GPU pipeline's graph (slower; kept for ``benchmarks/data.py``)."""


def _derive_seed(*parts: int) -> int:
    """A well-mixed non-negative 31-bit seed from integers (stable across runs and machines)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0] & 0x7FFFFFFF)


def _normalize_args(cfg: DataConfig, s: PipelineSettings) -> dict:
    """crop_mirror_normalize's output: normalised, HWC for channels-last, else CHW."""
    return dict(
        dtype=types.FLOAT16 if s.dtype == torch.float16 else types.FLOAT,
        output_layout="HWC" if s.channels_last else "CHW",
        mean=[255.0 * m for m in cfg.mean],
        std=[255.0 * s for s in cfg.std],
    )


def _shard_range(n: int, shard: int, shards: int) -> tuple[int, int]:
    """Samples [begin, end) of ``shard`` when DALI splits ``n`` samples into ``shards`` (its formula)."""
    return shard * n // shards, (shard + 1) * n // shards


# -- pipelines --------------------------------------------------------------------------------------


@pipeline_def
def train_pipeline(reader, order, shard_id: int, cfg: DataConfig, s: PipelineSettings):
    """Read one epoch of this rank's shard, random-resized-crop (ROI decode), draw the flips; on a
    GPU also resize, flip and normalize (outputs: images, labels). Without a GPU the outputs are the
    crops as decoded, the labels and the flips, finished by :class:`CpuFinish`."""
    encoded, lab = reader.node(order=order, shard_id=shard_id, num_shards=s.world_size, training=True)
    images = fn.decoders.image_random_crop(
        encoded, device=s.decoder, output_type=types.RGB,
        random_area=list(cfg.scale), random_aspect_ratio=list(cfg.ratio),
    )
    mirror = fn.random.coin_flip(probability=cfg.hflip)
    if s.device_id is None and s.cpu_finish:
        return images, lab, mirror
    images = fn.resize(images, resize_x=cfg.image_size, resize_y=cfg.image_size)
    if s.device_id is not None:
        images, lab = images.gpu(), lab.gpu()
    images = fn.crop_mirror_normalize(images, mirror=mirror, **_normalize_args(cfg, s))
    return images, lab


@pipeline_def
def val_pipeline(reader, cfg: DataConfig, s: PipelineSettings):
    """Read this rank's fixed shard in order, resize the shorter side, center-crop, normalize."""
    encoded, lab = reader.node(order=None, shard_id=s.rank, num_shards=s.world_size, training=False)
    images = fn.decoders.image(encoded, device=s.decoder, output_type=types.RGB)
    images = fn.resize(images, resize_shorter=round(cfg.image_size / cfg.val_crop_ratio))
    if s.device_id is not None:
        images, lab = images.gpu(), lab.gpu()
    images = fn.crop_mirror_normalize(images, crop=(cfg.image_size, cfg.image_size), **_normalize_args(cfg, s))
    return images, lab


# -- loaders ----------------------------------------------------------------------------------------


class TrainLoader:
    """One rank's training loader: a pipeline per epoch (see the module docstring), mid-epoch resume."""

    def __init__(self, reader: FolderReader | ShardReader, cfg: DataConfig, settings: PipelineSettings, *,
                 device: torch.device, verify_root: str) -> None:
        self._reader, self._cfg, self._s, self._device, self._verify_root = reader, cfg, settings, device, verify_root
        self._len = len(reader) // settings.world_size // settings.batch
        self._epoch = 0  # the epoch the next __iter__ produces
        self._active: int | None = None  # epoch being iterated (None between epochs)
        self._consumed = 0  # batches of the active epoch handed out
        self._it: DALIGenericIterator | None = None
        self._resume: dict | None = None  # a loaded state not yet applied
        self._next: dict | None = None  # the next epoch's pipeline, being built on a helper thread
        self._finish = (CpuFinish(cfg.image_size, cfg.mean, cfg.std, channels_last=settings.channels_last,
                                  dtype=settings.dtype) if settings.device_id is None and settings.cpu_finish else None)

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int) -> None:
        """Announce the epoch of the next ``iter()``."""
        if self._resume is not None and epoch > self._resume["epoch"]:
            self._resume = None  # that epoch was cut short on purpose
        elif self._resume is not None and epoch < self._resume["epoch"]:
            raise ValueError(f"set_epoch({epoch}) before the restored position (epoch {self._resume['epoch']})")
        self._epoch = epoch

    def _shard_id(self, epoch: int) -> int:
        s = self._s
        return (s.rank + epoch) % s.world_size if self._reader.kind == "shards" else s.rank

    def _pipeline(self, epoch: int, checkpoint: str | None):
        s = self._s
        order = self._reader.epoch_order(s.seed, epoch, s.world_size)
        pipe = train_pipeline(
            self._reader, order, self._shard_id(epoch), self._cfg, s,
            batch_size=s.batch, num_threads=s.num_threads, device_id=s.device_id,
            seed=_derive_seed(s.seed, s.rank, epoch, 1), enable_checkpointing=True,
            checkpoint=base64.b64decode(checkpoint) if checkpoint else None,
        )
        pipe.build()
        return order, pipe

    def _prebuild(self, epoch: int) -> None:
        """Build epoch ``epoch``'s pipeline on a helper thread while this epoch runs (hides the build)."""
        box: dict = {"epoch": epoch}

        def work() -> None:
            try:
                box["result"] = self._pipeline(epoch, None)
            except BaseException as exc:  # noqa: BLE001 - rebuilt (and reported) on the main thread
                box["error"] = exc

        box["thread"] = threading.Thread(target=work, name=f"fastafd-dali-epoch{epoch}", daemon=True)
        box["thread"].start()
        self._next = box

    def _build(self, epoch: int, checkpoint: str | None) -> DALIGenericIterator:
        self._it = None  # release the previous pipeline's threads and buffers first
        box, self._next = self._next, None
        if box is not None:
            box["thread"].join()
        if box is not None and box["epoch"] == epoch and checkpoint is None and "result" in box:
            order, pipe = box["result"]
        else:
            order, pipe = self._pipeline(epoch, checkpoint)
        self._order = order
        try:
            if self._finish is None:
                return DALIGenericIterator(pipe, ["images", "labels"], reader_name=READER,
                                           last_batch_policy=LastBatchPolicy.DROP, auto_reset=False)
            dense, ragged = DALIRaggedIterator.DENSE_TAG, DALIRaggedIterator.SPARSE_LIST_TAG
            return DALIRaggedIterator(pipe, ["images", "labels", "flips"], output_types=[ragged, dense, dense],
                                      reader_name=READER, last_batch_policy=LastBatchPolicy.DROP, auto_reset=False)
        except RuntimeError as exc:
            raise self._error(exc, epoch, 0) from exc

    def _error(self, exc: Exception, epoch: int, batch: int) -> DataError:
        s = self._s
        begin, end = _shard_range(len(self._reader) if self._order is None else len(self._order),
                                  self._shard_id(epoch), s.world_size)
        # DALI prefetches (2 batches, +1 in the reader); the shard reader's shuffle buffer adds its fill
        slack = SHUFFLE_BUFFER if self._reader.kind == "shards" else 0
        lo, hi = begin + max(0, batch * s.batch - slack), min(end, begin + (batch + 4) * s.batch + slack)
        return decode_error(exc, self._reader.root, self._verify_root,
                            lambda: self._reader.candidates(self._order, lo, hi))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, start, cpt = self._epoch, 0, None
        if self._resume is not None and self._resume["epoch"] == epoch:
            start, cpt = self._resume["batch"], self._resume["checkpoint"]
        self._resume = None
        self._order = None
        it = self._build(epoch, cpt if start else None)
        self._it, self._active, self._consumed = it, epoch, start
        self._prebuild(epoch + 1)
        s = self._s
        for b in range(start, self._len):
            try:
                out = next(it)
            except StopIteration:  # pragma: no cover - DALI's shard is never shorter than _len batches
                raise RuntimeError(f"DALI ended epoch {epoch} after {b} of {self._len} batches") from None
            except RuntimeError as exc:
                self._it = self._active = None  # DALI pipelines are unusable after an error
                raise self._error(exc, epoch, b) from exc
            images, labels = out[0]["images"], out[0]["labels"]
            labels = self._reader.labels(labels).to(device=self._device, dtype=torch.int64, non_blocking=True)
            self._consumed = b + 1
            if self._finish is not None:
                yield self._finish(images, out[0]["flips"].reshape(-1).tolist()), labels
            else:
                yield to_model_layout(images, self._device, channels_last=s.channels_last, dtype=s.dtype), labels
        self._it = self._active = None
        self._epoch = epoch + 1

    def state_dict(self) -> dict:
        """The position to resume from (see :class:`fastafd.data.base.Loader`)."""
        s = self._s
        state = {"version": STATE_VERSION, "kind": self._reader.kind, "rank": s.rank, "world_size": s.world_size,
                 "seed": s.seed, "epoch": self._epoch, "batch": 0, "checkpoint": None}
        if self._resume is not None:
            state.update(epoch=self._resume["epoch"], batch=self._resume["batch"], checkpoint=self._resume["checkpoint"])
        elif self._active is not None and self._it is not None and 0 < self._consumed < self._len:
            cpt = self._it.checkpoints()[0]
            state.update(epoch=self._active, batch=self._consumed, checkpoint=base64.b64encode(cpt).decode("ascii"))
        elif self._active is not None and self._consumed >= self._len:
            state.update(epoch=self._active + 1)
        return state

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state`` (from :meth:`state_dict` of a loader over the same data, seed, rank and world size)."""
        check_state(state, kind=self._reader.kind, s=self._s)
        self._epoch = int(state["epoch"])
        self._resume = dict(state) if state["batch"] else None


def check_state(state: dict, *, kind: str, s: PipelineSettings) -> None:
    if state.get("version") != STATE_VERSION:
        raise UserError(f"data loader state of version {state.get('version')} cannot be resumed by this fastafd (version {STATE_VERSION})")
    want = {"kind": kind, "rank": s.rank, "world_size": s.world_size, "seed": s.seed}
    diff = {k: (state.get(k), v) for k, v in want.items() if state.get(k) != v}
    if diff:
        what = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in diff.items())
        raise UserError(f"cannot resume the data position mid-epoch: {what} changed since the checkpoint; "
                        "resume with the same data, seed and number of processes")


class EvalLoader:
    """One rank's validation loader: the pipeline is built once and reused every evaluation."""

    def __init__(self, reader: FolderReader | ShardReader, cfg: DataConfig, settings: PipelineSettings, *,
                 device: torch.device, verify_root: str) -> None:
        self._reader, self._cfg, self._s, self._device, self._verify_root = reader, cfg, settings, device, verify_root
        begin, end = _shard_range(len(reader), settings.rank, settings.world_size)
        self._begin, self._end = begin, end
        self._len = -(-(end - begin) // settings.batch)
        self._it: DALIGenericIterator | None = None
        self._dirty = False

    def _build(self) -> None:
        s = self._s
        self._it = None
        pipe = val_pipeline(self._reader, self._cfg, s, batch_size=s.batch, num_threads=s.num_threads,
                            device_id=s.device_id, seed=_derive_seed(s.seed, s.rank, 0, 0))
        try:
            self._it = DALIGenericIterator(pipe, ["images", "labels"], reader_name=READER,
                                           last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=False)
        except RuntimeError as exc:
            raise self._error(exc, 0) from exc
        self._dirty = False

    def _error(self, exc: Exception, batch: int) -> DataError:
        s = self._s
        lo, hi = self._begin + batch * s.batch, min(self._end, self._begin + (batch + 4) * s.batch)
        return decode_error(exc, self._reader.root, self._verify_root, lambda: self._reader.candidates(None, lo, hi))

    def set_epoch(self, epoch: int) -> None:
        """Validation does not depend on the epoch."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Validation is never resumed mid-way."""

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._it is None or self._dirty:
            self._build()
        it = self._it
        assert it is not None
        self._dirty = True
        b = 0
        while True:
            try:
                out = next(it)
            except StopIteration:
                break
            except RuntimeError as exc:
                self._it = None
                raise self._error(exc, b) from exc
            b += 1
            images, labels = out[0]["images"], out[0]["labels"]
            if labels.shape[0] == 0:  # a shard one sample short of the others ends with an empty batch
                continue
            labels = self._reader.labels(labels).to(device=self._device, dtype=torch.int64, non_blocking=True)
            yield to_model_layout(images, self._device, channels_last=self._s.channels_last, dtype=self._s.dtype), labels
        it.reset()  # starts prefetching the next evaluation
        self._dirty = False


def num_threads(cfg: DataConfig, world_size: int) -> int:
    """``cfg.num_threads``, or this process's share of the CPU cores it may run on."""
    if cfg.num_threads > 0:
        return cfg.num_threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0) or world_size
    return max(1, cores // local)


def pipeline_base(cfg: DataConfig, *, rank: int, world_size: int, local_rank: int, device: torch.device, seed: int,
                  channels_last: bool, dtype: torch.dtype) -> dict:
    """PipelineSettings fields shared by the train and validation pipelines of this rank."""
    gpu = device.type == "cuda"
    decode = cfg.decode_device if cfg.decode_device != "auto" else ("gpu" if gpu else "cpu")
    if decode == "gpu" and not gpu:
        raise UserError(
            f"data.decode_device=gpu needs a CUDA device but the device is {device}: set data.decode_device to auto or cpu"
        )
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"unsupported image dtype {dtype}")
    device_id = (device.index if device.index is not None else local_rank) if gpu else None
    return dict(num_threads=num_threads(cfg, world_size), device_id=device_id,
                decoder="mixed" if decode == "gpu" else "cpu", rank=rank, world_size=world_size, seed=seed,
                channels_last=channels_last, dtype=dtype)


def build_dali_loaders(train: Split | ShardSplit, val: Split | ShardSplit, cfg: DataConfig, *, rank: int,
                       world_size: int, local_rank: int, device: torch.device, seed: int, channels_last: bool,
                       train_batch: int, val_batch: int, verify_root: str,
                       dtype: torch.dtype = torch.float32) -> tuple[TrainLoader, EvalLoader]:
    """Train and validation loaders for one rank of a folder (:class:`Split`) or shard dataset.

    On CUDA the pipelines run on ``device`` (``local_rank`` when it has no index) and their outputs
    stay there; on CPU they are CPU-only pipelines (``device_id=None``).
    """
    base = pipeline_base(cfg, rank=rank, world_size=world_size, local_rank=local_rank, device=device, seed=seed,
                         channels_last=channels_last, dtype=dtype)
    if len(train) < world_size * train_batch:
        raise UserError(
            f"{train.root} has {len(train)} images, fewer than one global batch of {world_size * train_batch}: "
            "lower data.batch_size or add images"
        )
    if len(val) < world_size:
        raise UserError(f"{val.root} has {len(val)} images, fewer than the {world_size} processes: add validation images")
    wrap = ShardReader if isinstance(train, ShardSplit) else FolderReader
    train_loader = TrainLoader(wrap(train), cfg, PipelineSettings(batch=train_batch, **base), device=device,
                               verify_root=verify_root)
    val_loader = EvalLoader(wrap(val), cfg, PipelineSettings(batch=val_batch, **base), device=device,
                            verify_root=verify_root)
    return train_loader, val_loader
