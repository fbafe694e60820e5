"""fastafd.data on the CPU: folder scanning, DALI loaders (sharding, epochs, decoding), demo, synthetic.

Sample identity: every test image is a constant grey level 4 * id, which survives JPEG, random
crops, resizing and flips, so a batch can be mapped back to the files it came from.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from fastafd.config import DataConfig
from fastafd.data import DEMO_CLASSES, DataError, build_data, demo_root, scan_folder
from fastafd.data import demo as demo_mod
from fastafd.errors import UserError
from tests.helpers import MEAN, STD, grey_folder, ids

CPU = torch.device("cpu")
TRAIN_COUNTS = (9, 11, 11)  # 31 training images in classes c0, c1, c2: not a multiple of 2 or 3
VAL_COUNTS = (4, 4, 5)  # 13 validation images: with 2 or 3 ranks, some shards end one batch early


def make_folder(root: Path, train: tuple[int, ...] = TRAIN_COUNTS, val: tuple[int, ...] = VAL_COUNTS) -> dict[int, int]:
    """An ImageNet-layout folder of constant grey images; returns {sample id: class index}."""
    return grey_folder(root, train, val)


def loaders(root: Path, *, rank: int = 0, world_size: int = 1, seed: int = 0, channels_last: bool = False, **kw):
    """build_data on the CPU for one simulated rank; ``kw`` overrides DataConfig fields."""
    cfg = DataConfig(root=root, num_threads=1, **{"image_size": 16, "batch_size": 4, **kw})
    return build_data(cfg, rank=rank, world_size=world_size, local_rank=0, device=CPU, seed=seed,
                      channels_last=channels_last)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, int]]:
    root = tmp_path_factory.mktemp("ds")
    return root, make_folder(root)


def val_ids() -> set[int]:
    return set(range(sum(TRAIN_COUNTS), sum(TRAIN_COUNTS) + sum(VAL_COUNTS)))


# ----------------------------------------------------------------------------- folder scanning


def _layout(tmp_path: Path, spec: dict[str, int]) -> Path:
    """Create files/folders from {relative path: n images (-1: empty folder, -2: a plain file)}."""
    for rel, n in spec.items():
        p = tmp_path / rel
        if n == -2:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text("x")
            continue
        p.mkdir(parents=True, exist_ok=True)
        for i in range(max(n, 0)):
            Image.new("RGB", (8, 8)).save(p / f"{i}.jpg")
    return tmp_path


@pytest.mark.parametrize(
    ("spec", "root_rel", "needle"),
    [
        ({}, "missing", "does not exist"),
        ({"afile": -2}, "afile", "is not a folder"),
        ({"val/a": 1}, "", "no train/ subfolder"),
        ({"train/a": 1}, "", "no val/ subfolder"),
        ({"train/notes.txt": -2, "val/a": 1}, "", "has no class folders"),
        ({"train/a": 1, "val/x.JPEG": -2}, "", "images directly but no class folders"),
        ({"train/a": 2, "train/empty_cls": -1, "val/a": 1}, "", "empty_cls has no images"),
        ({"train/a": -1, "train/b": -1, "val/a": 1}, "", "has class folders but no images"),
        ({"train/a": 1, "val/a": -1}, "", "has class folders but no images"),
        ({"train/a": 1, "val/a": 1, "val/zebra": 1}, "", "not in train/: zebra"),
    ],
)
def test_folder_user_errors(tmp_path: Path, spec: dict[str, int], root_rel: str, needle: str) -> None:
    _layout(tmp_path, spec)
    root = tmp_path / root_rel if root_rel else tmp_path
    with pytest.raises(UserError, match=needle) as info:
        scan_folder(root)
    msg = str(info.value)
    assert "\n" not in msg and str(tmp_path) in msg


def test_class_map_sorted_and_val_labels_by_name(tmp_path: Path) -> None:
    _layout(tmp_path, {"train/zeta": 2, "train/alpha": 1, "train/Mid": 3, "val/zeta": 2, "val/Mid": 1})
    (tmp_path / "train" / "zeta" / "upper.JPG").write_bytes((tmp_path / "train" / "zeta" / "0.jpg").read_bytes())
    (tmp_path / "train" / "zeta" / "skip.txt").write_text("not an image")
    (tmp_path / "train" / ".hidden").mkdir()
    ds = scan_folder(tmp_path)
    assert ds.classes == ["Mid", "alpha", "zeta"]
    assert len(ds.train) == 3 + 1 + 3  # upper-case .JPG counted, .txt and hidden folder not
    assert dict(zip(ds.val.files, ds.val.labels)) == {"Mid/0.jpg": 0, "zeta/0.jpg": 2, "zeta/1.jpg": 2}
    assert all(ds.classes[lab] == f.split("/")[0] for f, lab in zip(ds.train.files, ds.train.labels))


# ----------------------------------------------------------------------------- DALI loaders


def test_train_batches_shape_range_labels_and_drop_last(folder) -> None:
    root, owner = folder
    train, val, info = loaders(root, batch_size=4)
    assert (info.num_classes, info.classes, info.source) == (3, ["c0", "c1", "c2"], "folder")
    assert (info.train_size, info.val_size) == (31, 13)
    assert len(train) == 31 // 4 == 7
    batches = list(train)
    assert len(batches) == 7
    lo, hi = (0 - MEAN) / STD, (1 - MEAN) / STD
    for x, y in batches:
        assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and x.device == CPU
        assert y.shape == (4,) and y.dtype == torch.int64
        assert bool(((x >= lo - 1e-4) & (x <= hi + 1e-4)).all())
        assert [owner[i] for i in ids(x)] == y.tolist()  # labels travel with their images
    seen = [i for x, _ in batches for i in ids(x)]
    assert len(set(seen)) == 28 and set(seen) <= set(range(sum(TRAIN_COUNTS)))


def test_val_normalisation_is_exact(tmp_path: Path) -> None:
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        Image.new("RGB", (32, 20), (200, 100, 50)).save(tmp_path / split / "a" / "x.png")
    _, val, _ = loaders(tmp_path, batch_size=1, image_size=12)
    (x, y), = list(val)
    expected = (torch.tensor([200.0, 100.0, 50.0]).view(1, 3, 1, 1) / 255 - MEAN) / STD
    assert x.shape == (1, 3, 12, 12) and y.tolist() == [0]
    torch.testing.assert_close(x, expected.expand_as(x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("channels_last", [True, False])
def test_memory_format(folder, channels_last: bool) -> None:
    train, val, _ = loaders(folder[0], channels_last=channels_last)
    for x, _ in (next(iter(train)), next(iter(val))):
        assert x.shape[1] == 3
        assert x.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert x.is_contiguous() == (not channels_last)


@pytest.mark.parametrize("world_size", [2, 3])
def test_validation_sees_every_image_exactly_once(folder, world_size: int) -> None:
    root, owner = folder
    per_rank = [loaders(root, rank=r, world_size=world_size, batch_size=2 * world_size, channels_last=True)[1]
                for r in range(world_size)]
    orders = []
    for _epoch in range(2):
        seen: list[int] = []
        for val in per_rank:
            batches = list(val)  # held until the end: buffers must not be reused under us
            assert len(batches) == len(val)
            for x, y in batches:
                assert [owner[i] for i in ids(x)] == y.tolist()
                seen += ids(x)
        assert sorted(seen) == sorted(val_ids())
        orders.append(seen)
    assert orders[0] == orders[1]  # evaluation order is fixed


@pytest.mark.parametrize(("world_size", "batch"), [(2, 7), (3, 3)])
def test_training_shards_are_disjoint_and_even(folder, world_size: int, batch: int) -> None:
    """Three epochs; the (world_size, batch) pairs leave remainders that would misalign the epochs
    if the last partial batch were filled from the next epoch instead of being padded and dropped
    (without a remainder: tests/integration/test_data_pipeline.py, test_union_of_ranks_is_the_dataset_every_epoch)."""
    root, _ = folder
    per_rank = [loaders(root, rank=r, world_size=world_size, batch_size=batch * world_size)[0]
                for r in range(world_size)]
    shard = sum(TRAIN_COUNTS) // world_size
    assert {len(t) for t in per_rank} == {shard // batch}
    orders = []
    for _epoch in range(3):
        shards = []
        for t in per_rank:
            batches = list(t)
            assert len(batches) == len(t) and all(len(y) == batch for _, y in batches)
            shards.append([i for x, _ in batches for i in ids(x)])
        union = [i for s in shards for i in s]
        assert len(union) == len(set(union)) == world_size * (shard // batch) * batch
        orders.append(union)
    assert orders[0] != orders[1] != orders[2]


def test_augmentation_is_seeded(tmp_path: Path) -> None:
    """Four copies of one noise image, so the order cannot matter: only crops and flips can."""
    import numpy as np

    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    for split in ("train", "val"):
        (tmp_path / split / "a").mkdir(parents=True)
        for i in range(4):
            noise.save(tmp_path / split / "a" / f"{i}.png")
    first = [next(iter(loaders(tmp_path, seed=s, image_size=16)[0]))[0] for s in (5, 5, 6)]
    assert torch.equal(first[0], first[1])
    assert not torch.equal(first[0], first[2])
    assert not torch.equal(first[0][0], first[0][1])  # samples of one batch get their own crops


def test_grey_cmyk_and_png_named_jpeg_decode_to_rgb(tmp_path: Path) -> None:
    for split in ("train", "val"):
        d = tmp_path / split / "a"
        d.mkdir(parents=True)
        Image.new("L", (20, 24), 200).save(d / "0grey.JPEG")
        Image.new("CMYK", (20, 24), (0, 255, 255, 0)).save(d / "1cmyk.JPEG")
        Image.new("RGB", (20, 24), (0, 0, 255)).save(d / "2png.JPEG", format="PNG")
    assert Image.open(tmp_path / "val/a/1cmyk.JPEG").mode == "CMYK"
    _, val, _ = loaders(tmp_path, batch_size=3)
    (x, _), = list(val)
    assert x.shape == (3, 3, 16, 16)
    rgb = ((x * STD + MEAN) * 255).mean(dim=(2, 3))
    expected = torch.tensor([[200.0, 200, 200], [255, 0, 0], [0, 0, 255]])
    torch.testing.assert_close(rgb, expected, atol=3.0, rtol=0)


def test_empty_file_mid_epoch_names_the_file(tmp_path: Path) -> None:
    make_folder(tmp_path, train=(8,), val=(12,))
    bad = tmp_path / "val" / "c0" / "img9.JPEG"  # read in the 5th of 6 batches of 2, after the prefetch
    _, val, _ = loaders(tmp_path, batch_size=2)
    bad.write_bytes(b"")  # emptied after start: opening the data checks the validation files' first bytes
    done = 0
    with pytest.raises(DataError, match=re.escape(str(bad))) as info:
        for _ in val:
            done += 1
    assert done >= 1  # the error came mid-epoch, not while building
    assert f"fastafd data verify {tmp_path}" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("defect", ["garbage", "text", "truncated"])
def test_corrupt_image_in_training_names_the_file(tmp_path: Path, defect: str) -> None:
    """DALI's message names no file for a corrupt image: the loader finds it and names it."""
    make_folder(tmp_path, train=(40,), val=(2,))
    bad = tmp_path / "train" / "c0" / "img23.JPEG"
    if defect == "garbage":
        bad.write_bytes(b"\xff\xd8 not really a jpeg" * 10)
    elif defect == "text":
        bad.write_text("<html>404 not found</html>\n" * 20)
    else:
        import numpy as np

        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
        bad.write_bytes(buf.getvalue()[:200])
    train, _, _ = loaders(tmp_path, batch_size=4)
    with pytest.raises(DataError) as info:
        for _ in train:
            pass
    msg = str(info.value)
    assert str(bad) in msg and f"fastafd data verify {tmp_path}" in msg and "\n" not in msg


