"""Shared test helpers: tiny tasks built through the package's real factories."""

import pickle
import struct
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fastafd.config import DataConfig, LoopConfig, MethodConfig, ModelConfig, OptimConfig, TrainConfig
from fastafd.methods import Numerics, build_task, validate
from fastafd.optim import build_stages

SGD = OptimConfig(name="sgd", lr=0.1, lr_batch_ref=0, momentum=0.9, weight_decay=1e-4, milestones=(0.5,))
ADAM = OptimConfig(name="adam", lr=1e-3, lr_batch_ref=0, weight_decay=0.1, milestones=(0.5,))


def tiny_config(peers, method="afd", image_size=32, batch=8, **method_kw) -> TrainConfig:
    """A tiny run's config, checked as the recipes check theirs (:func:`fastafd.methods.validate`)."""
    cfg = TrainConfig(
        model=ModelConfig(peers=tuple(peers), num_classes=10),
        method=MethodConfig(name=method, **method_kw),
        data=DataConfig(format="synthetic", batch_size=batch, image_size=image_size),
        optim=replace(SGD),
        adv_optim=replace(ADAM),
        loop=LoopConfig(epochs=1),
    )
    validate(cfg)
    return cfg


def tiny_task(cfg: TrainConfig, seed=0, compile=False, dtype=torch.float32, device="cpu", channels_last=False,
              scope="regional", backend="inductor"):
    torch.manual_seed(seed)
    device = torch.device(device)
    task = build_task(cfg, cfg.model.num_classes, Numerics(device.type, dtype), device, channels_last)
    if compile:
        task.compile(scope, backend)
    stages = build_stages(task, cfg, device=device, dtype=dtype, steps_per_epoch=100)
    return task, stages


def iterate(task, stages, data, start=0):
    """Run ``task.train_step`` over ``data`` the way the trainer does (schedules, guard)."""
    metrics = None
    for step, (x, y) in enumerate(data, start):
        stages.set_step(step)
        with stages.iteration():
            metrics = task.train_step(x, y, stages)
    return metrics


def batches(n, batch=8, size=32, classes=10, seed=1, device="cpu", channels_last=False):
    g = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = [(torch.randn(batch, 3, size, size, generator=g), torch.randint(0, classes, (batch,), generator=g)) for _ in range(n)]
    return [(x.to(device).contiguous(memory_format=fmt), y.to(device)) for x, y in out]


@torch.no_grad()
def split_bank(bank) -> list:
    """The K discriminators of a :class:`DiscriminatorBank` as separate plain discriminators (copies):
    group k's rows of each grouped layer are discriminator k's layer."""
    from fastafd.bench.reference import RefDiscriminator

    c = bank.conv1.in_channels // bank.k
    c2, c4 = bank.conv1.out_channels // bank.k, bank.c4
    discs = []
    for i in range(bank.k):
        d = RefDiscriminator(c).to(bank.fc_weight)
        d.conv1.weight.copy_(bank.conv1.weight[i * c2 : (i + 1) * c2])
        d.conv2.weight.copy_(bank.conv2.weight[i * c4 : (i + 1) * c4])
        for mine, theirs, n in ((d.bn1, bank.bn1, c2), (d.bn2, bank.bn2, c4)):
            for attr in ("weight", "bias", "running_mean", "running_var"):
                getattr(mine, attr).copy_(getattr(theirs, attr)[i * n : (i + 1) * n])
            mine.num_batches_tracked.copy_(theirs.num_batches_tracked)
        d.fc.weight.copy_(bank.fc_weight[i : i + 1])
        d.fc.bias.copy_(bank.fc_bias[i : i + 1])
        discs.append(d)
    return discs


@torch.no_grad()
def fill_bank(bank, discs) -> None:
    """Inverse of :func:`split_bank`: copy K plain discriminators into the bank."""
    for name in ("conv1", "bn1", "conv2", "bn2"):
        mine = getattr(bank, name)
        for attr in ("weight", "bias", "running_mean", "running_var"):
            if getattr(mine, attr, None) is not None:
                getattr(mine, attr).copy_(torch.cat([getattr(getattr(d, name), attr) for d in discs]))
        if isinstance(mine, torch.nn.BatchNorm2d):
            mine.num_batches_tracked.copy_(discs[0].bn1.num_batches_tracked)
    bank.fc_weight.copy_(torch.cat([d.fc.weight for d in discs]))
    bank.fc_bias.copy_(torch.cat([d.fc.bias for d in discs]))


def snapshot(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def changed(before: dict, module) -> set[str]:
    return {k for k, v in module.named_parameters() if not torch.equal(v, before[k])}


# -- image folders whose images carry their sample id ----------------------------------------------

MEAN = torch.tensor(DataConfig().mean).view(1, 3, 1, 1)
STD = torch.tensor(DataConfig().std).view(1, 3, 1, 1)


def _grey_jpeg(path: Path, grey: int, k: int) -> None:
    Image.new("RGB", (40, 30), (grey,) * 3).save(path, quality=95)


def grey_folder(root: Path, train: tuple[int, ...], val: tuple[int, ...], *, save: Callable[[Path, int, int], None] = _grey_jpeg,
                class_dir: str = "c{c}", file_name: str = "img{i}.JPEG") -> dict[int, int]:
    """An ImageNet-layout folder of constant-grey images, sample k at grey level 4 k (``save(path, grey, k)``);
    ``train``/``val``: images per class. Returns {sample id: class index}; :func:`ids` reads the ids back."""
    owner, k = {}, 0
    for split, counts in (("train", train), ("val", val)):
        for c, n in enumerate(counts):
            d = root / split / class_dir.format(c=c)
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                save(d / file_name.format(i=i, k=k), 4 * k, k)
                owner[k] = c
                k += 1
    return owner


def ids(images: torch.Tensor) -> list[int]:
    """Sample ids of a batch of normalised images from :func:`grey_folder`."""
    grey = (images.float() * STD + MEAN) * 255
    return (grey.mean(dim=(1, 2, 3)) / 4).round().long().tolist()


# -- CIFAR-100 archives ----------------------------------------------------------------------------


class _Py2Pickler(pickle._Pickler):
    """Protocol 2 the way Python 2 wrote it: byte strings as (SHORT_)BINSTRING, not ``_codecs.encode``."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_bytes(self, obj: bytes) -> None:
        n = len(obj)
        self.write((pickle.SHORT_BINSTRING + bytes([n]) if n < 256 else pickle.BINSTRING + struct.pack("<i", n)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_bytes


def py2_dumps(obj: object) -> bytes:
    """``obj`` pickled like the genuine archive (Python 2 cPickle, protocol 2, numpy 1.x module names)."""
    import io

    buf = io.BytesIO()
    _Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def make_cifar(root: Path, n_train=96, n_test=40, dumps: Callable[[object], bytes] = pickle.dumps) -> Path:
    """A cifar-100-python folder of the real format; image i is constant grey 2 * (i % 100)."""
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    for name, n in (("train", n_train), ("test", n_test)):
        grey = np.repeat((2 * (np.arange(n) % 100)).astype(np.uint8)[:, None], 3072, axis=1)
        entry = {b"data": grey, b"fine_labels": [i % 100 for i in range(n)], b"coarse_labels": [0] * n,
                 b"filenames": [f"{i}.png".encode() for i in range(n)], b"batch_label": name.encode()}
        (d / name).write_bytes(dumps(entry))
    meta = {b"fine_label_names": [f"class{c:02d}".encode() for c in range(100)],
            b"coarse_label_names": [b"x"] * 20}
    (d / "meta").write_bytes(dumps(meta))
    return d
