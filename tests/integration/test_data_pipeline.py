"""The data pipeline at scale-relevant behaviour, on CPU: sharding over ranks, mid-epoch resume,
pack -> shards, CIFAR-100 archives, verify and the exclude list.

Sample identity: every image is a constant grey level 4 * id (in RGB, grayscale or CMYK JPEG, or
PNG data under a .JPEG name, at varied sizes), which survives decoding, crops, resizing and flips.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastafd.cli import main as cli_main
from fastafd.config import DataConfig
from fastafd.data import DataError, build_data
from fastafd.data.shards import pack
from fastafd.errors import UserError
from tests.helpers import grey_folder, ids, make_cifar

CPU = torch.device("cpu")
TRAIN, VAL = (12, 12, 12), (4, 5, 4)  # 36 training images: divisible by 2 x 2 and 3 x 2


def save_image(path: Path, grey: int, i: int) -> None:
    """Grey level ``grey`` in one of four encodings and a size that depends on ``i``."""
    size = (24 + 7 * (i % 5), 20 + 5 * (i % 4))
    kind = i % 4
    if kind == 0:
        Image.new("RGB", size, (grey,) * 3).save(path, "JPEG", quality=95)
    elif kind == 1:
        Image.new("L", size, grey).save(path, "JPEG", quality=95)
    elif kind == 2:
        Image.new("CMYK", size, (0, 0, 0, 255 - grey)).save(path, "JPEG", quality=95)
    else:
        Image.new("RGB", size, (grey,) * 3).save(path, "PNG")  # PNG data under a .JPEG name


def make_folder(root: Path, train=TRAIN, val=VAL) -> dict[int, int]:
    return grey_folder(root, train, val, save=save_image, class_dir="k{c}", file_name="im{k:03d}.JPEG")


def loaders(root: Path, *, rank=0, world_size=1, seed=0, per_rank=2, **kw):
    cfg = DataConfig(root=root, num_threads=1, image_size=16, batch_size=per_rank * world_size, **kw)
    return build_data(cfg, rank=rank, world_size=world_size, local_rank=0, device=CPU, seed=seed, channels_last=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    owner = make_folder(root)
    shards = tmp_path_factory.mktemp("packed") / "shards"
    pack(root, shards, shard_samples=5, seed=1, progress=False)
    return {"folder": root, "shards": shards, "owner": owner}


TRAIN_IDS = set(range(sum(TRAIN)))


# ----------------------------------------------------------------------------- sharding


@pytest.mark.parametrize("fmt", ["folder", "shards"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_union_of_ranks_is_the_dataset_every_epoch(data, fmt: str, world_size: int) -> None:
    per_rank = [loaders(data[fmt], rank=r, world_size=world_size, format=fmt)[0] for r in range(world_size)]
    assert {len(t) for t in per_rank} == {sum(TRAIN) // world_size // 2}
    epochs = []
    for epoch in range(2):
        seen = []
        for t in per_rank:
            t.set_epoch(epoch)
            batches = list(t)
            assert len(batches) == len(t)
            for x, y in batches:
                assert [data["owner"][i] for i in ids(x)] == y.tolist()  # labels travel with their images
                seen += ids(x)
        assert sorted(seen) == sorted(TRAIN_IDS)  # every sample once: no loss, no duplicate
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # a new shuffle each epoch


def test_sharding_uses_the_global_rank(data) -> None:
    """Two 'nodes' of two processes: global ranks 0-3 read disjoint data, whatever the local rank."""
    per_rank = [build_data(DataConfig(root=data["folder"], num_threads=1, image_size=16, batch_size=8),
                           rank=r, world_size=4, local_rank=r % 2, device=CPU, seed=0, channels_last=False)[0]
                for r in range(4)]
    seen = [i for t in per_rank for x, _ in t for i in ids(x)]
    assert len(seen) == len(set(seen)) == 4 * (36 // 4 // 2) * 2


def test_ragged_dataset_drops_few_and_different_each_epoch(tmp_path) -> None:
    make_folder(tmp_path, train=(7, 6), val=(2, 2))  # 13 images, 3 ranks x batch 2
    per_rank = [loaders(tmp_path, rank=r, world_size=3)[0] for r in range(3)]
    left_out = []
    for epoch in range(3):
        seen = [i for t in per_rank for x, _ in t for i in ids(x)]
        assert len(seen) == len(set(seen)) == 12
        left_out.append(set(range(13)) - set(seen))
    assert len({frozenset(s) for s in left_out}) > 1


def test_seed_reproduces_and_changes_the_order(data) -> None:
    a = [ids(x) for x, _ in loaders(data["folder"], seed=3)[0]]
    b = [ids(x) for x, _ in loaders(data["folder"], seed=3)[0]]
    c = [ids(x) for x, _ in loaders(data["folder"], seed=4)[0]]
    assert a == b and a != c


# ----------------------------------------------------------------------------- resume


def _epochs(loader, epochs) -> list[list[torch.Tensor]]:
    out = []
    for e in epochs:
        loader.set_epoch(e)
        out.append([x for x, _ in loader])
    return out


@pytest.mark.parametrize("fmt", ["folder", "shards"])
def test_resume_mid_epoch_gives_exactly_the_uninterrupted_batches(data, fmt: str) -> None:
    make = lambda: loaders(data[fmt], rank=1, world_size=2, seed=5, format=fmt)[0]  # noqa: E731
    full = _epochs(make(), [0, 1])

    stopped = make()
    stopped.set_epoch(0)
    it = iter(stopped)
    head = [next(it)[0] for _ in range(3)]
    state = json.loads(json.dumps(stopped.state_dict()))  # what a checkpoint stores
    assert (state["epoch"], state["step"], state["kind"]) == (0, 3, fmt) and state["checkpoint"]
    del it, stopped

    resumed = make()
    resumed.load_state_dict(state)
    assert resumed.state_dict()["step"] == 3
    rest = _epochs(resumed, [0, 1])
    assert len(rest[0]) == len(full[0]) - 3
    for a, b in zip(head + rest[0], full[0]):
        assert torch.equal(a, b)  # same images, same crops and flips
    assert all(torch.equal(a, b) for a, b in zip(rest[1], full[1]))


def test_cut_short_epoch_does_not_change_the_next(data) -> None:
    full = _epochs(loaders(data["folder"], seed=2)[0], [0, 1])
    short = loaders(data["folder"], seed=2)[0]
    short.set_epoch(0)
    for n, _ in enumerate(short):
        if n == 1:
            break  # max_steps_per_epoch
    state = short.state_dict()
    nxt = _epochs(short, [1])[0]
    assert all(torch.equal(a, b) for a, b in zip(nxt, full[1])) and len(nxt) == len(full[1])
    other = loaders(data["folder"], seed=2)[0]
    other.load_state_dict(state)  # saved after the cut: the trainer moves on to epoch 1
    assert all(torch.equal(a, b) for a, b in zip(_epochs(other, [1])[0], full[1]))


def _mid_epoch_state(loader, steps: int, sample=lambda x, y: ids(x)) -> tuple[list[int], dict]:
    """Iterate ``steps`` batches of epoch 0; (their sample ids, the state a checkpoint stores then)."""
    loader.set_epoch(0)
    it = iter(loader)
    seen = [i for _ in range(steps) for i in sample(*next(it))]
    state = json.loads(json.dumps(loader.state_dict()))
    del it
    return seen, state


def test_state_from_another_seed_or_global_batch_is_refused_mid_epoch(data) -> None:
    _, state = _mid_epoch_state(loaders(data["folder"], rank=0, world_size=2)[0], 1)
    with pytest.raises(UserError, match="seed 0 -> 1"):
        loaders(data["folder"], rank=0, world_size=2, seed=1)[0].load_state_dict(state)
    with pytest.raises(UserError, match="global_batch 4 -> 6"):
        loaders(data["folder"], rank=0, world_size=2, per_rank=3)[0].load_state_dict(state)


GLOBAL = 12  # 36 training images: 3 global steps per epoch on any number of processes


@pytest.mark.parametrize("fmt", ["folder", "cifar100"])
@pytest.mark.parametrize("new_world", [1, 3])
def test_resume_on_another_number_of_processes_sees_every_sample_once(data, tmp_path, fmt: str, new_world: int) -> None:
    """2 processes take one global step, a checkpoint, then 1 or 3 processes finish the epoch: each of the
    epoch's 3 x 12 samples exactly once, and the next epoch is the one the new processes would read anyway."""
    if fmt == "cifar100":
        root = make_cifar(tmp_path, n_train=36, n_test=12)  # sample i has label i: the label names it
        cfg = DataConfig(root=root, format="cifar100", batch_size=GLOBAL, image_size=32, num_threads=1)
        make = lambda r, w: build_data(cfg, rank=r, world_size=w, local_rank=0, device=CPU, seed=0, channels_last=False)[0]  # noqa: E731
        sample = lambda x, y: y.tolist()  # noqa: E731
    else:
        make = lambda r, w: loaders(data["folder"], rank=r, world_size=w, per_rank=GLOBAL // w)[0]  # noqa: E731
        sample = lambda x, y: ids(x)  # noqa: E731
    first, states = [], []
    for r in range(2):
        seen, state = _mid_epoch_state(make(r, 2), 1, sample)
        first += seen
        states.append(state)
    assert len(first) == GLOBAL and states[0]["step"] == 1
    rest = []
    for r in range(new_world):
        loader = make(r, new_world)
        loader.load_state_dict(states[0])  # what every new rank gets: rank 0's global position
        loader.set_epoch(0)
        batches = list(loader)
        assert len(batches) == 2 and all(x.shape[0] == GLOBAL // new_world for x, _ in batches)
        rest += [v for x, y in batches for v in sample(x, y)]
    everything = first + rest
    assert len(everything) == len(set(everything)) == 3 * GLOBAL  # nothing twice, nothing lost
    if fmt == "folder":
        assert set(everything) <= TRAIN_IDS
    fresh, resumed = make(0, new_world), make(0, new_world)
    fresh.set_epoch(1)
    resumed.load_state_dict(states[0])
    resumed.set_epoch(0)
    list(resumed)
    assert [sample(x, y) for x, y in resumed] == [sample(x, y) for x, y in fresh]  # epoch 1 as if started there


def test_shards_resume_on_another_number_of_processes_takes_the_steps_left(data) -> None:
    """Shards cannot split a shuffle buffer: the new ranks read what each old range has left after the
    consumed steps, through filtered indexes; the right number of batches, and labels match their images."""
    make = lambda r, w: loaders(data["shards"], rank=r, world_size=w, per_rank=GLOBAL // w, format="shards")[0]  # noqa: E731
    _, state = _mid_epoch_state(make(0, 2), 1)
    for r in range(3):
        loader = make(r, 3)
        loader.load_state_dict(state)
        loader.set_epoch(0)
        batches = list(loader)
        assert len(batches) == 2 and all(x.shape[0] == 4 for x, _ in batches)
        for x, y in batches:
            assert [data["owner"][i] for i in ids(x)] == y.tolist()


# ----------------------------------------------------------------------------- pack and shards


def test_pack_keeps_labels_and_shards_train_like_the_folder(data) -> None:
    meta = json.loads((data["shards"] / "classes.json").read_text())
    assert meta["classes"] == ["k0", "k1", "k2"] and (meta["train"], meta["val"]) == (36, 13)
    for fmt in ("folder", "shards"):
        train, val, info = loaders(data[fmt], format="auto")
        assert info.source == fmt and info.classes == ["k0", "k1", "k2"]
        for loader in (train, val):
            pairs = [(i, lab) for x, y in loader for i, lab in zip(ids(x), y.tolist())]
            assert pairs and all(data["owner"][i] == lab for i, lab in pairs)
        assert sorted(i for x, _ in val for i in ids(x)) == list(range(36, 49))


def test_shard_without_index_or_with_a_wrong_one_fails_before_training(data, tmp_path) -> None:
    bad = tmp_path / "s"
    shutil.copytree(data["shards"], bad)
    (bad / "train" / "shard-000003.idx").unlink()
    with pytest.raises(UserError, match=r"shard-000003.tar has no index .*wds2idx"):
        loaders(bad, format="shards")
    shutil.copy(bad / "train" / "shard-000000.idx", bad / "train" / "shard-000003.idx")  # another shard's index
    with pytest.raises(UserError, match=r"index .*shard-000003.idx does not match its shard"):
        loaders(bad, format="shards")
    shutil.copy(data["shards"] / "train" / "shard-000003.idx", bad / "train" / "shard-000003.idx")
    tar = bad / "train" / "shard-000001.tar"
    tar.write_bytes(tar.read_bytes()[:2048])  # truncated shard
    with pytest.raises(UserError, match=r"shard-000001.idx does not match"):
        loaders(bad, format="shards")


def test_corrupt_sample_in_a_shard_is_named(data, tmp_path) -> None:
    bad = tmp_path / "s"
    shutil.copytree(data["shards"], bad)
    idx = (bad / "train" / "shard-000002.idx").read_text().splitlines()[2].split()
    off, size, name = int(idx[1]), int(idx[2]), idx[3]
    with open(bad / "train" / "shard-000002.tar", "r+b") as fh:
        fh.seek(off)
        fh.write(b"\x00" * size)  # same size: the index still matches, the image is garbage
    train, _, _ = loaders(bad, format="shards")
    with pytest.raises(DataError, match=rf"shard-000002.tar:{name}.*fastafd data verify"):
        list(train)


# ----------------------------------------------------------------------------- verify and exclude


def test_verify_finds_each_planted_defect_and_the_exclude_list_trains(data, tmp_path, capsys) -> None:
    root = tmp_path / "ds"
    shutil.copytree(data["folder"], root)
    planted = {
        "train/k0/im000.JPEG": b"",  # zero bytes
        "train/k0/im004.JPEG": b"<html><body>404 Not Found</body></html>\n",  # text under an image name
        "train/k1/im012.JPEG": (root / "train/k1/im012.JPEG").read_bytes()[:300],  # truncated JPEG
        "val/k2/im045.JPEG": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4,  # corrupt JPEG
    }
    for rel, content in planted.items():
        (root / rel).write_bytes(content)
    (root / "train" / "k9").mkdir()  # empty class folder
    exclude = tmp_path / "exclude.txt"
    code = cli_main(["data", "verify", str(root), "--exclude-out", str(exclude), "--no-progress", "--workers", "1"])
    out = capsys.readouterr().out
    assert code == 1
    errors = {ln.split()[1].rstrip(":"): ln for ln in out.splitlines() if ln.strip().startswith("ERROR")}
    assert set(errors) == set(planted) | {"train/k9"}
    assert "zero-byte" in errors["train/k0/im000.JPEG"] and "text" in errors["train/k0/im004.JPEG"]
    assert "truncated" in errors["train/k1/im012.JPEG"]
    notes = out.split("notes by kind:")[1]
    assert "grayscale" in notes and "CMYK" in notes and "PNG data under a JPEG name" in notes
    assert sorted(exclude.read_text().split()) == sorted(planted)

    (root / "train" / "k9").rmdir()
    assert cli_main(["data", "verify", str(root), "--no-progress"]) == 1  # the files are still there
    for fmt, path in (("folder", root), ("shards", tmp_path / "packed")):
        if fmt == "shards":
            shutil.copytree(data["shards"], path)  # packed before the damage: the exclude list drops samples
        train, val, info = loaders(path, format=fmt, exclude=exclude)
        assert (info.train_size, info.val_size) == (36 - 3, 13 - 1)
        seen = [i for x, _ in train for i in ids(x)] + [i for x, _ in val for i in ids(x)]
        assert not {0, 4, 12, 45} & set(seen)


def test_pack_honours_the_exclude_list(data, tmp_path) -> None:
    exclude = tmp_path / "ex.txt"
    exclude.write_text("# bad files\ntrain/k0/im001.JPEG\n\nval/k1/im041.JPEG\n")
    meta = pack(data["folder"], tmp_path / "out", shard_samples=100, exclude=exclude, progress=False)
    assert (meta["train"], meta["val"]) == (35, 12)


def test_cli_data_errors_are_one_line(tmp_path, capsys) -> None:
    assert cli_main(["data", "verify", str(tmp_path / "missing")]) == 2
    assert cli_main(["data", "pack", str(tmp_path / "missing"), str(tmp_path / "o")]) == 2
    assert cli_main(["data", "frobnicate"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("fastafd: error:") for line in err)


# ----------------------------------------------------------------------------- CIFAR-100


def test_cifar_pad4_crop_flip_normalize_and_sharding(tmp_path) -> None:
    d = make_cifar(tmp_path)
    # one distinctive image: a gradient, to check the crop offsets and flips exactly
    raw = pickle.loads((d / "train").read_bytes())
    grad = np.tile(np.arange(32, dtype=np.uint8)[None, :] * 7, (32, 1))
    raw[b"data"] = np.repeat(np.stack([grad, grad, grad]).reshape(1, 3072), 96, axis=0)
    (d / "train").write_bytes(pickle.dumps(raw))
    cfg = DataConfig(root=tmp_path, format="auto", batch_size=8, image_size=32, num_threads=1, mean=(0, 0, 0), std=(1, 1, 1))
    train, val, info = build_data(cfg, rank=0, world_size=1, local_rank=0, device=CPU, seed=0, channels_last=False)
    assert (info.source, info.num_classes, info.train_size, info.val_size) == ("cifar100", 100, 96, 40)
    from fastafd.data.cifar import epoch_plan

    plan = epoch_plan(96, seed=0, epoch=0, pad=4, hflip=0.5)
    x = torch.cat([x for x, _ in train])
    padded = np.pad(grad, 4)
    for k in range(len(x)):
        ref = padded[plan.dy[k]:plan.dy[k] + 32, plan.dx[k]:plan.dx[k] + 32]
        ref = ref[:, ::-1] if plan.flip[k] else ref
        np.testing.assert_allclose(x[k, 0].numpy() * 255, ref, atol=1e-3)
    assert len(set(plan.dx.tolist())) == 9 and 0 < plan.flip.mean() < 1
    seen = []
    for r in range(3):
        cfg3 = DataConfig(root=d, format="cifar100", batch_size=12, num_threads=1, image_size=32)
        t, v, _ = build_data(cfg3, rank=r, world_size=3, local_rank=0, device=CPU, seed=0, channels_last=True)
        assert len(t) == 96 // 3 // 4
        seen += [lab for _, y in v for lab in y.tolist()]
    assert sorted(seen) == sorted(i % 100 for i in range(40))


def test_cifar_resume_mid_epoch(tmp_path) -> None:
    d = make_cifar(tmp_path)
    cfg = DataConfig(root=d, format="cifar100", batch_size=8, image_size=32, num_threads=1)
    make = lambda: build_data(cfg, rank=0, world_size=1, local_rank=0, device=CPU, seed=1, channels_last=True)[0]  # noqa: E731
    full = _epochs(make(), [0, 1])
    a = make()
    a.set_epoch(0)
    it = iter(a)
    head = [next(it)[0] for _ in range(5)]
    b = make()
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    rest = _epochs(b, [0, 1])
    assert all(torch.equal(p, q) for p, q in zip(head + rest[0], full[0])) and len(head + rest[0]) == len(full[0])
    assert all(torch.equal(p, q) for p, q in zip(rest[1], full[1]))


def test_cifar_archive_trains_through_the_cifar_recipe(tmp_path, capsys) -> None:
    make_cifar(tmp_path / "data", n_train=256, n_test=64)
    out = tmp_path / "run"
    code = cli_main(["train", "--recipe", "cifar100_resnet32_afd", "--data", str(tmp_path / "data"), "--out", str(out),
                     "--model.peers", "cifar_resnet8", "cifar_resnet8", "--loop.epochs", "1",
                     "--loop.max_steps_per_epoch", "2", "--data.batch_size", "32", "--data.num_threads", "1"])
    assert code == 0, capsys.readouterr().err[-2000:]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"]["format"] == "cifar100" and cfg["data"]["crop_padding"] == 4
    env = json.loads((out / "env.json").read_text())
    assert env["dataset"]["source"] == "cifar100" and env["dataset"]["num_classes"] == 100


# ----------------------------------------------------------------------------- dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_images_in_the_training_dtype(data, dtype) -> None:
    cfg = DataConfig(root=data["folder"], num_threads=1, image_size=16, batch_size=4)
    train, val, _ = build_data(cfg, rank=0, world_size=1, local_rank=0, device=CPU, seed=0, channels_last=True, dtype=dtype)
    for x, _ in (next(iter(train)), next(iter(val))):
        assert x.dtype == dtype and x.is_contiguous(memory_format=torch.channels_last)
    ref = next(iter(build_data(cfg, rank=0, world_size=1, local_rank=0, device=CPU, seed=0, channels_last=True)[0]))[0]
    torch.testing.assert_close(next(iter(train))[0].float(), ref, atol=0.02, rtol=0.01)




def test_evaluation_data_needs_no_training_split(tmp_path) -> None:
    """`fastafd eval --data DIR` builds only the validation pipeline: DIR/train may be absent, and when it is
    there its images are not scanned (the labels come from its class folder names)."""
    make_folder(tmp_path / "ds")
    shutil.rmtree(tmp_path / "ds" / "train")
    cfg = DataConfig(root=tmp_path / "ds", num_threads=1, image_size=16, batch_size=256)  # bigger than any split
    train, val, info = build_data(cfg, rank=0, world_size=1, local_rank=0, device=CPU, seed=0, channels_last=False, train=False)
    assert train is None and info.val_size == sum(VAL) and info.train_size == 0
    assert sum(x.shape[0] for x, _ in val) == sum(VAL)
    with pytest.raises(UserError, match="has no train/ subfolder"):
        build_data(cfg, rank=0, world_size=1, local_rank=0, device=CPU, seed=0, channels_last=False)
