"""DALI pipelines and the loaders that turn their output into model-ready torch tensors.

Importing this module imports DALI; ``fastafd.data`` imports it only when real data is read, so
the package works without DALI for synthetic data.

Readers (:mod:`fastafd.data.dali_readers`): an image folder is read by ``fn.readers.file`` from the
file list made by one scan at start-up (no directory walk per epoch); shards by
``fn.readers.webdataset`` with their DALI index files. Both are sharded by the *global* rank
(``shard_id=rank, num_shards=world_size``). A decode failure is turned into a one-line error naming
the file by :mod:`fastafd.data.decode_errors`.

Training epochs (:class:`TrainLoader`): one pipeline per epoch, built from (seed, epoch, rank,
world size) alone, so an epoch never depends on how the previous one ended (``max_steps_per_epoch``).
The epoch position is global (:mod:`fastafd.data.position`): ``N // G`` steps of one global batch
``G`` each, global step ``j`` being samples ``[j G, (j + 1) G)`` of the epoch's sequence, ``G / W``
per rank in rank order, so a run continues on any number of processes.

* Folder: the sequence is a permutation of the file list drawn from ``(seed, epoch)`` (the same on
  every rank); each rank reads an explicit list, its slices of the epoch's steps, in order
  (``random_shuffle=False``). Every epoch is a new global permutation and the fewer than ``G`` images
  left out change from epoch to epoch. Since the order is known, a file that fails to decode can be named.
* Shards: see :class:`~fastafd.data.dali_readers.ShardReader` (contiguous tar ranges per rank,
  rotated each epoch, read through DALI's shuffle buffer seeded per (seed, epoch, rank); pack wrote
  the training samples in a random order, so every range mixes all classes).
* A resumed run on the same processes restores DALI's pipeline checkpoint (reader position and
  random state: bitwise the batches an uninterrupted run sees); on another number of processes each
  rank reads its share of the remaining steps from a fresh pipeline.

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from fastafd.config import DataConfig
from fastafd.data import position
from fastafd.data.base import DataError, check_split_sizes, to_model_layout
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

from fastafd.data.dali_readers import READER, FolderReader, Plan, Reader, ShardReader, shard_range  # noqa: E402 - after the DALI check


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


def derive_seed(*parts: int) -> int:
    """A well-mixed non-negative 31-bit seed from integers (stable across runs and machines)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0] & 0x7FFFFFFF)


def normalize_args(cfg: DataConfig, s: PipelineSettings) -> dict:
    """crop_mirror_normalize's output: normalised, HWC for channels-last, else CHW."""
    return dict(
        dtype=types.FLOAT16 if s.dtype == torch.float16 else types.FLOAT,
        output_layout="HWC" if s.channels_last else "CHW",
        mean=[255.0 * m for m in cfg.mean],
        std=[255.0 * s for s in cfg.std],
    )


# -- pipelines --------------------------------------------------------------------------------------


@pipeline_def
def train_pipeline(reader: Reader, plan: Plan, cfg: DataConfig, s: PipelineSettings):
    """Read one epoch of this rank's shard, random-resized-crop (ROI decode), draw the flips; on a
    GPU also resize, flip and normalize (outputs: images, labels). Without a GPU the outputs are the
    crops as decoded, the labels and the flips, finished by :class:`CpuFinish`."""
    encoded, lab = reader.node(plan, rank=s.rank, world_size=s.world_size)
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
    images = fn.crop_mirror_normalize(images, mirror=mirror, **normalize_args(cfg, s))
    return images, lab


@pipeline_def
def val_pipeline(reader: Reader, cfg: DataConfig, s: PipelineSettings):
    """Read this rank's fixed shard in order, resize the shorter side, center-crop, normalize."""
    encoded, lab = reader.node(None, rank=s.rank, world_size=s.world_size)
    images = fn.decoders.image(encoded, device=s.decoder, output_type=types.RGB)
    images = fn.resize(images, resize_shorter=round(cfg.image_size / cfg.val_crop_ratio))
    if s.device_id is not None:
        images, lab = images.gpu(), lab.gpu()
    images = fn.crop_mirror_normalize(images, crop=(cfg.image_size, cfg.image_size), **normalize_args(cfg, s))
    return images, lab


# -- loaders ----------------------------------------------------------------------------------------


