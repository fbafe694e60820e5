"""Training-step throughput: fastafd's fast path against a plain PyTorch reference, in one run.

Variants, all on the same in-memory batch and the same peers:

* ``reference``: :mod:`fastafd.bench.reference`, AFD written the way a paper's code usually is
  (eager, fp32, NCHW, Python loops over peers and discriminators);
* ``independent``: fastafd training the same peers with CE only (the baseline: what distillation
  costs on top);
* ``extra-backward``: ``independent`` plus a second backward pass from the feature maps into the
  feature extractors (gradients dropped): the passes that AFD's simultaneous order cannot avoid
  (one forward, two backward), without its discriminators and second optimizer. AFD's cost above
  this is what the method's own parts (discriminators, Adam) add;
* ``afd-sequential`` and ``afd-simultaneous``: fastafd's AFD in both orders;
* ``one`` and ``cl``: the multi-branch methods, one network with K branches on a shared trunk
  (``--peers`` names the network K times), against ``independent``'s K whole networks: what the
  shared trunk saves (their FLOP ratio beside it with ``--count_flops``).

fastafd variants use the device's defaults (``system.*=auto``: bf16 + channels-last + compile on
CUDA, fp32 + NCHW + eager on CPU) unless overridden. Each variant is warmed up first (its
compilation time is reported separately), then timed over ``repeats`` windows of ``steps`` steps
with synchronized brackets; img/s is reported as median, min and max over the windows.
Run as ``fastafd bench step`` or ``python benchmarks/step.py``.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch

from fastafd.config import DataConfig, LoopConfig, MethodConfig, ModelConfig, SystemConfig, TrainConfig, adam_feature_stage, sgd_logit_stage
from fastafd.errors import UserError
from fastafd.run import env, outputs

VARIANTS = ("reference", "independent", "extra-backward", "afd-sequential", "afd-simultaneous", "one", "cl")


@dataclass
class StepBenchArgs:
    """Measure training-step img/s of fastafd against a plain PyTorch reference."""

    peers: tuple[str, ...] = ("resnet18", "resnet18")
    """timm model names of the peers."""
    image_size: int = 64
    """Input resolution."""
    batch_size: int = 32
    """Batch size per step."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device to measure on."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """fastafd variants' autocast dtype (the reference is always fp32)."""
    channels_last: Literal["auto", "on", "off"] = "auto"
    """fastafd variants' memory format."""
    compile: Literal["auto", "on", "off"] = "auto"
    """torch.compile the fastafd variants."""
    variants: tuple[str, ...] = VARIANTS
    """Which variants to run."""
    warmup: int = 3
    """Untimed steps per variant (compilation happens here and is reported separately)."""
    steps: int = 5
    """Steps per timed window."""
    repeats: int = 5
    """Timed windows per variant."""
    out: Path = Path("benchmarks/results")
    """Folder for step-<name>.json/.md/.png, or a file ending in .md (its .json and .png beside it); never over a file fastafd did not write."""
    name: str = ""
    """Result file stem; default: <device>-<peers>-<image_size>."""
    seed: int = 0
    """Seed of the peers and the batch."""
    count_flops: bool = False
    """Also count each variant's floating-point operations per step (one extra eager step, torch's FlopCounterMode)."""


@dataclass
class VariantResult:
    variant: str
    img_per_s_median: float
    img_per_s_min: float
    img_per_s_max: float
    windows: list[float] = field(default_factory=list)
    first_step_s: float = 0.0
    """Wall time of the first (warm-up) step: includes torch.compile when compiling."""
    gflop_per_step: float | None = None
    """Floating-point operations of one step (forward, backward, optimizers), with --count_flops."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _extra_backward_step(task, stages, compile_: bool):
    """``independent``'s iteration plus a backward from the feature maps into the extractors."""
    from fastafd.models.peers import feature_parameters

    logit = stages["logit"]
    extractors = [p for peer in task.peers for p in feature_parameters(peer)]

    def forward(x: torch.Tensor, y: torch.Tensor):
        with task.numerics.autocast():
            feats, logits = task.forward_peers(x)
        loss, _ = task.logit_loss(logits, y, kl=False)
        return loss, sum(f.float().square().mean() for f in feats)

    forward = torch.compile(forward) if compile_ else forward

    def train_step(x: torch.Tensor, y: torch.Tensor, stages) -> None:
        loss, feature_loss = forward(x, y)
        grads = torch.autograd.grad(logit.guard.scale(loss), logit.params, retain_graph=True, allow_unused=True)
        torch.autograd.grad(feature_loss, extractors, allow_unused=True)  # a ViT's final norm: not on the feature map's path
        logit.step_with(grads)

    return train_step


