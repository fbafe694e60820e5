"""Hostile data inputs (issue 17, data side): no code run from data files, one line instead of a
traceback, nothing lost or written.

``CASES`` is the table (one world and one command per row, run by ``tests/battery/harness.py``);
the tests after it check what does not fit a row.
"""

from __future__ import annotations

import json
import os
import pickle
import pickletools
from pathlib import Path

import numpy as np
import pytest

from fastafd.data.cifar import load_cifar100
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


def _edit_classes(shards: Path, classes: object) -> Path:
    meta = json.loads((shards / "classes.json").read_text())
    meta["classes"] = classes
    (shards / "classes.json").write_text(json.dumps(meta))
    return shards


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
