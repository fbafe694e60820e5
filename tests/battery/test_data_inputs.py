"""Hostile data inputs (issue 17, data side): no code run from data files, one line instead of a
traceback, nothing lost or written.

``CASES`` is the table (one world and one command per row, run by ``tests/battery/harness.py``);
the tests after it check what does not fit a row.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastafd.cli import main as cli_main
from fastafd.config import DataConfig
from fastafd.data import DataError, build_data
from fastafd.data.cifar import load_cifar100
from fastafd.data.folder import read_exclude
from fastafd.data.shards import pack, read_shards
from fastafd.errors import UserError
from tests.battery.harness import Case, run_case
from tests.helpers import grey_folder, make_cifar, py2_dumps

# -- worlds -----------------------------------------------------------------------------------------


class _RunsCode:
    """Unpickling this runs ``touch <marker>``: what a crafted data file can do to a plain ``pickle.load``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _evil_cifar(tmp: Path, member: str = "train") -> Path:
    """A cifar-100-python folder whose ``member`` pickle runs a command when loaded."""
    d = make_cifar(tmp / "data", n_train=8, n_test=4)
    (d / member).write_bytes(pickle.dumps({b"data": _RunsCode(tmp / "marker"), b"fine_labels": [0]}))
    return d


def _folder(tmp: Path, name: str = "folder") -> Path:
    """An ImageNet-layout folder: 3 classes, 4 train + 2 val images each."""
    grey_folder(tmp / name, (4, 4, 4), (2, 2, 2))
    return tmp / name


def _shards(tmp: Path) -> Path:
    """``fastafd data pack`` of :func:`_folder`, 5 samples per shard."""
    pack(_folder(tmp), tmp / "shards", shard_samples=5, progress=False)
    return tmp / "shards"


def _poke_label(shards: Path, label: bytes, split: str = "train", sample: int = 2) -> Path:
    """Overwrite the ``.cls`` member of one sample of the first shard in place (the index still matches)."""
    line = (shards / split / "shard-000000.idx").read_text().splitlines()[1 + sample].split()
    cls = line.index("cls")
    offset, size = int(line[cls + 1]), int(line[cls + 2])
    assert len(label) == size
    with open(shards / split / "shard-000000.tar", "r+b") as fh:
        fh.seek(offset)
        fh.write(label)
    return shards


def _with(root: Path, rel: str, data: bytes) -> Path:
    """``root`` with the file ``rel`` holding ``data``."""
    (root / rel).write_bytes(data)
    return root


def _poke_image(shards: Path, data: bytes, split: str = "val", sample: int = 1) -> Path:
    """Overwrite the start of one sample's image in the first shard in place (the index still matches)."""
    line = (shards / split / "shard-000000.idx").read_text().splitlines()[1 + sample].split()
    with open(shards / split / "shard-000000.tar", "r+b") as fh:
        fh.seek(int(line[1]))
        fh.write(data[: int(line[2])])
    return shards


def _edit_classes(shards: Path, classes: object) -> Path:
    meta = json.loads((shards / "classes.json").read_text())
    meta["classes"] = classes
    (shards / "classes.json").write_text(json.dumps(meta))
    return shards


def _link(tmp: Path, rel: str, target: str) -> Path:
    """:func:`_folder` with a symbolic link ``rel`` -> ``target`` in it."""
    root = _folder(tmp)
    os.symlink(target, root / rel)
    return root


def _exclude(tmp: Path, content: bytes) -> Path:
    (tmp / "exclude.txt").write_bytes(content)
    return tmp / "exclude.txt"


def _foreign_classes_json(tmp: Path) -> Path:
    """An image folder that ships its own classes.json (not a fastafd class map)."""
    root = _folder(tmp)
    (root / "classes.json").write_text(json.dumps({"c0": "tench", "c1": "goldfish", "c2": "shark"}))
    return root


def _train(data: Path, tmp: Path, *extra: str) -> list[str]:
    """A tiny CPU training command over ``data``, writing only under ``tmp/run``."""
    return ["train", "--data", str(data), "--out", str(tmp / "run"), "--model.peers", "cifar_resnet8", "cifar_resnet8",
            "--data.batch_size", "4", "--data.image_size", "16", "--data.num_threads", "1", "--loop.epochs", "1",
            "--log.progress", "off", "--log.tensorboard", "off", *extra]


