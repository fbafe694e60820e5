"""Console output of a training run on rank 0: the progress bar or lines, the epoch summary, ``write`` and ``warn``
(the data commands' progress is :mod:`fastafd.observe.progress`)."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence


def format_losses(means: Mapping[str, list[float]], keys: Sequence[str], sep: str = " ") -> str:
    """``ce 1.234/1.250 kl ...``: the losses ``keys`` (the method's ``loss_keys``), one value per peer."""
    return sep.join(f"{k} " + "/".join(f"{v:.3f}" for v in means[k]) for k in keys if k in means)


def duration(seconds: float) -> str:
    """``1 h 05 min``, ``12 min``, ``40 s``: an estimate, in words."""
    seconds = int(max(seconds, 0))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"{seconds // 60} min" if seconds >= 120 else f"{seconds} s"


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60:02d}:{rem % 60:02d}"


class Progress:
    """Per-epoch progress on rank 0: a tqdm bar on a terminal, plain lines in logs (Slurm), or nothing.

    ``mode`` is ``log.progress``: auto is a bar when stderr is a terminal and lines otherwise.
    """

    def __init__(self, mode: str, *, enabled: bool, epoch: int, epochs: int, steps: int, batch: int, loss_keys: Sequence[str]) -> None:
        self.loss_keys = tuple(loss_keys)
        if mode == "auto":
            mode = "bar" if sys.stderr.isatty() else "lines"
        self.mode = mode if enabled else "off"
        self.epoch, self.epochs, self.steps, self.batch = epoch, epochs, steps, batch
        self.t0 = time.perf_counter()
        self.bar = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=steps * batch, unit="img", unit_scale=True, desc=f"epoch {epoch}/{epochs}", dynamic_ncols=True, leave=False)

    def update(self) -> None:
        if self.bar is not None:
            self.bar.update(self.batch)

    def log(self, done: int, means: Mapping[str, list[float]], img_per_s: float, data_wait: float) -> None:
        """At a log point: interval img/s, data-wait fraction and the main losses."""
        if self.bar is not None:
            post = {"img/s": f"{img_per_s:.0f}", "data": f"{data_wait:.0%}"}
            post.update({k: "/".join(f"{v:.3f}" for v in means[k]) for k in self.loss_keys if k in means})
            self.bar.set_postfix(post)
        elif self.mode == "lines":
            elapsed = time.perf_counter() - self.t0
            eta = elapsed / done * (self.steps - done) if done else 0.0
            write(
                f"epoch {self.epoch}/{self.epochs} step {done}/{self.steps}  {img_per_s:.0f} img/s  data {data_wait:.0%}  "
                f"ETA {_clock(eta)}  {format_losses(means, self.loss_keys)}"
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def write(line: str) -> None:
    """Print a line without breaking an active progress bar (stdout, flushed)."""
    from tqdm.auto import tqdm

    tqdm.write(line)
    sys.stdout.flush()


def warn(line: str) -> None:
    """A one-line warning on stderr (``fastafd: warning: ...``), not broken by a progress bar."""
    from tqdm.auto import tqdm

    tqdm.write(f"fastafd: warning: {line}", file=sys.stderr)
    sys.stderr.flush()


def epoch_summary(row: Mapping, epochs: int, means: Mapping[str, list[float]], loss_keys: Sequence[str], extras: str = "") -> str:
    """The one line printed after each evaluated epoch (``extras``: the method's ``describe_eval`` text)."""
    tops = "  ".join(f"{p['name']} {p['top1']:.2f}" for p in row["peers"])
    extras = f"  {extras}" if extras else ""
    return (
        f"epoch {row['epoch']}/{epochs}  top-1: {tops}  ensemble {row['ensemble_top1']:.2f}  {format_losses(means, loss_keys)}{extras}  "
        f"{row['img_per_s']:.0f} img/s  data {row.get('data_wait_frac', 0.0):.0%}  {row['time_s']:.1f} s"
    )