def test_loader_user_errors(folder, monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = folder
    with pytest.raises(UserError, match="not divisible by the 3 processes"):
        loaders(root, world_size=3, batch_size=4)
    with pytest.raises(UserError, match="val_batch_size"):
        loaders(root, world_size=2, batch_size=4, val_batch_size=5)
    with pytest.raises(UserError, match="fewer than one global batch"):
        loaders(root, batch_size=32)
    with pytest.raises(UserError, match="decode_device=gpu needs a CUDA device"):
        loaders(root, decode_device="gpu")
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # as if DALI were not installed
    monkeypatch.delitem(sys.modules, "fastafd.data.dali", raising=False)
    with pytest.raises(UserError, match="pip install nvidia-dali-cuda130"):
        loaders(root)


def test_import_does_not_need_dali() -> None:
    code = "import sys, fastafd.data; assert 'nvidia.dali' not in sys.modules, 'DALI imported eagerly'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])


def test_num_threads_share(monkeypatch: pytest.MonkeyPatch) -> None:
    from fastafd.data.dali import num_threads

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(8)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert num_threads(DataConfig(), world_size=2) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert num_threads(DataConfig(), world_size=16) == 1
    assert num_threads(DataConfig(num_threads=3), world_size=16) == 3


# ----------------------------------------------------------------------------- demo data


def test_demo_is_deterministic_and_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    roots = []
    for name in ("a", "b"):
        monkeypatch.setenv("FASTAFD_CACHE", str(tmp_path / name))
        roots.append(demo_root(progress=False))
    files = sorted(p.relative_to(roots[0]) for p in roots[0].rglob("*") if p.is_file())
    assert len(files) == 10 * (320 + 60)
    assert all((roots[0] / f).read_bytes() == (roots[1] / f).read_bytes() for f in files)
    assert roots[1] == tmp_path / "b" / "demo-v1" and not list((tmp_path / "b").glob(".demo-v1-*"))
    with Image.open(roots[0] / files[0]) as im:
        assert (im.format, im.size, im.mode) == ("JPEG", (48, 48), "RGB")

    cfg = DataConfig(batch_size=64, image_size=32, num_threads=1)
    train, val, info = build_data(cfg, rank=0, world_size=1, local_rank=0, device=CPU, seed=0, channels_last=False)
    assert (info.source, info.classes, info.train_size, info.val_size) == ("demo", list(DEMO_CLASSES), 3200, 600)
    assert len(train) == 50 and len(val) == 10
    x, y = next(iter(train))
    assert x.shape == (64, 3, 32, 32) and 0 <= int(y.min()) and int(y.max()) < 10
    assert x.std() > 0.3  # real pictures, not blank
    assert sum(x.shape[0] for x, _ in val) == 600


def test_demo_lost_race_uses_the_winner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FASTAFD_CACHE", str(tmp_path))

    def other_process_wins(dest: Path, *, progress: bool) -> None:
        (dest / "mine").write_text("loser")
        winner = tmp_path / "demo-v1"
        winner.mkdir()
        (winner / "theirs").write_text("winner")

    monkeypatch.setattr(demo_mod, "generate", other_process_wins)
    root = demo_root(progress=False)
    assert (root / "theirs").exists() and not (root / "mine").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["demo-v1"]


def test_demo_cache_not_writable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("FASTAFD_CACHE", str(blocker / "cache"))
    with pytest.raises(UserError, match="FASTAFD_CACHE"):
        demo_root(progress=False)


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("FASTAFD_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert demo_mod.cache_dir() == tmp_path / "xdg" / "fastafd"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert demo_mod.cache_dir() == tmp_path / "home" / ".cache" / "fastafd"
    monkeypatch.setenv("FASTAFD_CACHE", str(tmp_path / "mine"))
    assert demo_mod.cache_dir() == tmp_path / "mine"


# ----------------------------------------------------------------------------- synthetic data


def test_synthetic_loaders() -> None:
    cfg = DataConfig(format="synthetic", batch_size=8, val_batch_size=4, image_size=20, synthetic_samples=100,
                     synthetic_classes=7)
    train, val, info = build_data(cfg, rank=1, world_size=2, local_rank=1, device=CPU, seed=3, channels_last=True)
    assert len(train) == 100 // 8 == 12 and len(val) == 2
    batches = list(train)
    assert len(batches) == 12
    for x, y in batches + list(val):
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 20, 20) and x.is_contiguous(memory_format=torch.channels_last)
        assert y.dtype == torch.int64 and 0 <= int(y.min()) and int(y.max()) < 7
    assert batches[0][0].shape[0] == 4 and list(val)[0][0].shape[0] == 2
    assert not torch.equal(batches[0][0], batches[1][0])
    assert (info.source, info.num_classes, info.train_size) == ("synthetic", 7, 96)
    again, _, _ = build_data(cfg, rank=1, world_size=2, local_rank=1, device=CPU, seed=3, channels_last=False)
    x0 = next(iter(again))[0]
    assert x0.is_contiguous() and torch.equal(x0, batches[0][0])
    other_rank, _, _ = build_data(cfg, rank=0, world_size=2, local_rank=0, device=CPU, seed=3, channels_last=True)
    assert not torch.equal(next(iter(other_rank))[0], batches[0][0])
    with pytest.raises(UserError, match="fewer than one global batch"):
        build_data(DataConfig(format="synthetic", batch_size=64, synthetic_samples=32), rank=0, world_size=1,
                   local_rank=0, device=CPU, seed=0, channels_last=False)
