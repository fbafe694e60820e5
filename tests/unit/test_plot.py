"""fastafd.experiments.plot: training-curve PNGs from metrics.jsonl, overlays of runs of different methods, benchmark charts."""

import json

import pytest
from PIL import Image

from fastafd.errors import UserError
from fastafd.experiments import plot


def fake_run(root, name, method, epochs=3, disc=True, k=2):
    run = root / name
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"method": {"name": method}}))
    with open(run / "metrics.jsonl", "w") as f:
        for e in range(1, epochs + 1):
            peers = []
            for i in range(k):
                peer = {"name": f"resnet{8 + 6 * i}", "top1": 10.0 * e + i, "top5": 30.0 + e, "train_ce": 2.0 / e, "train_kl": 0.1 * e}
                if disc:
                    peer.update(d_real=0.6, d_fake=0.4, train_g_loss=0.2, train_d_loss=0.5)
                peers.append(peer)
            row = {"epoch": e, "step": 10 * e, "time_s": 1.0, "img_per_s": 100.0 + e, "ensemble_top1": 12.0 * e, "ensemble_top5": 40.0,
                   "peers": peers, "lr": {"logit": 0.1}, "data_wait_frac": 0.1}
            f.write(json.dumps(row) + "\n")
    return run


def is_drawn_png(path, min_colors=3):
    img = Image.open(path)
    assert img.format == "PNG" and img.width > 300 and img.height > 200
    return len(img.convert("RGB").getcolors(maxcolors=1 << 20) or []) >= min_colors


def test_plot_overlays_runs_of_different_methods(tmp_path):
    a = fake_run(tmp_path, "runA", "afd")
    b = fake_run(tmp_path, "runB", "dml", disc=False)
    written = plot.plot_runs([a, b], tmp_path / "out")
    assert {p.name for p in written} == {"top1.png", "losses.png", "discriminator.png", "throughput.png"}
    assert all(p.parent == tmp_path / "out" and is_drawn_png(p) for p in written)
    curves = {p.name: labels for p, labels in written.items()}
    assert curves["top1.png"] == [
        "runA (afd): peer0 resnet8", "runA (afd): peer1 resnet14", "runA (afd): ensemble",
        "runB (dml): peer0 resnet8", "runB (dml): peer1 resnet14", "runB (dml): ensemble",
    ]
    assert "train_g_loss: runA (afd): peer1" in curves["losses.png"] and "train_ce: runB (dml): peer0" in curves["losses.png"]
    assert curves["discriminator.png"] == [  # dml has no discriminators
        "d_real: runA (afd): D0", "d_real: runA (afd): D1", "d_fake: runA (afd): D0", "d_fake: runA (afd): D1",
    ]
    assert curves["throughput.png"] == ["img_per_s: runA (afd)", "img_per_s: runB (dml)", "data_wait: runA (afd)", "data_wait: runB (dml)"]


def test_default_output_is_the_first_runs_plots_folder_and_no_disc_figure_without_discriminators(tmp_path):
    run = fake_run(tmp_path, "runB", "dml", disc=False)
    written = plot.plot_runs([run])
    assert {p.name for p in written} == {"top1.png", "losses.png", "throughput.png"}
    assert all(p.parent == run / "plots" for p in written)


def test_missing_or_empty_run_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        plot.plot_runs([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no metrics.jsonl"):
        plot.plot_runs([tmp_path / "empty"])


def test_benchmark_helpers_write_pngs(tmp_path):
    bars = plot.bar_chart(tmp_path / "b" / "bars.png", ["eager", "compiled"], [100.0, 150.0], spread=[(90, 110), (140, 155)],
                          ylabel="img/s", title="step throughput")
    lines = plot.line_chart(tmp_path / "lines.png", {"afd": ([32, 64], [10.0, 18.0]), "dml": ([32, 64], [20, 35])},
                            xlabel="batch", ylabel="img/s", logx=True)
    assert is_drawn_png(bars) and is_drawn_png(lines)
