"""PNG plots: training curves of one or more runs (``fastafd plot``) and a helper for benchmark charts.

Reads each run's ``metrics.jsonl`` (one row per evaluated epoch, see ``rundir``/``trainer._epoch_row``)
and ``config.json`` (for the method). Several runs overlay on the same figures, one colour per run,
labelled ``<run folder> (<method>)``; within a run, each peer has its own line style and the
ensemble is the thick solid line. Figures are drawn with matplotlib's object API and its Agg
renderer (no display, no global pyplot state); matplotlib is the optional extra ``fastafd[plot]``.

Benchmarks call :func:`bar_chart` and :func:`line_chart` to write their own PNGs next to their
JSON results.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fastafd.errors import UserError, require
from fastafd.run import atomic, outputs, readback, rundir

FIGURES = ("top1", "losses", "discriminator", "throughput")
"""The PNGs ``fastafd plot`` writes (``<name>.png``); discriminator only when a run has discriminators."""

PEER_STYLES = ("--", ":", "-.", (0, (5, 1, 1, 1)), (0, (1, 3)))
LOSSES = {"train_ce": "cross-entropy", "train_kl": "T^2 KL to the teacher peer", "train_g_loss": "adversarial feature loss (generator)",
          "train_d_loss": "discriminator loss", "train_align": "feature alignment loss (l1/l2)"}


@dataclass
class Run:
    """One run's records: its label and its metrics rows."""

    path: Path
    label: str
    rows: list[dict]


def load_run(path: Path) -> Run:
    """Read a run directory; :class:`UserError` when it is not one or has no evaluated epoch yet."""
    path = Path(path)
    if not (path / rundir.METRICS_FILE).is_file():
        if not path.is_dir():
            raise UserError(f"{path} does not exist: pass a run directory written by `fastafd train`")
        raise UserError(f"{path} has no {rundir.METRICS_FILE} (written after each evaluated epoch): pass a run directory written by `fastafd train`")
    rows = rundir.read_metrics(path)
    if not rows:
        raise UserError(f"{path / rundir.METRICS_FILE} is empty: the run has not finished an epoch yet")
    method = "?"
    cfg_path = path / rundir.CONFIG_FILE
    if cfg_path.is_file():
        m = readback.read_json(cfg_path).get("method")
        method = m["name"] if isinstance(m, dict) and isinstance(m.get("name"), str) else "?"
    return Run(path, f"{path.resolve().name} ({method})", rows)


def _mpl():
    require("matplotlib", "plot", "Plotting")
    from matplotlib.figure import Figure

    return Figure


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _peer_label(k: int, peer: Mapping) -> str:
    return f"peer{k} {peer.get('name', '')}".strip()


def _peer_series(run: Run, key: str) -> dict[int, tuple[list[int], list[float]]]:
    """``{peer index: (epochs, values)}`` of a per-peer key, for the rows that have it."""
    out: dict[int, tuple[list[int], list[float]]] = {}
    for row in run.rows:
        for k, peer in enumerate(row.get("peers", [])):
            if key in peer and peer[key] is not None:
                xs, ys = out.setdefault(k, ([], []))
                xs.append(row["epoch"])
                ys.append(float(peer[key]))
    return out


def _row_series(run: Run, key: str) -> tuple[list[int], list[float]]:
    rows = [r for r in run.rows if r.get(key) is not None]
    return [r["epoch"] for r in rows], [float(r[key]) for r in rows]


def _save(fig, path: Path, writer: outputs.Outputs | None = None) -> Path:
    """Write the PNG through ``writer`` (:mod:`fastafd.run.outputs`: never over a file fastafd did not write), or
    atomically where a benchmark names its own file."""
    path = Path(path)
    if writer is None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.replace(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
        return path
    return writer.write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))


def _labels(ax) -> list[str]:
    """The labels of an axes' data curves (reference lines have matplotlib's private ``_child`` labels)."""
    return [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]


