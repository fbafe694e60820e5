"""The hostile-input battery, run folder and checkpoints: one run per folder, no tracebacks, no silent loss.

``CASES`` is the table (see ``tests/battery/harness.py``): each row builds a world in a temporary
folder, runs ``fastafd`` in this process, and expects one error line, an exit code and nothing
changed. What does not fit a row (real concurrent processes, a SIGKILLed lock holder, a full disk,
checkpoints that fall back to an older one) has its own test below the table.

Runs are tiny: two CIFAR ResNet-8 peers on synthetic 32 px data, 3 steps per epoch, a checkpoint
after every step. One checkpointed run is trained per module and copied for each case that needs one.
"""

import builtins
import errno
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fastafd import cli
from fastafd.checkpoint import choice, paths, retain, store
from fastafd.run import atomic, rundir, runlock
from tests.battery.harness import Case, run_case
from tests.helpers import grey_folder

TINY = [
    "--model.peers", "cifar_resnet8", "cifar_resnet8",
    "--data.format", "synthetic", "--data.synthetic_classes", "10", "--data.image_size", "32",
    "--data.synthetic_samples", "64", "--data.batch_size", "16",
    "--loop.epochs", "2", "--loop.max_steps_per_epoch", "3", "--loop.log_interval", "1",
    "--checkpoint.every_steps", "1", "--checkpoint.keep", "10",
    "--log.tensorboard", "off", "--log.progress", "off", "--system.compile", "off",
]  # fmt: skip
"""2 epochs x 3 steps, a checkpoint after each step: step-1 ... step-6 (step-3 and step-6 at epoch ends)."""


@pytest.fixture
def cli_process(fastafd_cli):
    """``cli_process(args, extra_env={})``: ``fastafd ARGS`` started as a child process of this checkout."""
    return lambda args, extra_env=None, **kw: fastafd_cli.popen(args, fastafd_cli.env(**(extra_env or {})), **kw)


def epochs(run: Path) -> list[int]:
    return [row["epoch"] for row in rundir.read_metrics(run)]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished run of TINY (checkpoints step-1 ... step-6), trained once per module; copy it with :func:`copy_run`."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert cli.main(["train", "--out", str(run), *TINY]) == 0
    return run


def copy_run(trained: Path, tmp: Path) -> Path:
    shutil.copytree(trained, tmp / "run")
    return tmp / "run"


def resume_args(run: Path, *extra: str) -> list[str]:
    """Continue ``run`` for a third epoch."""
    return ["train", "--out", str(run), *TINY, "--loop.epochs", "3", *extra]


def newest(run: Path) -> Path:
    return paths.list_checkpoints(run)[0]


def hand_edit(folder: Path, name: str, content: bytes) -> None:
    """Replace one file of a checkpoint and re-write MANIFEST.json to match it (what a determined user can do)."""
    (folder / name).write_bytes(content)
    manifest = json.loads((folder / paths.MANIFEST).read_text())
    manifest["files"][name] = {"size": len(content), "sha256": atomic.sha256_file(folder / name)}
    (folder / paths.MANIFEST).write_text(json.dumps(manifest))


def edit_state(run: Path, change) -> None:
    folder = newest(run)
    state = json.loads((folder / paths.STATE).read_text())
    hand_edit(folder, paths.STATE, json.dumps(change(state)).encode())


def edit_tensor(run: Path, name: str, key: str, value: torch.Tensor) -> None:
    folder = newest(run)
    tensors = load_file(str(folder / name))
    tensors[key] = value
    save_file(tensors, str(folder / "edited"))
    hand_edit(folder, name, (folder / "edited").read_bytes())
    (folder / "edited").unlink()


def corrupt(path: Path) -> None:
    """Truncate a checkpoint file (what a full disk or a bad copy leaves): its checksum no longer matches."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def data_folder(tmp: Path) -> Path:
    """A tiny ImageNet-layout folder (2 classes of 4 grey images, 2 validation images each)."""
    grey_folder(tmp / "data", train=(4, 4), val=(2, 2))
    return tmp / "data"


FOLDER = ["--model.peers", "cifar_resnet8", "cifar_resnet8", "--data.batch_size", "2", "--data.image_size", "32",
          "--loop.epochs", "1", "--loop.max_steps_per_epoch", "1", "--log.tensorboard", "off", "--log.progress", "off"]


def train_args(*extra: str):
    """A case's build: a new tiny run in tmp/run with ``extra`` options."""
    return lambda tmp: ["train", "--out", str(tmp / "run"), *TINY, *extra]


