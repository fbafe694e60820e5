"""fastafd.observe (profile, clock, tensorboard, console): trace ranges, profiler, clocks, interval means, TensorBoard scalars, console output."""

import contextlib
import gzip
import json

import pytest
import torch

from fastafd import cli
from fastafd.errors import UserError
from fastafd.observe import clock as clocks
from fastafd.observe import console, profile, tensorboard


class FakeStage:
    name = "logit"

    @profile.stage_range
    def step(self, x):
        return x + 1


def test_ranges_are_a_shared_noop_unless_profiling():
    assert profile.trace_range("data") is profile.trace_range("other")
    assert isinstance(profile.trace_range("data"), contextlib.nullcontext)
    assert FakeStage().step(1) == 2


def test_profiler_records_the_step_range_with_named_ranges(tmp_path):
    prof = profile.Profiler((1, 3), tmp_path, rank=3, device=torch.device("cpu"))
    stage = FakeStage()
    assert isinstance(profile.trace_range("data"), profile._Range)  # recording: ranges are real
    for _ in range(5):
        with profile.trace_range("data"):
            x = torch.ones(4)
        stage.step(x)
        prof.step()
    assert not prof.active  # stopped itself after the range
    assert isinstance(profile.trace_range("data"), contextlib.nullcontext)
    (trace,) = tmp_path.glob("rank3.*.pt.trace.json.gz")
    names = {e.get("name") for e in json.loads(gzip.decompress(trace.read_bytes()))["traceEvents"]}
    assert {"data", "logit_step", "ProfilerStep#1", "ProfilerStep#2"} <= names
    assert "ProfilerStep#0" not in names and "ProfilerStep#3" not in names


def test_profile_cut_short_by_the_end_of_training_is_still_written(tmp_path):
    prof = profile.Profiler((0, 100), tmp_path, rank=0, device=torch.device("cpu"))
    for _ in range(2):
        torch.ones(2).sum()
        prof.step()
    prof.stop()
    assert len(list(tmp_path.glob("rank0.*.pt.trace.json.gz"))) == 1
    assert not profile.Profiler(None, tmp_path, rank=0, device=torch.device("cpu")).active


def test_loop_clock_measures_the_time_spent_waiting_for_data(monkeypatch):
    """A fake clock: the loader takes 30 ms per batch and the step 10 ms, whatever else the machine does."""
    now = [100.0]
    monkeypatch.setattr(clocks.time, "perf_counter", lambda: now[0])

    def slow_loader():
        for i in range(4):
            now[0] += 0.03
            yield i

    clock = clocks.LoopClock()
    for _ in clock.batches(slow_loader()):
        now[0] += 0.01  # the "step"
    seconds, frac = clock.lap()
    assert seconds == pytest.approx(0.16)
    assert frac == pytest.approx(0.75)
    assert clock.wait == 0.0  # lap starts a new interval


def test_interval_means_undo_the_running_means():
    recent = clocks.IntervalMeans()
    assert recent.update({"ce": [2.0, 4.0]}, 2) == {"ce": [2.0, 4.0]}
    # steps 3..4 had ce 1.0 and 0.0: running means after 4 steps are (2*2 + 2*1)/4 and (4*2 + 0)/4
    assert recent.update({"ce": [1.5, 2.0]}, 4) == {"ce": [pytest.approx(1.0), pytest.approx(0.0)]}