class TrainLoader:
    """One rank's training loader: a pipeline per epoch (see the module docstring), resume at a global step."""

    def __init__(self, reader: Reader, cfg: DataConfig, settings: PipelineSettings, *, device: torch.device, verify_root: str,
                 global_batch: int) -> None:
        self._reader, self._cfg, self._s, self._device, self._verify_root = reader, cfg, settings, device, verify_root
        self._global_batch = global_batch
        self._len = len(reader) // global_batch
        self._pos = position.EpochPosition(self._len)
        self._saved_world_size: int | None = None  # processes that read the steps before a resume without DALI's checkpoint
        self._resharded = False  # the active pipeline reads the steps left after such a resume (no DALI checkpoint of it)
        self._it: DALIGenericIterator | None = None
        self._plan: Plan | None = None
        self._next: dict | None = None  # the next epoch's pipeline, being built on a helper thread
        self._finish = (CpuFinish(cfg.image_size, cfg.mean, cfg.std, channels_last=settings.channels_last,
                                  dtype=settings.dtype) if settings.device_id is None and settings.cpu_finish else None)

    def __len__(self) -> int:
        return self._len

    def set_epoch(self, epoch: int) -> None:
        """Announce the epoch of the next ``iter()``."""
        self._pos.set_epoch(epoch)

    def _pipeline(self, epoch: int, start: int, checkpoint: str | None, saved_world_size: int | None):
        s = self._s
        plan = self._reader.plan(seed=s.seed, epoch=epoch, rank=s.rank, world_size=s.world_size, batch=s.batch, steps=self._len,
                                 start=start, saved_world_size=saved_world_size)
        # a pipeline for the steps left after a resume on other processes gets a stream of its own
        seed = derive_seed(s.seed, s.rank, epoch, 1) if not start else derive_seed(s.seed, s.rank, epoch, 1, start)
        pipe = train_pipeline(
            self._reader, plan, self._cfg, s,
            batch_size=s.batch, num_threads=s.num_threads, device_id=s.device_id, seed=seed, enable_checkpointing=True,
            checkpoint=base64.b64decode(checkpoint) if checkpoint else None,
        )
        pipe.build()
        return plan, pipe

    def _prebuild(self, epoch: int) -> None:
        """Build epoch ``epoch``'s pipeline on a helper thread while this epoch runs (hides the build)."""
        box: dict = {"epoch": epoch}

        def work() -> None:
            try:
                box["result"] = self._pipeline(epoch, 0, None, None)
            except BaseException as exc:  # noqa: BLE001 - rebuilt (and reported) on the main thread
                box["error"] = exc

        box["thread"] = threading.Thread(target=work, name=f"fastafd-dali-epoch{epoch}", daemon=True)
        box["thread"].start()
        self._next = box

    def _build(self, epoch: int, start: int, checkpoint: str | None) -> DALIGenericIterator:
        self._it = None  # release the previous pipeline's threads and buffers first
        box, self._next = self._next, None
        if box is not None:
            box["thread"].join()
        self._resharded = bool(start) and checkpoint is None
        if checkpoint is not None:  # the same rank resumes: the epoch's full pipeline, its saved position and random state
            plan, pipe = self._pipeline(epoch, 0, checkpoint, None)
        elif start:  # another number of processes (or no saved random state): this rank's share of the steps left
            plan, pipe = self._pipeline(epoch, start, None, self._saved_world_size)
        elif box is not None and box["epoch"] == epoch and "result" in box:
            plan, pipe = box["result"]
        else:
            plan, pipe = self._pipeline(epoch, 0, None, None)
        self._plan = plan
        try:
            if self._finish is None:
                return DALIGenericIterator(pipe, ["images", "labels"], reader_name=READER,
                                           last_batch_policy=LastBatchPolicy.DROP, auto_reset=False)
            dense, ragged = DALIRaggedIterator.DENSE_TAG, DALIRaggedIterator.SPARSE_LIST_TAG
            return DALIRaggedIterator(pipe, ["images", "labels", "flips"], output_types=[ragged, dense, dense],
                                      reader_name=READER, last_batch_policy=LastBatchPolicy.DROP, auto_reset=False)
        except RuntimeError as exc:
            raise self._error(exc, 0) from exc

    def _error(self, exc: Exception, batch: int) -> DataError:
        """``batch``: this rank's batches read by the failing pipeline so far."""
        b, slack, plan = self._s.batch, self._reader.error_slack, self._plan
        samples = plan.samples if plan is not None else []
        # DALI prefetches (2 batches, +1 in the reader); the shard reader's shuffle buffer adds its fill
        lo, hi = max(0, batch * b - slack), min(len(samples), (batch + 4) * b + slack)
        return decode_error(exc, self._reader.root, self._verify_root, lambda: self._reader.candidates(samples[lo:hi]))

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, start, checkpoint = self._pos.begin()
        it = self._build(epoch, start, checkpoint)
        self._it = it
        first = start if checkpoint is not None else 0  # the checkpointed pipeline counts from the epoch's start
        self._prebuild(epoch + 1)
        s = self._s
        for step in range(start, self._len):
            try:
                out = next(it)
            except StopIteration:  # pragma: no cover - the plan always holds the epoch's steps
                raise RuntimeError(f"DALI ended epoch {epoch} after {step} of {self._len} batches") from None
            except RuntimeError as exc:
                self._it = None  # DALI pipelines are unusable after an error
                self._pos.active = None
                raise self._error(exc, step - start + first) from exc
            images, labels = out[0]["images"], out[0]["labels"]
            labels = self._reader.labels(labels).to(device=self._device, dtype=torch.int64, non_blocking=True)
            self._pos.advance(step)
            if self._finish is not None:
                yield self._finish(images, out[0]["flips"].reshape(-1).tolist()), labels
            else:
                yield to_model_layout(images, self._device, channels_last=s.channels_last, dtype=s.dtype), labels
        self._it = None
        self._pos.end()

    def state_dict(self) -> dict:
        """The position to resume from (see :mod:`fastafd.data.position`), with DALI's checkpoint mid-epoch."""
        s = self._s
        epoch, step = self._pos.saved()
        checkpoint = None
        if self._pos.resume is not None:
            checkpoint = self._pos.resume.checkpoint
        elif self._pos.mid_epoch() and self._it is not None and not self._resharded:
            checkpoint = base64.b64encode(self._it.checkpoints()[0]).decode("ascii")
        return position.state(self._reader.kind, seed=s.seed, global_batch=self._global_batch, rank=s.rank,
                              world_size=s.world_size, epoch=epoch, step=step, checkpoint=checkpoint)

    def load_state_dict(self, state: dict) -> None:
        """Resume at ``state``: this rank's own (exact), or rank 0's of a run with another number of processes."""
        s = self._s
        resume = position.check(state, kind=self._reader.kind, seed=s.seed, global_batch=self._global_batch,
                                rank=s.rank, world_size=s.world_size)
        self._saved_world_size = None if resume.checkpoint is not None else int(state["world_size"])
        self._pos.load(resume)