def _fastafd_step(args: StepBenchArgs, method: str, order: str, device: torch.device, *, extra_backward: bool = False):
    """A fastafd task + stages on ``device``, built with the trainer's own factories."""
    from fastafd import dist
    from fastafd.methods import Numerics, build_task
    from fastafd.optim import build_stages

    cfg = TrainConfig(
        model=ModelConfig(peers=args.peers, num_classes=1000),
        method=MethodConfig(name=method, order=order),
        data=DataConfig(format="synthetic", batch_size=args.batch_size, image_size=args.image_size),
        optim=sgd_logit_stage(),
        adv_optim=adam_feature_stage(),
        loop=LoopConfig(epochs=1),
        system=SystemConfig(device=args.device, precision=args.precision, channels_last=args.channels_last, compile=args.compile),
    )
    dtype, channels_last, compile_ = dist.resolve_numerics(cfg.system, device)
    torch.manual_seed(args.seed)
    task = build_task(cfg, 1000, Numerics(device.type, dtype), device, channels_last)
    if compile_:
        task.compile()
    stages = build_stages(task, cfg, device=device, dtype=dtype, steps_per_epoch=10_000)
    stages.set_step(0)
    task.train()
    train_step = _extra_backward_step(task, stages, compile_) if extra_backward else task.train_step

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with stages.iteration():
            train_step(x, y, stages)

    return step, channels_last


def _reference_step(args: StepBenchArgs, device: torch.device):
    from fastafd.bench.reference import ReferenceAFD
    from fastafd.models.peers import create_peer, feature_shape

    torch.manual_seed(args.seed)
    nets = [create_peer(name, 1000, image_size=args.image_size).to(device) for name in args.peers]
    shapes = [feature_shape(n, args.image_size, name) for n, name in zip(nets, args.peers)]
    ref = ReferenceAFD(nets, shapes, temperature=3.0, sgd=dict(lr=0.1, momentum=0.9, weight_decay=1e-4), adam=dict(lr=2e-5, weight_decay=0.1))
    for m in ref.transfers + ref.discs:
        m.to(device)
    for net in nets:
        net.train()
    return ref.iteration, False


def _build(args: StepBenchArgs, variant: str, device: torch.device):
    if variant == "reference":
        step, channels_last = _reference_step(args, device)
    elif variant == "independent":
        step, channels_last = _fastafd_step(args, "independent", "sequential", device)
    elif variant == "extra-backward":
        step, channels_last = _fastafd_step(args, "independent", "sequential", device, extra_backward=True)
    elif variant in ("afd-sequential", "afd-simultaneous"):
        step, channels_last = _fastafd_step(args, "afd", variant.split("-")[1], device)
    elif variant in ("one", "cl"):
        step, channels_last = _fastafd_step(args, variant, "sequential", device)
    else:
        raise UserError(f"unknown variant '{variant}': choose from {', '.join(VARIANTS)}")
    return step, channels_last