def with_run(change=None, *extra: str):
    """A case's build: a copy of the module's trained run (changed by ``change``), resumed for a third epoch."""

    def build(tmp: Path) -> list[str]:
        run = copy_run(_trained[0], tmp)
        if change is not None:
            change(run)
        return resume_args(run, *extra)

    return build


def drop_newest(run: Path) -> None:
    """Remove the epoch-end checkpoint step-6: the newest left, step-5, is in the middle of epoch 2."""
    shutil.rmtree(newest(run))


def write_best(text: str):
    return lambda run: (run / paths.CKPT_DIR / paths.BEST).write_text(text)


_trained: list[Path] = []
"""The module's trained run, for the builds of :data:`CASES` (set by :func:`test_case`)."""

CASES = [
    # hand-edited checkpoints whose manifest was re-written to match
    Case("model-tensor-of-another-shape", with_run(lambda run: edit_tensor(run, paths.MODEL, "peers.0.fc.weight", torch.zeros(5, 64))),
         needle="peers.0.fc.weight has shape (5, 64) in"),
    Case("optimizer-tensor-of-another-shape",
         with_run(lambda run: edit_tensor(run, paths.OPTIM, "logit/0/momentum_buffer", torch.zeros(3))),
         needle="logit/0/momentum_buffer has shape (3,) in"),
    Case("state-values-that-do-not-fit",  # the right JSON types, values restore cannot use
         with_run(lambda run: edit_state(run, lambda st: {**st, "ranks": [{**st["ranks"][0], "rng": {**st["ranks"][0]["rng"], "python": []}}]})),
         needle="cannot restore"),
    # resumes that do not fit the checkpoint: the differences, in one line
    Case("other-class-count-from-the-data", with_run(None, "--data.synthetic_classes", "5"), needle="dataset num_classes: 10 -> 5"),
    Case("optimizer-kind", with_run(None, "--optim.name", "adam"), needle="optim.name: 'sgd' -> 'adam'"),
    Case("adversarial-optimizer-kind", with_run(None, "--adv_optim.name", "sgd"), needle="adv_optim.name: 'adam' -> 'sgd'"),
    Case("other-data-mid-epoch", with_run(drop_newest, "--data.synthetic_samples", "128"), needle="dataset train_size: 64 -> 128"),
    Case("other-batch-size-mid-epoch", with_run(drop_newest, "--data.batch_size", "8"), needle="mid-epoch"),
    Case("other-image-size-mid-epoch", with_run(drop_newest, "--data.image_size", "40"), needle="data.image_size: 32 -> 40"),
    Case("other-seed-mid-epoch", with_run(drop_newest, "--system.seed", "1"), needle="system.seed: 0 -> 1"),
    # accepted before, meaningless
    *[Case(f"{option}-{value}", train_args(f"--{option}", value), needle=f"{option}={value}")
      for option in ("method.temperature", "optim.lr", "adv_optim.lr") for value in ("nan", "inf")],
    Case("kl-weight-nan", train_args("--method.kl_weight", "nan"), needle="method.kl_weight=nan"),
    Case("momentum-nan", train_args("--optim.momentum", "nan"), needle="optim.momentum=nan"),
    Case("weight-decay-inf", train_args("--optim.weight_decay", "inf"), needle="optim.weight_decay=inf"),
    Case("std-zero", train_args("--data.std", "0.2", "0", "0.2"), needle="data.std"),
    Case("std-negative", train_args("--data.std", "0.2", "-0.2", "0.2"), needle="data.std"),
    Case("mean-nan", train_args("--data.mean", "0.5", "nan", "0.5"), needle="data.mean"),
    Case("hflip-two", train_args("--data.hflip", "2"), needle="data.hflip=2.0 must be a probability in [0, 1]"),
    Case("hflip-negative", train_args("--data.hflip", "-0.5"), needle="data.hflip=-0.5"),
    Case("drop-rate-one", train_args("--model.drop_rate", "1"), needle="model.drop_rate=1.0"),
    Case("out-empty", lambda tmp: ["train", "--out", "", *TINY], needle="--out is empty"),
    Case("out-empty-equals", lambda tmp: ["train", "--out=", *TINY], needle="--out is empty"),
    Case("out-is-the-data-folder", lambda tmp: ["train", "--data", str(data_folder(tmp)), "--out", str(tmp / "data"), *FOLDER],
         needle="inside the dataset folder"),
    Case("out-inside-the-data-folder", lambda tmp: ["train", "--data", str(data_folder(tmp)), "--out", str(tmp / "data" / "train" / "run"),
                                                    *FOLDER], needle="inside the dataset folder"),
    Case("data-and-data-root", lambda tmp: ["train", "--data", str(data_folder(tmp)), "--data.root", str(tmp / "other"),
                                            "--out", str(tmp / "run"), *FOLDER], needle="both name the dataset folder"),
    Case("data-and-data-root-equals", lambda tmp: ["train", f"--data.root={data_folder(tmp)}", "--data", str(tmp / "other"),
                                                   "--out", str(tmp / "run"), *FOLDER], needle="both name the dataset folder"),
    Case("profile-and-log-profile", train_args("--profile", "1", "2", "--log.profile", "3", "4"), needle="both give the profiled steps"),
    # where the run or the export goes
    Case("out-is-a-file", lambda tmp: (tmp / "notes.txt").write_text("mine") and ["train", "--out", str(tmp / "notes.txt"), *TINY],
         needle="is a file"),
    Case("out-under-a-file", lambda tmp: (tmp / "notes.txt").write_text("mine") and ["train", "--out", str(tmp / "notes.txt" / "run"), *TINY],
         needle="is a file"),
    Case("export-onto-a-folder", lambda tmp: (tmp / "peer.safetensors").mkdir() or ["export", str(_trained[0]), "--out", str(tmp / "peer.safetensors")],
         needle="is a folder", frozen=lambda tmp: [tmp, _trained[0]]),
    Case("best-json-not-json", with_run(write_best("{garbage")), needle="best.json"),
    Case("best-json-a-list", with_run(write_best("[]")), needle="best.json"),
    Case("best-json-metric-a-string", with_run(write_best('{"name": "step-000000003", "metric": "high"}')), needle="best.json"),
    Case("best-json-name-a-path", with_run(write_best('{"name": "../../x", "metric": 1.0}')), needle="best.json"),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_case(case, trained, tmp_path, capsys, monkeypatch):
    _trained[:] = [trained]
    monkeypatch.chdir(tmp_path)  # a run that lands in the current folder changes tmp_path too
    run_case(case, tmp_path, capsys)


# -- one run per folder -----------------------------------------------------------------------------


def test_two_runs_started_together_one_is_refused_naming_the_holder(tmp_path, cli_process):
    run = tmp_path / "run"
    args = ["train", "--out", str(run), *TINY, "--loop.epochs", "4"]
    procs = [cli_process(args), cli_process(args)]
    results = [(p, *p.communicate(timeout=600)) for p in procs]
    codes = sorted(p.returncode for p, _, _ in results)
    assert codes == [0, 2], [(p.returncode, err[-2000:]) for p, _, err in results]
    (winner, _, _), (_, _, err) = sorted(results, key=lambda r: r[0].returncode)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("fastafd: error: ") and "in use by another fastafd run" in lines[0]
    assert f"pid {winner.pid}" in lines[0] and "--out" in lines[0]
    assert epochs(run) == [1, 2, 3, 4]  # the winner's rows, once each
    assert [p.name for p in paths.list_checkpoints(run)][0] == "step-000000012"
    assert not list((run / paths.CKPT_DIR).glob(".tmp-*")) and not (run / runlock.LOCK_FILE).exists()


def test_the_lock_of_a_sigkilled_run_is_taken_over(tmp_path, cli_process):
    run = tmp_path / "run"
    killed = cli_process(["train", "--out", str(run), *TINY], extra_env={"FASTAFD_FAULT": "kill@step=4"})
    killed.communicate(timeout=600)
    assert killed.returncode == -9
    holder = json.loads((run / runlock.LOCK_FILE).read_text())  # left behind by the dead process
    assert holder["pid"] == killed.pid and holder["host"] and holder["started"]
    again = cli_process(["train", "--out", str(run), *TINY])
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err[-3000:]
    assert "resuming from" in out + err
    assert epochs(run) == [1, 2]
    assert not (run / runlock.LOCK_FILE).exists()  # released at the end


def test_a_held_lock_refuses_the_run_and_nothing_is_written(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    lock = runlock.RunLock(run)
    lock.acquire()
    try:
        case = Case("held-lock", lambda tmp: ["train", "--out", str(run), *TINY], needle=f"pid {os.getpid()}",
                    frozen=lambda tmp: [run])
        line = run_case(case, tmp_path, capsys)
        assert "in use by another fastafd run" in line and "started" in line
    finally:
        lock.release()
    assert cli.main(["train", "--out", str(run), *TINY, "--loop.epochs", "1"]) == 0  # free again
    assert epochs(run) == [1]


def test_a_failed_start_releases_the_lock_and_leaves_no_new_folder(tmp_path, capsys):
    run = tmp_path / "new" / "run"  # the refusal comes after the lock is taken (the folder is read under it)
    case = Case("lock-released-on-error", lambda tmp: ["train", "--out", str(run), *TINY, "--checkpoint.resume", str(tmp / "missing")],
                needle="not found")
    run_case(case, tmp_path, capsys)
    assert cli.main(["train", "--out", str(run), *TINY, "--loop.epochs", "1"]) == 0
    assert epochs(run) == [1] and not (run / runlock.LOCK_FILE).exists()


@pytest.mark.distributed
def test_a_held_lock_stops_every_rank_of_a_two_process_run_promptly(tmp_path, fastafd_cli, free_port):
    """Rank 0 takes the lock and tells the others: without that, rank 1 would train on and wait for it."""
    from tests.e2e.test_launch import RUN_SH

    run = tmp_path / "run"
    run.mkdir()
    lock = runlock.RunLock(run)
    lock.acquire()
    try:
        env = fastafd_cli.env(tmp_path / "cache", NNODES=None, NODE_RANK=None, GPUS_PER_NODE=None, DRY_RUN=None, PRINT_ONLY=None,
                              OMP_NUM_THREADS=1, CPU=1, MASTER_PORT=free_port(), NPROC=2)
        proc = subprocess.run([str(RUN_SH), *TINY, "--out", str(run)], env=env, capture_output=True, text=True, timeout=240)
    finally:
        lock.release()
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("fastafd: error: ")]
    assert len(lines) == 1 and f"pid {os.getpid()}" in lines[0], proc.stderr[-3000:]  # rank 0's line; fastafd.launch keeps rank 1's copy
    assert sorted(p.name for p in run.iterdir()) == []


@pytest.mark.parametrize("writer", ["write_json", "truncate_metrics", "save_weights", "best"])
def test_temporary_names_are_unique_so_interleaved_writers_never_collide(writer, tmp_path, monkeypatch):
    """A second writer of the same file runs between the first one's write and its rename (what
    two processes, or two threads, can do): with a fixed temporary name the first rename fails."""
    (tmp_path / rundir.METRICS_FILE).write_text('{"epoch": 1}\n{"epoch": 2}\n')
    (tmp_path / paths.CKPT_DIR).mkdir()
    calls = {
        "write_json": lambda: rundir.write_json(tmp_path / "config.json", {"a": 1}),
        "truncate_metrics": lambda: rundir.truncate_metrics(tmp_path, before_epoch=2),
        "save_weights": lambda: store.save_weights(tmp_path / "w.safetensors", {"w": torch.ones(2)}),
        "best": lambda: retain._update_best(tmp_path, tmp_path / "step-000000001", 1.0),
    }
    real, nested = os.replace, []

    def replace(src, dst):
        if not nested:
            nested.append(src)
            calls[writer]()  # the interleaved writer, start to end
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    calls[writer]()
    assert nested
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


def test_checkpoint_write_removes_only_temporary_folders_of_dead_writers(tmp_path):
    live = subprocess.Popen(["sleep", "60"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    root = tmp_path / paths.CKPT_DIR
    root.mkdir()
    folders = {
        "live": root / f".tmp-step-000000002-{live.pid}-1a2b3c4d",
        "dead": root / f".tmp-step-000000002-{dead.pid}-5e6f7a8b",
        "mine": root / f".tmp-step-000000001-{os.getpid()}-9c0d1e2f",
    }
    for path in folders.values():
        path.mkdir()
        (path / paths.MODEL).write_bytes(b"partial")
    try:
        store.write(tmp_path, 3, {paths.MODEL: {"w": torch.ones(2)}, paths.OPTIM: {}}, _state(), keep=3)
        assert folders["live"].is_dir()  # another process is writing it right now
        assert not folders["dead"].exists() and not folders["mine"].exists()
    finally:
        live.kill()
        live.wait()


def _state() -> dict:
    """The smallest state.json a checkpoint of one process holds."""
    return {"epoch": 1, "epoch_step": 0, "stages": {}, "guard": {}, "meter": {}, "config": {},
            "ranks": [{"rng": {"python": [3, [0], None], "numpy": ["MT19937", [0], 0, 0, 0.0], "torch": ""}, "loader": None}]}


# -- no checkpoint loads ----------------------------------------------------------------------------


def test_when_no_checkpoint_loads_the_run_stops_listing_each_and_fresh_starts_over(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    steps = paths.list_checkpoints(run)
    for path in steps:
        corrupt(path / paths.MODEL)
    case = Case("no-checkpoint-loads", lambda tmp: resume_args(run), needle="--checkpoint.resume fresh", frozen=lambda tmp: [run])
    line = run_case(case, tmp_path, capsys)
    assert f"none of the {len(steps)} checkpoints in {run / paths.CKPT_DIR} loads" in line
    for path in steps:
        assert f"{path.name}: {paths.MODEL} does not match its checksum" in line
    # starting over in the same folder only when asked; the old files are moved aside, not deleted
    before = {p.name: (p / paths.MODEL).read_bytes() for p in steps}
    assert cli.main(resume_args(run, "--checkpoint.resume", "fresh")) == 0
    assert epochs(run) == [1, 2, 3]
    assert "resuming from" not in capsys.readouterr().out
    aside = [p for p in run.iterdir() if p.name.startswith("previous-")]
    assert len(aside) == 1
    assert {p.name: (p / paths.MODEL).read_bytes() for p in paths.list_checkpoints(aside[0])} == before
    assert [row["epoch"] for row in rundir.read_metrics(aside[0])] == [1, 2]
    assert choice.latest_valid(run).step == 9


def test_resume_fresh_on_a_folder_without_checkpoints_is_a_plain_start(tmp_path):
    run = tmp_path / "run"
    assert cli.main(["train", "--out", str(run), *TINY, "--loop.epochs", "1", "--checkpoint.resume", "fresh"]) == 0
    assert epochs(run) == [1] and not [p for p in run.iterdir() if p.name.startswith("previous-")]


def test_rows_of_a_run_killed_before_its_first_checkpoint_are_not_kept_twice(tmp_path, cli_process):
    run = tmp_path / "run"
    killed = cli_process(["train", "--out", str(run), *TINY, "--checkpoint.every_steps", "0"], extra_env={"FASTAFD_FAULT": "kill@checkpoint=1"})
    killed.communicate(timeout=600)
    assert killed.returncode == -9 and epochs(run) == [1] and not paths.list_checkpoints(run)
    assert cli.main(["train", "--out", str(run), *TINY, "--checkpoint.every_steps", "0"]) == 0
    assert epochs(run) == [1, 2]


# -- hand-edited checkpoints that pass their manifest -------------------------------------------------


def _drop(key):
    return lambda st: {k: v for k, v in st.items() if k != key}


HAND_EDITS = {
    # name: (edit of the copied run, file named by the warning)
    "state-not-json": (lambda run: hand_edit(newest(run), paths.STATE, b"{not json"), paths.STATE),
    "state-a-list": (lambda run: edit_state(run, lambda st: [st]), paths.STATE),
    "state-without-ranks": (lambda run: edit_state(run, _drop("ranks")), paths.STATE),
    "state-epoch-a-string": (lambda run: edit_state(run, lambda st: {**st, "epoch": "two"}), paths.STATE),
    "state-rng-a-number": (lambda run: edit_state(run, lambda st: {**st, "ranks": [{**st["ranks"][0], "rng": 5}]}), paths.STATE),
    "state-stages-a-list": (lambda run: edit_state(run, lambda st: {**st, "stages": list(st["stages"])}), paths.STATE),
    "manifest-a-list": (lambda run: (newest(run) / paths.MANIFEST).write_text("[]"), paths.MANIFEST),
    "manifest-no-files": (lambda run: (newest(run) / paths.MANIFEST).write_text('{"files": {}}'), paths.MANIFEST),
    "manifest-without-model": (
        lambda run: (newest(run) / paths.MANIFEST).write_text(json.dumps(
            {"files": {k: v for k, v in json.loads((newest(run) / paths.MANIFEST).read_text())["files"].items() if k != paths.MODEL}})),
        paths.MANIFEST,
    ),
}


@pytest.mark.parametrize("edit", sorted(HAND_EDITS))
def test_a_hand_edited_newest_checkpoint_is_skipped_for_the_previous_one(edit, trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    change, bad_file = HAND_EDITS[edit]
    bad, previous = paths.list_checkpoints(run)[:2]
    change(run)
    with pytest.warns(UserWarning, match="skipping corrupt checkpoint") as caught:
        assert cli.main(resume_args(run)) == 0
    assert any(str(bad / bad_file) in str(w.message) and f"using {previous.name} instead" in str(w.message) for w in caught)
    assert f"resuming from {previous}" in capsys.readouterr().out
    assert epochs(run) == [1, 2, 3]


# -- resumes with changes that are allowed -------------------------------------------------------------


def test_other_data_at_an_epoch_end_is_allowed_and_reported(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path)
    assert cli.main(resume_args(run, "--data.synthetic_samples", "128", "--data.image_size", "40")) == 0
    out = capsys.readouterr().out
    assert f"resuming from {newest(trained).name}" in out.replace(str(run / paths.CKPT_DIR) + os.sep, "")
    assert "data.image_size: 32 -> 40" in out and "dataset train_size: 64 -> 128" in out
    assert epochs(run) == [1, 2, 3]


def test_a_mid_epoch_refusal_says_why_and_what_to_do(trained, tmp_path, capsys):
    case = Case("mid-epoch-hint", with_run(drop_newest, "--data.synthetic_samples", "128"), needle="mid-epoch")
    _trained[:] = [trained]
    line = run_case(case, tmp_path, capsys)
    assert "reader position" in line and "--checkpoint.resume" in line


# -- unwritable places and full disks ------------------------------------------------------------------


def read_only(monkeypatch, root: Path) -> None:
    """Make ``root`` (and everything under it) behave like a read-only mount: every write fails with EROFS.
    (The tests may run as root, which ignores permission bits, so chmod would not do.)"""

    def refuse(path) -> None:
        if str(Path(path).absolute()).startswith(str(root)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    real_mkdir, real_open, real_builtin_open = os.mkdir, os.open, builtins.open

    def mkdir(path, *a, **kw):
        refuse(path)
        return real_mkdir(path, *a, **kw)

    def os_open(path, flags, *a, **kw):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(path)
        return real_open(path, flags, *a, **kw)

    def builtin_open(file, mode="r", *a, **kw):
        if isinstance(file, str | Path) and any(c in mode for c in "wax+"):
            refuse(file)
        return real_builtin_open(file, mode, *a, **kw)

    real_save = store.save_file

    def save(tensors, filename, *a, **kw):  # safetensors writes from Rust: what it raises on a read-only mount
        if str(Path(filename).absolute()).startswith(str(root)):
            raise SafetensorError("Error while serializing: I/O error: Read-only file system (os error 30)")
        return real_save(tensors, filename, *a, **kw)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", builtin_open)
    monkeypatch.setattr(store, "save_file", save)


@pytest.mark.parametrize("exists", [False, True], ids=["new-folder", "existing-folder"])
def test_out_on_a_read_only_file_system_is_one_line(exists, tmp_path, capsys, monkeypatch):
    mount = tmp_path / "ro"
    mount.mkdir()
    if exists:
        (mount / "run").mkdir()
    read_only(monkeypatch, mount)
    case = Case("read-only-out", lambda tmp: ["train", "--out", str(mount / "run"), *TINY], needle="read-only file system")
    line = run_case(case, tmp_path, capsys)
    assert "pass a writable --out" in line


@pytest.mark.parametrize("exists", [False, True], ids=["new-folder", "existing-folder"])
def test_export_into_a_read_only_place_is_one_line_and_leaves_nothing(exists, trained, tmp_path, capsys, monkeypatch):
    mount = tmp_path / "ro"
    mount.mkdir()
    target = mount / ("peers" if exists else "new") / "peer0.safetensors"
    if exists:
        target.parent.mkdir()
    read_only(monkeypatch, mount)
    case = Case("read-only-export", lambda tmp: ["export", str(trained), "--out", str(target)], needle="read-only file system",
                frozen=lambda tmp: [tmp, trained])
    run_case(case, tmp_path, capsys)


def test_export_onto_an_existing_file_replaces_it_only_when_fastafd_wrote_it(trained, tmp_path, capsys):
    target = tmp_path / "peer0.safetensors"
    target.write_bytes(b"a file of the user's")
    case = Case("export-over-users-file", lambda tmp: ["export", str(trained), "--out", str(target)], needle="fastafd did not write it")
    run_case(case, tmp_path, capsys)
    target.unlink()
    for _ in range(2):  # the second export replaces the first, atomically
        assert cli.main(["export", str(trained), "--out", str(target)]) == 0
    assert load_file(str(target)).keys() == {k[len("peers.0."):] for k in load_file(str(newest(trained) / paths.MODEL)) if k.startswith("peers.0.")}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".fastafd-outputs.json", "peer0.safetensors"]


def _full_safetensors(real):
    def save(tensors, filename, *a, **kw):
        if paths.CKPT_DIR in str(filename) and _full_safetensors.armed:
            Path(filename).write_bytes(b"\0" * 100)  # what was written before the disk filled
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, filename, *a, **kw)

    return save


def _full_fsync(real):
    def fsync(fd):
        if _full_safetensors.armed and f"{os.sep}.tmp-step-" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # delayed allocation: the error surfaces at fsync
        return real(fd)

    return fsync


@pytest.mark.parametrize("where", ["safetensors", "fsync"])
def test_disk_full_during_a_checkpoint_write_is_one_line_and_keeps_the_previous(where, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    _full_safetensors.armed = False
    if where == "safetensors":
        monkeypatch.setattr(store, "save_file", _full_safetensors(store.save_file))
    else:
        monkeypatch.setattr(os, "fsync", _full_fsync(os.fsync))
    real_write = store.write

    def write(run_dir, step, *a, **kw):
        _full_safetensors.armed = step == 4  # the disk fills up after step-3, the first epoch's end
        return real_write(run_dir, step, *a, **kw)

    monkeypatch.setattr(store, "write", write)
    capsys.readouterr()
    code = cli.main(["train", "--out", str(run), *TINY])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith("fastafd: error: ") and "disk full" in err and "step-000000003" in err
    assert not list((run / paths.CKPT_DIR).glob(".tmp-*"))  # nothing half-written left behind
    assert [p.name for p in paths.list_checkpoints(run)] == ["step-000000003", "step-000000002", "step-000000001"]
    assert choice.latest_valid(run).step == 3
    monkeypatch.setattr(store, "write", real_write)  # space freed: the same command resumes
    _full_safetensors.armed = False
    assert cli.main(["train", "--out", str(run), *TINY]) == 0
    assert epochs(run) == [1, 2] and choice.latest_valid(run).step == 6


def test_disk_full_elsewhere_in_the_run_folder_is_one_line(tmp_path, capsys, monkeypatch):
    def full(*a, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "run" / rundir.METRICS_FILE))

    monkeypatch.setattr(rundir, "append_jsonl", full)
    case = Case("disk-full-metrics", lambda tmp: ["train", "--out", str(tmp / "run"), *TINY], needle="disk full", code=1,
                frozen=lambda tmp: [])
    line = run_case(case, tmp_path, capsys)
    assert rundir.METRICS_FILE in line