def _legend(ax) -> None:
    if ax.get_lines():
        ax.legend(fontsize="small", loc="best")
    if ax.get_xlabel() == "epoch":
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_runs(runs: Sequence[Path], out: Path | None = None) -> dict[Path, list[str]]:
    """Write the training-curve PNGs for ``runs`` (overlaid) into ``out`` (default ``<first run>/plots``).

    Returns ``{png path: [curve labels]}``.
    """
    Figure = _mpl()
    loaded = [load_run(Path(r)) for r in runs]
    if not loaded:
        raise UserError("give at least one run directory, e.g. fastafd plot runs/demo-20261125-101500")
    outputs.check_empty(out)
    if out is not None and Path(out).suffix.lower() in (".png", ".md", ".json", ".csv", ".pdf", ".svg"):
        raise UserError(f"--out {out} looks like a file name: `fastafd plot` writes {len(FIGURES)} PNGs into a folder; pass a folder, e.g. --out plots")
    out = Path(out) if out is not None else loaded[0].path / "plots"
    writer = outputs.Outputs([out / f"{name}.png" for name in FIGURES], folder=out)
    writer.check()
    colors = _colors(len(loaded))
    written: dict[Path, list[str]] = {}

    # top-1 per peer and ensemble
    fig = Figure(figsize=(8, 5), layout="constrained")
    ax = fig.add_subplot()
    for run, color in zip(loaded, colors, strict=True):
        for k, (xs, ys) in _peer_series(run, "top1").items():
            ax.plot(xs, ys, color=color, linestyle=PEER_STYLES[k % len(PEER_STYLES)], marker=".", label=f"{run.label}: {_peer_label(k, run.rows[-1]['peers'][k])}")
        xs, ys = _row_series(run, "ensemble_top1")
        ax.plot(xs, ys, color=color, linestyle="-", linewidth=2.2, marker="o", markersize=3, label=f"{run.label}: ensemble")  # a one-epoch run is one point
    ax.set(xlabel="epoch", ylabel="validation top-1 (%)", title="Top-1 accuracy per peer and of the ensemble")
    ax.grid(alpha=0.3)
    _legend(ax)
    written[_save(fig, out / "top1.png", writer)] = _labels(ax)

    # training losses, one panel per loss that any run has
    keys = [k for k in LOSSES if any(_peer_series(r, k) for r in loaded)]
    if keys:
        fig = Figure(figsize=(6 * min(len(keys), 2), 4 * ((len(keys) + 1) // 2)), layout="constrained")
        labels = []
        for i, key in enumerate(keys):
            ax = fig.add_subplot((len(keys) + 1) // 2, min(len(keys), 2), i + 1)
            for run, color in zip(loaded, colors, strict=True):
                for k, (xs, ys) in _peer_series(run, key).items():
                    ax.plot(xs, ys, color=color, linestyle=PEER_STYLES[k % len(PEER_STYLES)], marker=".", label=f"{run.label}: peer{k}")
            ax.set(xlabel="epoch", ylabel="epoch mean", title=f"{key.removeprefix('train_')}: {LOSSES[key]}")
            ax.grid(alpha=0.3)
            _legend(ax)
            labels += [f"{key}: {label}" for label in _labels(ax)]
        written[_save(fig, out / "losses.png", writer)] = labels

    # discriminator outputs on real (teacher's) and fake (own) maps, validation set
    if any(_peer_series(r, "d_real") for r in loaded):
        fig = Figure(figsize=(12, 4.5), layout="constrained")
        labels = []
        for i, (key, what) in enumerate((("d_real", "real (teacher's) maps"), ("d_fake", "fake (own) maps"))):
            ax = fig.add_subplot(1, 2, i + 1)
            ax.axhline(0.5, color="grey", linewidth=0.8, alpha=0.6)
            for run, color in zip(loaded, colors, strict=True):
                for k, (xs, ys) in _peer_series(run, key).items():
                    ax.plot(xs, ys, color=color, linestyle=PEER_STYLES[k % len(PEER_STYLES)], marker=".", label=f"{run.label}: D{k}")
            ax.set(xlabel="epoch", ylabel="mean discriminator output", title=f"D_k on {what}", ylim=(-0.02, 1.02))
            ax.grid(alpha=0.3)
            _legend(ax)
            labels += [f"{key}: {label}" for label in _labels(ax)]
        written[_save(fig, out / "discriminator.png", writer)] = labels

    # throughput and data wait
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    ax1, ax2 = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for run, color in zip(loaded, colors, strict=True):
        ax1.plot(*_row_series(run, "img_per_s"), color=color, marker=".", label=run.label)
        xs, ys = _row_series(run, "data_wait_frac")
        if xs:
            ax2.plot(xs, [100 * y for y in ys], color=color, marker=".", label=run.label)
    ax1.set(xlabel="epoch", ylabel="img/s (all processes)", title="Training throughput")
    ax2.set(xlabel="epoch", ylabel="% of step time", title="Time waiting for data (rank 0)", ylim=(0, 100))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        _legend(ax)
    written[_save(fig, out / "throughput.png", writer)] = [f"img_per_s: {label}" for label in _labels(ax1)] + [f"data_wait: {label}" for label in _labels(ax2)]
    return written


# -- helpers for benchmarks -----------------------------------------------------------------------


def bar_chart(path: Path, labels: Sequence[str], values: Sequence[float], *, spread: Sequence[tuple[float, float]] | None = None,
              ylabel: str = "", title: str = "") -> Path:
    """A bar per label (e.g. median img/s per configuration), with optional (min, max) whiskers; writes ``path``."""
    Figure = _mpl()
    fig = Figure(figsize=(max(6, 0.9 * len(labels) + 2), 4.5), layout="constrained")
    ax = fig.add_subplot()
    yerr = None
    if spread is not None:
        yerr = [[v - lo for v, (lo, _) in zip(values, spread, strict=True)], [hi - v for v, (_, hi) in zip(values, spread, strict=True)]]
    bars = ax.bar(range(len(values)), values, yerr=yerr, capsize=4, color=_colors(len(values)))
    ax.bar_label(bars, fmt="%.4g", fontsize="small")
    ax.set_xticks(range(len(labels)), labels, rotation=20 if len(labels) > 4 else 0, ha="right" if len(labels) > 4 else "center")
    ax.set(ylabel=ylabel, title=title)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, Path(path))


def line_chart(path: Path, series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, xlabel: str = "", ylabel: str = "",
               title: str = "", logx: bool = False, logy: bool = False) -> Path:
    """One line per ``{label: (xs, ys)}`` (e.g. img/s against batch size per method); writes ``path``."""
    Figure = _mpl()
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    ax = fig.add_subplot()
    for (label, (xs, ys)), color in zip(series.items(), _colors(len(series)), strict=True):
        ax.plot(list(xs), list(ys), marker="o", color=color, label=label)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    _legend(ax)
    return _save(fig, Path(path))


@dataclass
class BarPanel:
    """One panel of :func:`grouped_bar_chart`: a group of bars per label, one bar per series, with error bars."""

    title: str
    groups: Sequence[str]
    """The x labels (e.g. the methods)."""
    series: Mapping[str, tuple[Sequence[float | None], Sequence[float | None]]]
    """``{series label: (values, errors)}``, one value per group; None draws no bar (no finished run)."""
    ylabel: str = ""


def grouped_bar_chart(path: Path, panels: Sequence[BarPanel], *, title: str = "", ylim: tuple[float, float] | None = None,
                      writer: outputs.Outputs | None = None) -> Path:
    """Panels side by side (wrapping after 2), each grouped bars with +-error whiskers (e.g. top-1 per method and peer,
    mean +- std over seeds; ``fastafd report``); writes ``path``."""
    Figure = _mpl()
    cols = min(len(panels), 2) or 1
    rows = (len(panels) + cols - 1) // cols or 1
    widest = max((len(p.groups) * max(len(p.series), 1) for p in panels), default=1)
    fig = Figure(figsize=(max(6.0, 0.45 * widest + 2.5) * cols, 4.6 * rows), layout="constrained")
    for i, panel in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        n = max(len(panel.series), 1)
        width = 0.8 / n
        for j, ((label, (values, errors)), color) in enumerate(zip(panel.series.items(), _colors(n), strict=True)):
            xs = [g + (j - (n - 1) / 2) * width for g in range(len(panel.groups))]
            keep = [(x, v, e or 0.0) for x, v, e in zip(xs, values, errors, strict=True) if v is not None]
            if keep:
                ax.bar([k[0] for k in keep], [k[1] for k in keep], width=width, yerr=[k[2] for k in keep], capsize=3, color=color, label=label)
        ax.set_xticks(range(len(panel.groups)), panel.groups, rotation=20 if len(panel.groups) > 3 else 0,
                      ha="right" if len(panel.groups) > 3 else "center")
        ax.set(title=panel.title, ylabel=panel.ylabel)
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.grid(axis="y", alpha=0.3)
        if ax.containers:
            ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    if title:
        fig.suptitle(title)
    return _save(fig, Path(path), writer)