def count_flops(args: StepBenchArgs, variant: str, device: torch.device, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
    """GFLOP of one step of ``variant``, counted in eager mode (compiling does not change the count)."""
    from torch.utils.flop_counter import FlopCounterMode

    step, channels_last = _build(replace(args, compile="off"), variant, device)
    x, y = batch
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    step(x, y)  # optimizer state exists, as in a timed step
    with FlopCounterMode(display=False) as counter:
        step(x, y)
    return counter.get_total_flops() / 1e9


def measure(args: StepBenchArgs, variant: str, device: torch.device, batch: tuple[torch.Tensor, torch.Tensor]) -> VariantResult:
    step, channels_last = _build(args, variant, device)
    x, y = batch
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    _sync(device)
    t0 = time.perf_counter()
    step(x, y)
    _sync(device)
    first = time.perf_counter() - t0
    for _ in range(max(args.warmup - 1, 0)):
        step(x, y)
    windows = []
    for _ in range(args.repeats):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step(x, y)
        _sync(device)
        windows.append(args.steps * args.batch_size / (time.perf_counter() - t0))
    gflop = count_flops(args, variant, device, batch) if args.count_flops else None
    return VariantResult(variant, statistics.median(windows), min(windows), max(windows), windows, first, gflop)


def run(args: StepBenchArgs) -> dict:
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda but CUDA is not available: use --device cpu")
    device = torch.device("cuda" if use_cuda else "cpu")
    g = torch.Generator().manual_seed(args.seed)
    batch = (
        torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g).to(device),
        torch.randint(0, 1000, (args.batch_size,), generator=g).to(device),
    )
    results = [measure(args, v, device, batch) for v in args.variants]
    by = {r.variant: r.img_per_s_median for r in results}
    ratios = {}
    if "reference" in by:
        ratios.update({f"{v}/reference": by[v] / by["reference"] for v in by if v != "reference"})
    if "independent" in by:
        # cost of distillation: time per image relative to independent training of the same peers
        ratios.update({f"cost {v} vs independent": by["independent"] / by[v]
                       for v in by if v.startswith("afd") or v in ("extra-backward", "one", "cl")})
    if "extra-backward" in by and "afd-simultaneous" in by:
        ratios["cost afd-simultaneous vs extra-backward"] = by["extra-backward"] / by["afd-simultaneous"]
    flops = {r.variant: r.gflop_per_step for r in results if r.gflop_per_step}
    if "independent" in flops:
        # the same comparison in arithmetic: what the variant computes per image, relative to independent
        ratios.update({f"FLOP {v} vs independent": flops[v] / flops["independent"] for v in flops if v not in ("independent", "reference")})
    return {
        "benchmark": "step",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(args).items()},
        "device": str(device),
        "hardware": env.hardware(device),
        "versions": env.versions(),
        "git_sha": env.git_sha(),
        "results": [asdict(r) for r in results],
        "ratios": ratios,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def markdown(report: dict) -> str:
    a = report["args"]
    lines = [
        f"# Step throughput: {' + '.join(a['peers'])}, {a['image_size']} px, batch {a['batch_size']}, {report['device']}",
        "",
        f"Hardware: {report['hardware'].get('gpu') or report['hardware'].get('cpu', '')} ({report['hardware']['cpu_count']} threads); "
        f"torch {report['versions']['torch']}, timm {report['versions']['timm']}; git {report['git_sha']}; {report['date']}",
        "",
        f"Command: `fastafd bench step --peers {' '.join(a['peers'])} --image_size {a['image_size']} --batch_size {a['batch_size']} "
        f"--device {a['device']} --warmup {a['warmup']} --steps {a['steps']} --repeats {a['repeats']}"
        f"{' --count_flops' if a.get('count_flops') else ''}`",
        "",
        "| variant | img/s median | min | max | first step (s, incl. compile) | GFLOP/step |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in report["results"]:
        gflop = f"{r['gflop_per_step']:.1f}" if r.get("gflop_per_step") else "-"
        lines.append(f"| {r['variant']} | {r['img_per_s_median']:.1f} | {r['img_per_s_min']:.1f} | {r['img_per_s_max']:.1f} "
                     f"| {r['first_step_s']:.2f} | {gflop} |")
    lines += ["", "| ratio | value |", "| --- | ---: |"]
    lines += [f"| {k} | {v:.2f}x |" for k, v in report["ratios"].items()]
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = report["results"]
    names = [r["variant"] for r in res]
    med = [r["img_per_s_median"] for r in res]
    err = [[m - r["img_per_s_min"] for m, r in zip(med, res)], [r["img_per_s_max"] - m for m, r in zip(med, res)]]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar(names, med, yerr=err, capsize=4, color=["#888888"] + ["#3a7bd5"] * (len(names) - 1))
    a = report["args"]
    ax.set_ylabel("img/s (median, min-max)")
    ax.set_title(f"{' + '.join(a['peers'])}, {a['image_size']} px, batch {a['batch_size']}, {report['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def main(args: StepBenchArgs) -> Path:
    outputs.check_empty(args.out)
    if args.name:  # the file names are known before the benchmark runs: refuse a target before minutes of timing
        result_files(args.out, args.name).check()
    report = run(args)
    stem = args.name or f"{report['device']}-{'+'.join(args.peers)}-{args.image_size}"
    writer = result_files(args.out, stem)
    writer.check()
    base = writer.paths[0].with_suffix("")
    writer.write_text(base.with_suffix(".json"), json.dumps(report, indent=2) + "\n")
    writer.write_text(base.with_suffix(".md"), markdown(report))
    try:
        writer.write(base.with_suffix(".png"), lambda tmp: plot(report, tmp))
    except ImportError:
        pass  # matplotlib is optional; the JSON and Markdown carry the numbers
    print(markdown(report))
    return base


def result_files(out: Path, stem: str) -> outputs.Outputs:
    """The JSON, Markdown and PNG of a result: ``out`` ending in .md names them, else ``out/step-<stem>.*``."""
    folder, name = outputs.resolve(Path(out), Path(out), ".md", f"step-{stem}")
    paths = [folder / f"{name}.{ext}" for ext in ("json", "md", "png")]
    return outputs.Outputs(paths, folder=None, recognise=_earlier_result)


def _earlier_result(path: Path) -> bool:
    """A result file `fastafd bench step` wrote before results had a ledger (the committed ones)."""
    try:
        if path.suffix == ".png":
            return _earlier_result(path.with_suffix(".json"))
        head = path.read_text(errors="replace")[:200]
    except OSError:
        return False
    return head.startswith("# Step throughput:") if path.suffix == ".md" else ('"git_sha"' in path.read_text(errors="replace") and '"device"' in head)


def cmd(argv: list[str]) -> int:
    from fastafd.args import tyro_parse

    args = tyro_parse(StepBenchArgs, argv, prog="fastafd bench step", description=StepBenchArgs.__doc__ or "")
    args = replace(args, variants=tuple(args.variants))
    for v in args.variants:
        if v not in VARIANTS:
            raise UserError(f"unknown variant '{v}': choose from {', '.join(VARIANTS)}")
    main(args)
    return 0