# -- the table --------------------------------------------------------------------------------------

CASES = [
    Case("cifar-pickle-runs-code",
         lambda t: _train(_evil_cifar(t).parent, t, "--recipe", "cifar100_resnet32_afd", "--data.image_size", "32"),
         needle="is not a genuine CIFAR-100 archive", created=lambda t: [t / "marker", t / "run"]),
    # shard labels and the class map
    Case("shard-label-beyond-classes", lambda t: _train(_poke_label(_shards(t), b"000007"), t),
         needle="label 7 is outside the 3 classes (valid: 0..2)"),
    Case("shard-label-not-digits", lambda t: _train(_poke_label(_shards(t), b"00001x", split="val", sample=1), t),
         needle="label b'00001x' is not 6 ASCII digits"),
    Case("classes-json-fewer-classes", lambda t: _train(_edit_classes(_shards(t), ["c0", "c1"]), t),
         needle="label 2 is outside the 2 classes (valid: 0..1)"),
    Case("classes-json-a-string", lambda t: _train(_edit_classes(_shards(t), "c0c1x"), t),
         needle="'classes' is a str, not a list"),
    Case("classes-json-duplicate", lambda t: _train(_edit_classes(_shards(t), ["c0", "c1", "c0"]), t),
         needle="names 'c0' twice"),
    Case("classes-json-empty-name", lambda t: _train(_edit_classes(_shards(t), ["c0", "", "c2"]), t),
         needle="entry 1 is '', not a class name"),
    # folders: links, exclude lists, a class map that is not ours
    Case("symlink-loop-image", lambda t: _train(_link(t, "train/c0/loop.JPEG", "loop.JPEG"), t),
         needle="loop.JPEG cannot be followed (Too many levels of symbolic links): a symbolic link loop"),
    Case("symlink-loop-class", lambda t: _train(_link(t, "train/c9", "c9"), t), needle="a symbolic link loop"),
    Case("symlink-loop-verify", lambda t: ["data", "verify", str(_link(t, "val/c1/x.JPEG", "x.JPEG")), "--no-progress"],
         needle="a symbolic link loop"),
    Case("symlink-to-nothing-class", lambda t: _train(_link(t, "train/c3", "../../elsewhere/c3"), t),
         needle="train/c3 is a symbolic link to nothing"),
    Case("exclude-binary", lambda t: _train(_folder(t), t, "--data.exclude", str(_exclude(t, b"train/\xff\xfe\x00x\n"))),
         needle="is not a UTF-8 text file (byte 0xff at offset 6)"),
    Case("exclude-absolute-elsewhere",
         lambda t: _train(_folder(t), t, "--data.exclude", str(_exclude(t, f"{t}/other/train/c0/img0.JPEG\n".encode()))),
         needle="which is not under the dataset folder"),
    Case("exclude-climbs-out", lambda t: _train(_folder(t), t, "--data.exclude", str(_exclude(t, b"../x/img0.JPEG\n"))),
         needle="which is not a file under the dataset folder"),
    Case("pack-exclude-absolute-elsewhere",
         lambda t: ["data", "pack", str(_folder(t)), str(t / "out"), "--exclude", str(_exclude(t, b"/etc/hosts\n"))],
         needle="which is not under the dataset folder", created=lambda t: [t / "out"]),
    Case("classes-json-in-an-image-folder", lambda t: _train(_foreign_classes_json(t), t),
         needle="if it is an image folder, pass --data.format folder"),
    Case("classes-json-in-an-image-folder-verify",
         lambda t: ["data", "verify", str(_foreign_classes_json(t)), "--no-progress"],
         needle="if it is an image folder, pass --format folder"),
    # validation images that the first evaluation would stop at: found when the data is opened
    Case("val-gif-under-a-jpeg-name", lambda t: _train(_with(_folder(t), "val/c1/img1.JPEG", _encoded("gif")), t),
         needle="val/c1/img1.JPEG: GIF data, which DALI cannot decode"),
    Case("val-empty-and-text", lambda t: _train(_with(_with(_folder(t), "val/c0/img0.JPEG", b""), "val/c2/img1.JPEG",
                                                      b"<html>404</html>"), t),
         needle="val/c0/img0.JPEG: zero-byte file (and 1 more validation images)"),
    Case("train-gif-under-a-jpeg-name", lambda t: _train(_with(_folder(t), "train/c2/img3.JPEG", _encoded("gif")), t),
         needle="train/c2/img3.JPEG (GIF data, which DALI cannot decode", frozen=lambda t: [t / "folder"]),
    Case("val-shard-sample-is-text", lambda t: _train(_poke_image(_shards(t), b"not an image, just text"), t),
         needle="text, not an image"),
    # pack's output
    Case("pack-onto-a-file", lambda t: ["data", "pack", str(_folder(t)), str(_exclude(t, b"precious\n"))],
         needle="exists and is not a folder"),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_hostile_data_input(case: Case, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run_case(case, tmp_path, capsys)


# -- CIFAR-100: the archive is data, never code ---------------------------------------------------


@pytest.mark.parametrize("member", ["train", "test", "meta"])
def test_a_crafted_cifar_pickle_runs_no_code(tmp_path: Path, member: str) -> None:
    d = _evil_cifar(tmp_path, member)
    with pytest.raises(UserError) as info:
        load_cifar100(d)
    msg = str(info.value)
    assert not (tmp_path / "marker").exists(), "the pickle ran its command"
    assert str(d / member) in msg and "system" in msg and "not a genuine CIFAR-100 archive" in msg and "\n" not in msg


def test_the_genuine_archive_format_loads(tmp_path: Path) -> None:
    """The archive as Python 2 wrote it (protocol 2, numpy.core names, byte strings) and as numpy >= 2
    re-pickles it (numpy._core names) both load; these are the only globals either refers to."""
    for name, dumps in (("py2", py2_dumps), ("py3", lambda o: pickle.dumps(o, protocol=4))):
        d = make_cifar(tmp_path / name, n_train=8, n_test=4, dumps=dumps)
        refs = {arg for f in ("train", "test", "meta") for op, arg, _ in pickletools.genops((d / f).read_bytes())
                if op.name == "GLOBAL"}
        if name == "py2":
            assert refs == {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}
        ds = load_cifar100(d)
        assert (len(ds.train), len(ds.val), len(ds.classes)) == (8, 4, 100)
        assert ds.classes[7] == "class07" and ds.train.labels.tolist() == list(range(8))
        np.testing.assert_array_equal(ds.train.images[3], np.full((32, 32, 3), 6, np.uint8))


# -- shards: labels -------------------------------------------------------------------------------


def test_the_shard_label_error_names_shard_sample_and_range(tmp_path: Path) -> None:
    shards = _poke_label(_shards(tmp_path), b"000003", sample=4)
    name = (shards / "train" / "shard-000000.idx").read_text().splitlines()[5].split()[3]
    with pytest.raises(UserError) as info:
        read_shards(shards)
    msg = str(info.value)
    assert f"shard {shards / 'train' / 'shard-000000.tar'} sample {name}: label 3" in msg and "0..2" in msg


def test_pack_keys_class_names_with_spaces_so_the_index_reads_back(tmp_path: Path) -> None:
    grey_folder(tmp_path / "f", (2, 2), (1, 1), class_dir="my class {c}", file_name="im {i}.v2.JPEG")
    pack(tmp_path / "f", tmp_path / "s", progress=False)
    ds = read_shards(tmp_path / "s")
    assert ds.classes == ["my class 0", "my class 1"] and len(ds.train) == 4
    assert sorted(s.name for s in ds.val.samples) == ["my_class_0/im_0_v2.jpg", "my_class_1/im_0_v2.jpg"]


# -- verify: the decoder rules of training, every format training reads ---------------------------


def _encoded(kind: str) -> bytes:
    """An image in format ``kind``, meant to be saved under a .JPEG name."""
    im = Image.new("RGB", (24, 20), (90, 120, 150))
    buf = io.BytesIO()
    if kind == "png-without-end":
        im.save(buf, "PNG")
        return buf.getvalue()[:-12]  # IEND chunk cut off: PIL decodes it, DALI does not
    fmt, mode = {"gif": ("GIF", "P"), "ico": ("ICO", "RGB"), "tga": ("TGA", "RGB"), "tiff-bilevel": ("TIFF", "1"),
                 "png-alpha": ("PNG", "RGBA"), "bmp": ("BMP", "RGB"), "tiff": ("TIFF", "RGB"), "webp": ("WEBP", "RGB"),
                 "ppm": ("PPM", "RGB"), "jpeg2000": ("JPEG2000", "RGB")}[kind]
    im.convert(mode).save(buf, fmt)
    return buf.getvalue()


REFUSED = ("gif", "ico", "tga", "png-without-end", "tiff-bilevel")
"""Formats PIL opens and DALI's decoder (so training) refuses."""
DECODED = ("png-alpha", "bmp", "tiff", "webp", "ppm", "jpeg2000")


def _loader_fails(tmp: Path, data: bytes) -> bool:
    """Whether training's validation loader stops at an image with these bytes (when it decodes them:
    the image is written after the data is opened, which checks their first bytes)."""
    grey_folder(tmp, (2,), (1,))
    cfg = DataConfig(root=tmp, num_threads=1, image_size=16, batch_size=2)
    _, val, _ = build_data(cfg, rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), seed=0, channels_last=False)
    (tmp / "val" / "c0" / "img0.JPEG").write_bytes(data)
    try:
        list(val)
    except DataError:
        return True
    return False


def test_verify_refuses_exactly_what_training_refuses(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = _folder(tmp_path)
    for kind in REFUSED + DECODED:
        (root / "val" / "c1" / f"{kind}.JPEG").write_bytes(_encoded(kind))
    for kind in REFUSED + DECODED[:1]:  # the ground truth: training's loader on each file alone
        assert _loader_fails(tmp_path / f"alone-{kind}", _encoded(kind)) == (kind in REFUSED), kind
    exclude = tmp_path / "bad.txt"
    code = cli_main(["data", "verify", str(root), "--exclude-out", str(exclude), "--no-progress", "--workers", "1"])
    out = capsys.readouterr().out
    assert code == 1
    errors = {ln.split()[1].rstrip(":"): ln for ln in out.splitlines() if ln.strip().startswith("ERROR")}
    assert set(errors) == {f"val/c1/{k}.JPEG" for k in REFUSED}
    assert "GIF data, which DALI cannot decode" in errors["val/c1/gif.JPEG"]
    assert sorted(exclude.read_text().split()) == sorted(errors)
    notes = {ln.split()[1].rstrip(":") for ln in out.splitlines() if ln.strip().startswith("note")}
    assert {f"val/c1/{k}.JPEG" for k in DECODED} <= notes  # decodable, but not JPEG data under a JPEG name
    _, val, info = build_data(DataConfig(root=root, num_threads=1, image_size=16, batch_size=2, exclude=exclude),
                              rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), seed=0, channels_last=False)
    assert sum(len(y) for _, y in val) == info.val_size == 6 + len(DECODED)  # what verify passed, training reads


def test_verify_understands_shards(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    shards = _shards(tmp_path)
    assert cli_main(["data", "verify", str(shards), "--no-progress"]) == 0, capsys.readouterr()
    assert "(shards): 18 samples, 0 errors" in capsys.readouterr().out
    _poke_label(shards, b"000009", sample=1)
    idx = (shards / "val" / "shard-000001.idx").read_text().splitlines()[1].split()
    with open(shards / "val" / "shard-000001.tar", "r+b") as fh:  # a GIF in place of one image, same size
        gif = _encoded("gif")
        fh.seek(int(idx[1]))
        fh.write((gif + b"\0" * int(idx[2]))[: int(idx[2])])
    exclude = tmp_path / "bad.txt"
    assert cli_main(["data", "verify", str(shards), "--exclude-out", str(exclude), "--no-progress"]) == 1
    out = capsys.readouterr().out
    train_name = (shards / "train" / "shard-000000.idx").read_text().splitlines()[2].split()[3]
    assert f"ERROR train/{train_name}: label 9 is outside the 3 classes" in out
    assert f"ERROR val/{idx[3]}: GIF data" in out
    assert sorted(exclude.read_text().split()) == sorted([f"train/{train_name}", f"val/{idx[3]}"])
    ds = read_shards(shards, read_exclude(exclude, shards))  # the exclude list drops both: the shards open
    assert (len(ds.train), len(ds.val)) == (11, 5)


def test_verify_understands_the_cifar_archive(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    make_cifar(tmp_path / "data", n_train=8, n_test=4)
    assert cli_main(["data", "verify", str(tmp_path / "data"), "--no-progress"]) == 0
    assert "(cifar100): 12 images, 0 errors" in capsys.readouterr().out
    evil = _evil_cifar(tmp_path / "evil")
    assert cli_main(["data", "verify", str(evil), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a genuine CIFAR-100 archive" in err[0]
    assert not (tmp_path / "evil" / "marker").exists()


# -- folders, exclude lists, pack, eval -----------------------------------------------------------


def _deny(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, path: Path, *calls: str) -> None:
    """Make ``path`` (and what lies under it) unreadable and unwritable: chmod 000 where permissions
    bite; as root, where they do not, the ``os`` calls named in ``calls`` raise EACCES for it instead."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0)
        request.addfinalizer(lambda: path.chmod(mode))
        return
    inside = str(path)
    for name in calls:
        real = getattr(os, name)

        def denied(p, *a, _real=real, **kw):
            if str(p) == inside or str(p).startswith(inside + os.sep):
                raise PermissionError(13, "Permission denied", str(p))
            return _real(p, *a, **kw)

        monkeypatch.setattr(os, name, denied)


def test_an_unreadable_class_folder_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                 request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    for args in (lambda t: _train(t / "folder", t), lambda t: ["data", "verify", str(t / "folder"), "--no-progress"]):
        world = tmp_path / str(len(list(tmp_path.iterdir())))
        _folder(world)
        _deny(request, monkeypatch, world / "folder" / "train" / "c1", "scandir")
        line = run_case(Case("unreadable-class-folder", args, needle="Permission denied",
                             frozen=lambda t: [t / "folder" / "val"]), world, capsys)
        assert f"cannot read the folder {world / 'folder' / 'train' / 'c1'}" in line
        monkeypatch.undo()


def test_pack_into_a_read_only_place_is_one_line_and_leaves_nothing(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                    request: pytest.FixtureRequest,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    src = _folder(tmp_path)
    (tmp_path / "ro").mkdir()
    _deny(request, monkeypatch, tmp_path / "ro", "mkdir")
    line = run_case(Case("pack-read-only", lambda t: ["data", "pack", str(src), str(t / "ro" / "new" / "shards"), "--no-progress"],
                         needle="Permission denied"), tmp_path, capsys)
    assert "nothing was left in" in line


def test_pack_that_fails_midway_removes_its_partial_output(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk after the first shard: one line, and OUT is gone again (it was new)."""
    import fastafd.data.shards as shards_mod

    real, calls = shards_mod._write_shard, []

    def full_after_one(tar_path, items):
        if calls:
            raise OSError(28, "No space left on device", str(tar_path))
        calls.append(tar_path)
        real(tar_path, items)

    monkeypatch.setattr(shards_mod, "_write_shard", full_after_one)
    src = _folder(tmp_path)
    line = run_case(Case("pack-disk-full", lambda t: ["data", "pack", str(src), str(t / "out"), "--shard-samples", "4",
                                                  "--no-progress"],
                         needle="No space left on device", created=lambda t: [t / "out"]), tmp_path, capsys)
    assert calls and "nothing was left in" in line


def test_absolute_exclude_paths_under_the_root_are_honoured(tmp_path: Path) -> None:
    root = _folder(tmp_path)
    (root / "val" / "c1" / "img0.JPEG").write_bytes(b"")  # stops training unless excluded
    exclude = _exclude(tmp_path, f"{root}/val/c1/img0.JPEG\n{root}/./train//c2/img1.JPEG  # comment\n".encode())
    assert read_exclude(exclude, root) == {"val/c1/img0.JPEG", "train/c2/img1.JPEG"}
    os.symlink(root, tmp_path / "alias")  # the same folder by another name
    assert read_exclude(exclude, tmp_path / "alias") == {"val/c1/img0.JPEG", "train/c2/img1.JPEG"}
    cfg = DataConfig(root=root, num_threads=1, image_size=16, batch_size=2, exclude=exclude)
    train, val, info = build_data(cfg, rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), seed=0,
                                  channels_last=False)
    assert (info.train_size, info.val_size) == (11, 5)
    assert sum(len(y) for _, y in val) == 5


def test_eval_on_another_dataset_detects_its_format(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`fastafd eval RUN --data DIR` reads DIR as `fastafd train --data DIR` would (here: shards)."""
    import fastafd.checkpoint.choice
    import fastafd.evaluate
    from fastafd.config import TrainConfig, to_dict
    from fastafd.evaluate import evaluate_run

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(to_dict(TrainConfig())))
    seen = []

    def session(cfg, *, train=True):
        assert not train  # evaluation builds no training pipeline
        seen.append(cfg.data)
        raise UserError("stop here")

    monkeypatch.setattr(fastafd.checkpoint.choice, "latest_valid", lambda run: object())
    monkeypatch.setattr(fastafd.evaluate, "build_session", session)
    shards = _shards(tmp_path)
    with pytest.raises(UserError, match="stop here"):
        evaluate_run(run, data=shards)
    assert seen[0].root == shards and seen[0].format == "auto"
    from fastafd.data import resolve_format

    assert resolve_format(seen[0]) == "shards"


# -- temporary index folders ----------------------------------------------------------------------


@pytest.fixture
def made_temp_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The folders tempfile.mkdtemp makes during the test (in ``tmp_path/tmp``)."""
    import tempfile

    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    real, made = tempfile.mkdtemp, []

    def mkdtemp(*a, **kw):
        made.append(Path(real(*a, **kw)))
        return str(made[-1])

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    return made


def _exclude_one_sample_per_split(tmp: Path, shards: Path) -> Path:
    names = [(shards / s / "shard-000000.idx").read_text().splitlines()[1].split()[3] for s in ("train", "val")]
    return _exclude(tmp, f"train/{names[0]}\nval/{names[1]}\n".encode())


@pytest.mark.parametrize("ending", ["error-in-training", "normal-end"])
def test_temp_index_folders_are_gone_when_the_command_ends(tmp_path: Path, made_temp_dirs: list[Path], ending: str,
                                                            capsys: pytest.CaptureFixture) -> None:
    shards = _shards(tmp_path)
    exclude = _exclude_one_sample_per_split(tmp_path, shards)  # filtered indexes for both splits
    if ending == "error-in-training":  # 4 of the 11 training samples: one is among the 8 an epoch reads
        for sample in (1, 2, 3, 4):
            _poke_image(shards, _encoded("gif"), split="train", sample=sample)
    code = cli_main(_train(shards, tmp_path, "--data.exclude", str(exclude)))
    assert code == (2 if ending == "error-in-training" else 0), capsys.readouterr().err
    assert len([d for d in made_temp_dirs if d.name.startswith("fastafd-idx-")]) == 2
    assert not [d for d in made_temp_dirs if d.exists()], "temporary index folders left behind"


def test_temp_index_folder_is_gone_when_opening_the_shards_fails(tmp_path: Path, made_temp_dirs: list[Path]) -> None:
    shards = _shards(tmp_path)
    exclude = _exclude_one_sample_per_split(tmp_path, shards)
    _poke_label(shards, b"000042", sample=4)
    with pytest.raises(DataError, match="label 42"):
        read_shards(shards, read_exclude(exclude, shards))
    assert made_temp_dirs and not [d for d in made_temp_dirs if d.exists()]


def test_a_command_leaves_the_temp_folders_of_other_loaders_alone(tmp_path: Path, made_temp_dirs: list[Path]) -> None:
    shards = _shards(tmp_path)
    exclude = _exclude_one_sample_per_split(tmp_path, shards)
    ds = read_shards(shards, read_exclude(exclude, shards))  # e.g. an in-process caller's loaders
    assert cli_main(["recipes"]) == 0
    assert all(Path(i).is_file() for i in ds.train.indexes + ds.val.indexes)
    del ds
    import gc

    gc.collect()
    assert not [d for d in made_temp_dirs if d.exists()]  # and gone with the split that owned them