class EvalLoader:
    """One rank's validation loader: the pipeline is built once and reused every evaluation."""

    def __init__(self, reader: FolderReader | ShardReader, cfg: DataConfig, settings: PipelineSettings, *,
                 device: torch.device, verify_root: str) -> None:
        self._reader, self._cfg, self._s, self._device, self._verify_root = reader, cfg, settings, device, verify_root
        begin, end = shard_range(len(reader), settings.rank, settings.world_size)
        self._begin, self._end = begin, end
        self._len = -(-(end - begin) // settings.batch)
        self._it: DALIGenericIterator | None = None
        self._dirty = False

    def _build(self) -> None:
        s = self._s
        self._it = None
        pipe = val_pipeline(self._reader, self._cfg, s, batch_size=s.batch, num_threads=s.num_threads,
                            device_id=s.device_id, seed=derive_seed(s.seed, s.rank, 0, 0))
        try:
            self._it = DALIGenericIterator(pipe, ["images", "labels"], reader_name=READER,
                                           last_batch_policy=LastBatchPolicy.PARTIAL, auto_reset=False)
        except RuntimeError as exc:
            raise self._error(exc, 0) from exc
        self._dirty = False

    def _error(self, exc: Exception, batch: int) -> DataError:
        s = self._s
        lo, hi = self._begin + batch * s.batch, min(self._end, self._begin + (batch + 4) * s.batch)
        return decode_error(exc, self._reader.root, self._verify_root, lambda: self._reader.candidates(list(range(lo, hi))))

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


def build_dali_loaders(train: Split | ShardSplit | None, val: Split | ShardSplit, cfg: DataConfig, *, rank: int,
                       world_size: int, local_rank: int, device: torch.device, seed: int, channels_last: bool,
                       train_batch: int, val_batch: int, verify_root: str, reader: Callable[[Split | ShardSplit], Reader],
                       dtype: torch.dtype = torch.float32) -> tuple[TrainLoader | None, EvalLoader]:
    """Train (None when ``train`` is None: evaluation only) and validation loaders for one rank of a folder
    (:class:`Split`) or shard dataset; ``reader``: the DALI reader of a split (the format's, see
    :mod:`fastafd.data.registry`).

    On CUDA the pipelines run on ``device`` (``local_rank`` when it has no index) and their outputs
    stay there; on CPU they are CPU-only pipelines (``device_id=None``).
    """
    base = pipeline_base(cfg, rank=rank, world_size=world_size, local_rank=local_rank, device=device, seed=seed,
                         channels_last=channels_last, dtype=dtype)
    check_split_sizes(train=(train.root, len(train)) if train is not None else None, val=(val.root, len(val)),
                      global_batch=world_size * train_batch, world_size=world_size)
    wrap = reader
    train_loader = None
    if train is not None:
        train_loader = TrainLoader(wrap(train), cfg, PipelineSettings(batch=train_batch, **base), device=device,
                                   verify_root=verify_root, global_batch=world_size * train_batch)
    val_loader = EvalLoader(wrap(val), cfg, PipelineSettings(batch=val_batch, **base), device=device,
                            verify_root=verify_root)
    return train_loader, val_loader