def test_scalars_write_tags_tensorboard_reads_back(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sc = tensorboard.Scalars(tmp_path, ["resnet18", "resnet34"], eval_keys=("d_real", "d_fake"))
    sc.train(10, {"ce": [1.0, 2.0], "g_loss": [0.3, 0.4], "scalar_thing": [5.0]}, {"logit": 0.1, "feat": 2e-5}, 123.0, 0.25)
    sc.eval(10, {"peers": [{"top1": 50.0, "top5": 80.0, "d_real": 0.6}, {"top1": 55.0, "top5": 85.0, "d_real": 0.4}],
                 "ensemble_top1": 60.0, "ensemble_top5": 90.0})
    sc.close()
    acc = EventAccumulator(str(tmp_path / tensorboard.TB_DIR))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert tags == tensorboard.train_tags(["resnet18", "resnet34"], ["ce", "g_loss"], ["logit", "feat"]) | tensorboard.eval_tags(
        ["resnet18", "resnet34"], ["d_real"])
    assert "train/ce/peer1-resnet34" in tags and "val/top1/ensemble" in tags
    (event,) = acc.Scalars("train/ce/peer1-resnet34")
    assert (event.step, event.value) == (10, 2.0)
    assert acc.Scalars("perf/data_wait_frac")[0].value == 0.25


def test_tensorboard_on_without_the_package_is_a_user_error(monkeypatch):
    monkeypatch.setattr(tensorboard.importlib.util, "find_spec", lambda name: None)
    assert tensorboard.tensorboard_enabled("auto") is False
    with pytest.raises(UserError, match=r"pip install 'fastafd\[tensorboard\]'.*--log.tensorboard off"):
        tensorboard.tensorboard_enabled("on")
    assert tensorboard.tensorboard_enabled("off") is False


def test_progress_lines_and_epoch_summary(capsys):
    prog = console.Progress("lines", enabled=True, epoch=2, epochs=9, steps=10, batch=4, loss_keys=("ce", "kl", "g_loss"))
    prog.log(5, {"ce": [1.23456, 2.0], "kl": [0.1, 0.2], "d_real": [0.5, 0.5]}, 321.4, 0.125)
    quiet = console.Progress("lines", enabled=False, epoch=2, epochs=9, steps=10, batch=4, loss_keys=("ce",))
    quiet.log(5, {"ce": [1.0, 1.0]}, 1.0, 0.0)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1
    assert out[0].startswith("epoch 2/9 step 5/10  321 img/s  data 12%  ETA ")
    assert out[0].endswith("ce 1.235/2.000 kl 0.100/0.200")
    row = {"epoch": 2, "peers": [{"name": "a", "top1": 51.0, "d_real": 0.6, "d_fake": 0.4}, {"name": "b", "top1": 52.0, "d_real": 0.5, "d_fake": 0.5}],
           "ensemble_top1": 55.0, "img_per_s": 99.6, "time_s": 3.0, "data_wait_frac": 0.5}
    from fastafd.methods.afd import AFD

    line = console.epoch_summary(row, 9, {"ce": [1.0, 1.1]}, AFD.loss_keys, AFD.describe_eval(row["peers"]))
    assert line == "epoch 2/9  top-1: a 51.00  b 52.00  ensemble 55.00  ce 1.000/1.100  D(real)/D(fake) 0.60/0.40 0.50/0.50  100 img/s  data 50%  3.0 s"


@pytest.mark.parametrize("args, needle", [
    (["--profile", "5"], "--profile: expected 2 arguments"),
    (["--profile", "6", "3"], "log.profile=(6, 3) must be two steps START END with 0 <= START < END"),
    (["--log.profile", "1", "x"], "--log.profile"),
])
def test_bad_profile_option_is_one_line(args, needle, capsys, tmp_path):
    code = cli.main(["train", "--out", str(tmp_path / "run"), *args])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and needle in err, err
    assert not (tmp_path / "run").exists()


def test_profile_shorthand_sets_log_profile(monkeypatch):
    seen = {}
    monkeypatch.setattr("fastafd.trainer.train", lambda cfg: seen.setdefault("cfg", cfg) and "run")
    assert cli.main(["train", "--profile", "3", "7"]) == 0
    assert seen["cfg"].log.profile == (3, 7)


def test_data_command_progress_is_lines_in_a_log_and_a_bar_on_a_terminal(monkeypatch, capsys):
    from fastafd.observe import progress

    now = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: False)
    with progress.bar(100, "fastafd: packing") as b:
        for _ in range(100):
            now[0] += 1.0
            b.update(1)
    lines = capsys.readouterr().err.splitlines()
    assert "\r" not in "".join(lines)
    assert lines[0] == "fastafd: packing: 30/100 img (30%), 1 img/s" and lines[-1].startswith("fastafd: packing: 100/100 img (100%)")
    assert len(lines) == 4  # at 30, 60 and 90 s, and the end
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: True)
    assert type(progress.bar(1, "x")).__name__ == "tqdm_asyncio" or hasattr(progress.bar(1, "x"), "format_meter")
