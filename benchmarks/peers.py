"""End-to-end training throughput of fastafd against the tools users would run instead, in one run.

fastafd's other benchmarks measure it against its own plain reference. Users compare it with what
they would otherwise pick, so this one runs those tools on the same generated JPEG folder (ImageNet
file sizes, a class-dependent colour cast so that accuracy means something: data.py's make_folder),
the same peers, image size, batch, device, CPU threads / loader workers, learning rate and seeds:

* ``independent``: fastafd ``--method.name independent`` (both peers in one process, one input
  pipeline) against timm's own training loop run once per peer, one run after the other: without
  distillation a timm user trains two models as two train.py jobs, and on one machine they run in
  sequence (two at once would only share the same cores). The pair's img/s is
  batch x steps / (timed window of run A + timed window of run B). timm's train.py is not in timm's
  pip distributions (wheel or sdist), so the timm runs are timm's library wired as train.py wires it
  (create_dataset, create_loader with its prefetcher, ClassificationTask, create_optimizer_v2) and
  train.py's train_one_epoch step (forward, backward, step, loss.item(), zero_grad).
* ``dml``: fastafd ``dml`` against torchdistill with the teacher made trainable
  (benchmarks/configs/torchdistill_dml.yaml, driven by the loop of torchdistill's example script).
* ``afd``: fastafd ``afd`` (sequential order) against fastafd/bench/reference.py, the plain PyTorch
  AFD written from docs/method.md, fed by torchvision ImageFolder + DataLoader (the loader of the
  torchdistill config). torchdistill has one optimizer per training stage and AFD needs two updated in
  the same iteration, so AFD has no torchdistill counterpart; timm has no online distillation.

Every tool runs in a fresh process (this script with ``--worker``), as a user would start it.
Timing is the same for all: torch's global optimizer post-step hook stamps ``perf_counter()`` after
each step of the process's training optimizer (the one that steps most, the first of those: the
logit stage in AFD, so one stamp per iteration), and img/s = batch x steps / (stamp after step
warmup + steps - stamp after step warmup): whole iterations after the warm-up, data loading included;
start-up, compilation and evaluation excluded. Repeats interleave the tools (each repeat runs every
comparison, fastafd first in even repeats and last in odd ones), so a change of machine load hits all
alike; repeat r uses seed + r for every tool. Ratios (fastafd / peer) are computed per repeat and
reported as median, min and max. After its warmup + steps iterations each tool evaluates top-1 of each
peer on the val split with its own validation pipeline (shorter side to size / 0.875, centre crop).

    python benchmarks/peers.py                    # writes benchmarks/results/peers.{json,md}
    python benchmarks/peers.py --wait-load 1.5 --quiet 0.1   # the committed run: a quiet start, and every run
                                                  # again that other processes disturbed (> 10 % of the CPU)
    python benchmarks/peers.py --images 96 --val-images 16 --peers resnet10t resnet10t --size 32 --batch 8 \\
        --warmup 1 --steps 2 --repeats 2 --out /tmp/peers   # a smoke run (tests/e2e/test_bench.py)

Needs ``pip install -e '.[bench]'`` (the pinned timm and torchdistill).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import string
import subprocess
import sys
import tempfile
import time
from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
CONFIGS = HERE / "configs"
TORCHDISTILL_CONFIG = CONFIGS / "torchdistill_dml.yaml"
PINNED = {"timm": "1.0.31", "torchdistill": "1.1.5"}  # pyproject.toml, extra "bench"

VAL_CROP_RATIO = 0.875  # fastafd's data.val_crop_ratio default; timm's crop_pct; the torchvision Resize below
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TOOLS = ("fastafd-independent", "timm-peer0", "timm-peer1", "fastafd-dml", "torchdistill-dml", "fastafd-afd", "reference-afd")
COMPARISONS = {
    "independent": ("fastafd-independent", ("timm-peer0", "timm-peer1")),
    "dml": ("fastafd-dml", ("torchdistill-dml",)),
    "afd": ("fastafd-afd", ("reference-afd",)),
}
PEER_NAMES = {"independent": "timm (its train.py loop, one run per peer, in sequence)",
              "dml": "torchdistill (trainable teacher)", "afd": "plain PyTorch reference (fastafd/bench/reference.py)"}
NOT_COMPARED = [
    "AFD in torchdistill: a torchdistill training stage has one optimizer (train.optimizer) and one "
    "loss; AFD updates the discriminators and the feature extractors with a second optimizer (Adam) "
    "inside the same iteration as the SGD logit step, so torchdistill cannot run it without new "
    "training code: afd is compared with the plain PyTorch reference only.",
    "AFD or DML in timm: timm's train.py distils only from a fixed pretrained teacher (--kd-model-name), "
    "never two peers learning together, so timm is the counterpart of independent training only.",
    "timm's real train.py: it is not in timm's wheel or sdist (pip download --no-binary :all: timm==1.0.31 "
    "holds the package and tests only), so the timm runs use timm's library as train.py wires it.",
]


@dataclass
class Settings:
    """What every worker gets (as JSON): the same data, peers, sizes, threads and hyper-parameters."""

    root: str
    peers: tuple[str, str]
    image_size: int
    batch: int
    warmup: int
    steps: int
    workers: int
    seed: int
    lr: float
    momentum: float
    weight_decay: float
    temperature: float
    adam_lr: float
    adam_weight_decay: float
    num_classes: int

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps

    @property
    def val_resize(self) -> int:
        return round(self.image_size / VAL_CROP_RATIO)


# --- the clock ------------------------------------------------------------------------------------


class StepClock:
    """perf_counter() after every optimizer step in this process, per optimizer (torch's global post-step hook).

    The same instrument for every tool, outside their code. fastafd probes its fused kernels with
    throw-away optimizers at start-up, and AFD steps three optimizers per iteration, so the training
    optimizer is the one that stepped most (the first of those to step). Optimizers are told apart by a
    number stored on them, not by ``id()``, which a later object can reuse once a probe is freed.
    """

    def __init__(self) -> None:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.stamps: dict[int, list[float]] = {}
        self.handle = register_optimizer_step_post_hook(self._hook)

    def _hook(self, optimizer, args, kwargs) -> None:
        key = optimizer.__dict__.setdefault("_peers_clock_key", len(self.stamps))
        self.stamps.setdefault(key, []).append(time.perf_counter())

    def training_stamps(self) -> list[float]:
        most = max((len(s) for s in self.stamps.values()), default=0)
        return next((s for s in self.stamps.values() if len(s) == most), [])


# --- the tools (each in its own worker process) ---------------------------------------------------


def torchvision_loaders(s: Settings):
    """torchvision ImageFolder + DataLoader, the augmentation of torchdistill_dml.yaml (plain PyTorch)."""
    import torch
    from torchvision import datasets, transforms

    train_tf = transforms.Compose([transforms.RandomResizedCrop(s.image_size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)),
                                   transforms.RandomHorizontalFlip(0.5), transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    val_tf = transforms.Compose([transforms.Resize(s.val_resize), transforms.CenterCrop(s.image_size), transforms.ToTensor(),
                                 transforms.Normalize(MEAN, STD)])
    root = Path(s.root)
    train = torch.utils.data.DataLoader(datasets.ImageFolder(root / "train", train_tf), batch_size=s.batch, shuffle=True,
                                        num_workers=s.workers, drop_last=True)
    val = torch.utils.data.DataLoader(datasets.ImageFolder(root / "val", val_tf), batch_size=s.batch, num_workers=s.workers)
    return train, val


def top1(model, loader, device) -> float:
    """Top-1 (%) over the whole loader, the model in eval mode (the examples' evaluate())."""
    import torch

    model.eval()
    correct = count = 0
    with torch.inference_mode():
        for batch in loader:
            x, y = batch[0].to(device), batch[1].to(device)
            correct += int((model(x).argmax(dim=1) == y).sum())
            count += int(y.numel())
    return 100.0 * correct / count


def fastafd_argv(s: Settings, method: str, out: Path) -> list[str]:
    """The `fastafd train` command line of a run (the CLI users run)."""
    return ["train", "--data", s.root, "--data.format", "folder", "--model.peers", *s.peers, "--method.name", method,
            "--data.image_size", str(s.image_size), "--data.batch_size", str(s.batch), "--data.num_threads", str(s.workers),
            "--optim.lr", repr(s.lr), "--optim.lr_batch_ref", "0", "--optim.milestones", "1.0", "--adv_optim.milestones", "1.0",
            "--loop.epochs", "1", "--loop.max_steps_per_epoch", str(s.total_steps), "--system.seed", str(s.seed),
            "--checkpoint.every_steps", "0", "--log.tensorboard", "off", "--log.progress", "off", "--out", str(out)]


def run_fastafd(s: Settings, method: str, scratch: Path) -> list[float]:
    from fastafd import cli

    out = scratch / f"fastafd-{method}"
    rc = cli.main(fastafd_argv(s, method, out))
    if rc != 0:
        raise RuntimeError(f"fastafd train exited {rc}")
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return [p["top1"] for p in row["peers"]]


def timm_train_flags(s: Settings, index: int) -> str:
    """The train.py command line whose settings run_timm reproduces (for the report)."""
    return (f"train.py DATA --model {s.peers[index]} --num-classes {s.num_classes} --img-size {s.image_size} "
            f"--batch-size {s.batch} --workers {s.workers} --device cpu --seed {s.seed} --opt momentum --lr {s.lr:g} "
            f"--momentum {s.momentum} --weight-decay {s.weight_decay:g} --sched none --warmup-epochs 0 --smoothing 0 "
            f"--color-jitter 0 --train-interpolation bilinear --interpolation bilinear --crop-pct {VAL_CROP_RATIO} "
            f"--scale 0.08 1 --ratio 0.75 1.3333 --hflip 0.5 --val-split val  (no --amp, no --channels-last, no --torchcompile)")


def run_timm(s: Settings, index: int, scratch: Path) -> list[float]:
    """One peer trained by timm as its train.py does it (see timm_train_flags for the equivalent flags)."""
    import timm
    import torch
    from timm import utils
    from timm.data import create_dataset, create_loader, resolve_data_config
    from timm.optim import create_optimizer_v2
    from timm.task import ClassificationTask

    utils.random_seed(s.seed, 0)
    device = torch.device("cpu")
    model = timm.create_model(s.peers[index], num_classes=s.num_classes)
    data_config = resolve_data_config({"input_size": (3, s.image_size, s.image_size), "interpolation": "bilinear",
                                       "crop_pct": VAL_CROP_RATIO, "mean": MEAN, "std": STD}, model=model)
    model.to(device=device)
    common = dict(mean=data_config["mean"], std=data_config["std"], pin_memory=False, img_dtype=torch.float32, device=device,
                  distributed=False, use_prefetcher=True)  # train.py's defaults: the prefetcher on, no --pin-mem
    dataset_train = create_dataset("", root=s.root, split="train", is_training=True, batch_size=s.batch, seed=s.seed)
    dataset_eval = create_dataset("", root=s.root, split="val", is_training=False, batch_size=s.batch)
    loader_train = create_loader(dataset_train, input_size=data_config["input_size"], batch_size=s.batch, is_training=True,
                                 no_aug=False, re_prob=0.0, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip=0.5, vflip=0.0,
                                 color_jitter=0.0, auto_augment=None, interpolation="bilinear", num_workers=s.workers, **common)
    loader_eval = create_loader(dataset_eval, input_size=data_config["input_size"], batch_size=s.batch, is_training=False,
                                interpolation=data_config["interpolation"], num_workers=s.workers, crop_pct=data_config["crop_pct"],
                                **common)
    task = ClassificationTask(model=model, criterion=torch.nn.CrossEntropyLoss(), device=device, verbose=False)
    optimizer = create_optimizer_v2(task.get_trainable_module(), opt="momentum", lr=s.lr, weight_decay=s.weight_decay,
                                    momentum=s.momentum)
    amp_autocast = suppress  # train.py without --amp
    losses_m = utils.AverageMeter()
    task.get_trainable_module().train()
    optimizer.zero_grad()
    updates = 0
    while updates < s.total_steps:  # train.py's train_one_epoch, one update per batch (no accumulation)
        for input, target in loader_train:  # the prefetcher has already put them on the device
            with amp_autocast():
                loss = task(input, target)["loss"]
            loss.backward()
            optimizer.step()
            losses_m.update(loss.item(), input.shape[0])
            optimizer.zero_grad()
            updates += 1
            if updates == s.total_steps:
                break
    model.eval()  # train.py's validate()
    top1_m = utils.AverageMeter()
    with torch.inference_mode():
        for input, target in loader_eval:
            output = model(input)
            acc1, _ = utils.accuracy(output, target, topk=(1, min(5, s.num_classes)))
            top1_m.update(acc1.item(), output.shape[0])
    return [top1_m.avg]


def torchdistill_config_text(s: Settings) -> str:
    """benchmarks/configs/torchdistill_dml.yaml with the run's settings filled in (JSON scalars are YAML)."""
    values = {"train_root": str(Path(s.root) / "train"), "val_root": str(Path(s.root) / "val"), "image_size": s.image_size,
              "val_resize": s.val_resize, "teacher": s.peers[0], "student": s.peers[1], "num_classes": s.num_classes,
              "batch_size": s.batch, "workers": s.workers, "lr": s.lr, "temperature": s.temperature}
    return string.Template(TORCHDISTILL_CONFIG.read_text()).substitute({k: json.dumps(v) for k, v in values.items()})


def run_torchdistill(s: Settings, scratch: Path) -> list[float]:
    """torchdistill's examples/torchvision/image_classification.py, as far as training goes: same calls, same order."""
    import torch
    from torchdistill.common import yaml_util
    from torchdistill.common.main_util import import_dependencies, set_seed
    from torchdistill.core.distillation import get_distillation_box
    from torchdistill.datasets.util import build_data_loader
    from torchdistill.misc.log import MetricLogger, SmoothedValue
    from torchdistill.models.official import get_image_classification_model
    from torchdistill.models.registry import get_model

    sys.path.insert(0, str(CONFIGS))  # the config's `dependencies`: torchdistill_dml_modules
    set_seed(s.seed)
    path = scratch / "torchdistill_dml.yaml"
    path.write_text(torchdistill_config_text(s))
    config = yaml_util.load_yaml_file(str(path))
    import_dependencies(config.get("dependencies", None))
    device = torch.device("cpu")

    def load_model(model_config):  # the example's load_model (no checkpoint)
        model = get_image_classification_model(model_config, False)
        if model is None:
            model = get_model(model_config["key"], model_config.get("repo_or_dir", None), **model_config["kwargs"])
        return model.to(device)

    teacher = load_model(config["models"]["teacher_model"])
    student = load_model(config["models"]["student_model"])
    box = get_distillation_box(teacher, student, config["datasets"], config["train"], device, None, False, 1)
    assert box.teacher_updatable and sum(p.numel() for g in box.optimizer.param_groups for p in g["params"]) == sum(
        p.numel() for m in (teacher, student) for p in m.parameters()), "the teacher is not trained"
    box.pre_epoch_process(epoch=0)
    metric_logger = MetricLogger(delimiter="  ")  # the example's train_one_epoch
    metric_logger.add_meter("lr", SmoothedValue(window_size=1, fmt="{value}"))
    metric_logger.add_meter("img/s", SmoothedValue(window_size=10, fmt="{value}"))
    updates = 0
    for sample_batch, targets, supp_dict in metric_logger.log_every(box.train_data_loader, config["train"]["log_freq"], "Epoch: [0]"):
        start_time = time.time()
        sample_batch, targets = sample_batch.to(device), targets.to(device)
        loss = box.forward_process(sample_batch, targets, supp_dict)
        box.post_forward_process(loss=loss)
        metric_logger.update(loss=loss.item(), lr=box.optimizer.param_groups[0]["lr"])
        metric_logger.meters["img/s"].update(sample_batch.shape[0] / (time.time() - start_time))
        updates += 1
        if updates == s.total_steps:
            break
    if updates < s.total_steps:
        raise RuntimeError(f"torchdistill's loader ran out after {updates} steps")
    test_config = config["test"]["test_data_loader"]
    test_loader = build_data_loader(config["datasets"][test_config["dataset_id"]], test_config, False)
    return [top1(box.teacher_model, test_loader, device), top1(box.student_model, test_loader, device)]


def run_reference(s: Settings, scratch: Path) -> list[float]:
    """fastafd/bench/reference.py's AFD iteration (sequential order) on torchvision's ImageFolder + DataLoader."""
    import torch

    from fastafd.bench.reference import ReferenceAFD
    from fastafd.models.peers import create_peer, feature_shape

    torch.manual_seed(s.seed)
    nets = [create_peer(name, s.num_classes, image_size=s.image_size) for name in s.peers]
    shapes = [feature_shape(net, s.image_size) for net in nets]
    ref = ReferenceAFD(nets, shapes, temperature=s.temperature, sgd=dict(lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay),
                       adam=dict(lr=s.adam_lr, weight_decay=s.adam_weight_decay))
    for module in nets + ref.transfers + ref.discs:
        module.train()
    train, val = torchvision_loaders(s)
    updates = 0
    while updates < s.total_steps:
        for x, y in train:
            ref.iteration(x, y)
            updates += 1
            if updates == s.total_steps:
                break
    return [top1(net, val, torch.device("cpu")) for net in nets]


def worker(tool: str, spec: Path, result: Path) -> int:
    """Run one tool in this (fresh) process and write its step stamps and accuracies to ``result``."""
    started = time.perf_counter()
    raw = json.loads(spec.read_text())
    s = Settings(**{**raw, "peers": tuple(raw["peers"])})
    clock = StepClock()
    with tempfile.TemporaryDirectory(prefix=f"fastafd-peers-{tool}-") as tmp:
        scratch = Path(tmp)
        if tool.startswith("fastafd-"):
            accuracy = run_fastafd(s, tool.removeprefix("fastafd-"), scratch)
        elif tool.startswith("timm-peer"):
            accuracy = run_timm(s, int(tool.removeprefix("timm-peer")), scratch)
        elif tool == "torchdistill-dml":
            accuracy = run_torchdistill(s, scratch)
        elif tool == "reference-afd":
            accuracy = run_reference(s, scratch)
        else:
            raise SystemExit(f"unknown tool {tool}")
    stamps = clock.training_stamps()
    if len(stamps) != s.total_steps:
        raise SystemExit(f"{tool}: {len(stamps)} training steps stamped, expected {s.total_steps}")
    window = stamps[s.total_steps - 1] - stamps[s.warmup - 1]
    result.write_text(json.dumps({"tool": tool, "window_s": window, "timed_images": s.steps * s.batch, "img_per_s": s.steps * s.batch / window,
                                  "to_first_step_s": stamps[0] - started, "top1": accuracy}) + "\n")
    return 0


# --- the driver -----------------------------------------------------------------------------------


def cpu_busy_s() -> float:
    """Busy CPU seconds of the whole machine since boot (/proc/stat: everything but idle and iowait)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds of this process and of its finished children (the tools' runs and their loader workers)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def others_share(seconds: float) -> float:
    """Fraction of all cores that other processes kept busy over the next ``seconds`` (this one sleeps)."""
    busy, own, start = cpu_busy_s(), own_cpu_s(), time.perf_counter()
    time.sleep(seconds)
    return max(0.0, (cpu_busy_s() - busy) - (own_cpu_s() - own)) / ((time.perf_counter() - start) * (os.cpu_count() or 1))


@dataclass
class Quiet:
    """--quiet: how much of the machine other processes may use while a tool runs (0: no checks)."""

    share: float = 0.0
    """Before each run wait until other processes use less than this fraction of all cores (3-s samples),
    and run a tool again when they used more during its run."""
    retries: int = 8
    max_wait: float = 1800.0


def run_tool(tool: str, spec: Path, scratch: Path, timeout: float, quiet: Quiet) -> dict:
    """One tool in a fresh interpreter, run again (up to ``quiet.retries`` times, then an error) when other
    processes used more than ``quiet.share`` of the CPU meanwhile; the load average and that share are kept
    with its result."""
    discarded: list[float] = []
    while True:
        if quiet.share:
            deadline = time.monotonic() + quiet.max_wait
            while (share := others_share(3.0)) >= quiet.share:
                if time.monotonic() > deadline:
                    raise SystemExit(f"peers.py: other processes kept {share:.0%} of the CPU busy for {quiet.max_wait:.0f} s: "
                                     "try again when the machine is quiet")
                print(f"peers.py: other processes use {share:.0%} of the CPU: waiting before {tool}", file=sys.stderr)
                time.sleep(10)
        out = _run_once(tool, spec, scratch, timeout)
        if not quiet.share or out["others_cpu_share"] < quiet.share:
            out["discarded_runs_others_cpu_share"] = discarded
            return out
        if len(discarded) == quiet.retries:  # a disturbed run is not a measurement: stop rather than keep it
            raise SystemExit(f"peers.py: other processes used more than {quiet.share:.0%} of the CPU during {quiet.retries + 1} "
                             f"runs of {tool} in a row: try again when the machine is quiet")
        print(f"peers.py: other processes used {out['others_cpu_share']:.0%} of the CPU during {tool}: running it again", file=sys.stderr)
        discarded.append(out["others_cpu_share"])


def _run_once(tool: str, spec: Path, scratch: Path, timeout: float) -> dict:
    result = scratch / f"{tool}.json"
    result.unlink(missing_ok=True)
    load_before, busy, own, start = os.getloadavg()[0], cpu_busy_s(), own_cpu_s(), time.perf_counter()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", tool, "--spec", str(spec), "--result", str(result)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    others = max(0.0, (cpu_busy_s() - busy) - (own_cpu_s() - own)) / ((time.perf_counter() - start) * (os.cpu_count() or 1))
    if proc.returncode != 0 or not result.is_file():
        tail = (proc.stdout[-1500:] + proc.stderr[-3000:]).strip()
        raise SystemExit(f"peers.py: {tool} failed (exit {proc.returncode}):\n{tail}")
    out = json.loads(result.read_text())
    out["load_1min"] = [load_before, os.getloadavg()[0]]
    out["others_cpu_share"] = others
    out["run_s"] = time.perf_counter() - start
    return out


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "values": values}


def summarize(runs: list[dict[str, dict]], comparisons: list[str]) -> dict:
    """Per tool: img/s and top-1 over repeats; per comparison: fastafd / peer, ratio of each repeat."""
    tools = [t for t in TOOLS if t in runs[0]]
    per_tool = {}
    for t in tools:
        per_tool[t] = {"img_per_s": spread([r[t]["img_per_s"] for r in runs]),
                       "to_first_step_s": spread([r[t]["to_first_step_s"] for r in runs]),
                       "top1_mean_of_peers": spread([statistics.mean(r[t]["top1"]) for r in runs]),
                       "top1_per_peer": [spread([r[t]["top1"][k] for r in runs]) for k in range(len(runs[0][t]["top1"]))]}
    ratios = {}
    for name in comparisons:
        fast, peers = COMPARISONS[name]
        per_repeat = []
        peer_rates = []
        for r in runs:
            # the pair's img/s: images that trained both peers / the time spent on them (timm: its two runs' windows added up)
            peer_rate = r[fast]["timed_images"] / sum(r[p]["window_s"] for p in peers)
            peer_rates.append(peer_rate)
            per_repeat.append(r[fast]["img_per_s"] / peer_rate)
        ratios[name] = {"fastafd": fast, "peer": list(peers), "peer_img_per_s": spread(peer_rates), "ratio": spread(per_repeat)}
    return {"tools": per_tool, "ratios": ratios}


def load_sibling(name: str):
    """A script of benchmarks/ as a module (they are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"fastafd_benchmarks_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


VERSIONS = ("torch", "torchvision", "timm", "torchdistill", "nvidia-dali-cuda130", "pillow", "numpy", "fastafd")
"""The packages the peers benchmark records (:func:`fastafd.run.env.versions`)."""


def wait_for_quiet(threshold: float, max_wait: float) -> list[float]:
    """Wait (polling every 15 s) until the 1-min load average is below ``threshold``; the readings seen."""
    seen = [os.getloadavg()[0]]
    deadline = time.monotonic() + max_wait
    while seen[-1] >= threshold:
        if time.monotonic() > deadline:
            raise SystemExit(f"peers.py: the 1-min load average stayed >= {threshold} for {max_wait:.0f} s "
                             f"(now {seen[-1]:.2f}): try again when the machine is quiet")
        print(f"peers.py: 1-min load average {seen[-1]:.2f} >= {threshold}: waiting", file=sys.stderr)
        time.sleep(15)
        seen.append(os.getloadavg()[0])
    return seen


def check_installed(comparisons: list[str]) -> None:
    from importlib.metadata import PackageNotFoundError, version

    need = ["timm"] + (["torchdistill"] if "dml" in comparisons else [])
    for name in need:
        try:
            got = version(name)
        except PackageNotFoundError:
            raise SystemExit(f"peers.py: {name} is not installed: pip install -e '.[bench]' (or run --comparisons independent afd)") from None
        if got != PINNED[name]:
            print(f"peers.py: {name} {got} is installed, the benchmark pins {PINNED[name]} (pip install -e '.[bench]')", file=sys.stderr)


def describe(s: Settings) -> dict:
    """What each tool runs, in the words and flags of that tool."""
    fast = "fastafd " + " ".join(fastafd_argv(s, "{independent,dml,afd}", Path("OUT"))).replace(s.root, "DATA")
    return {
        "fastafd": f"{fast}  (CPU defaults: fp32, NCHW, eager, torch's fused SGD/Adam; DALI decodes the crop window on "
                   f"{s.workers} CPU threads, resize/flip/normalize in torch; afd: sequential order, Adam lr {s.adam_lr:g} "
                   f"weight decay {s.adam_weight_decay:g} for discriminators and feature extractors)",
        "timm": "timm's library as its train.py wires it: create_dataset('', split='train'/'val'), create_loader (prefetcher on: "
                "uint8 batches normalized in the main process), ClassificationTask(CrossEntropyLoss), "
                "create_optimizer_v2(opt='momentum': torch SGD, momentum, no Nesterov; weight decay not applied to "
                "biases and norm weights, timm's default), train_one_epoch's step (forward, backward, step, loss.item(), "
                "zero_grad), validate(); equivalent command: " + timm_train_flags(s, 0) + "; then the same with --model "
                f"{s.peers[1]}",
        "torchdistill": "benchmarks/configs/torchdistill_dml.yaml (teacher requires_grad: True; both peers in one torch SGD; "
                        "CE of both + MutualKLLoss both ways, T = " f"{s.temperature:g}) run by the training loop of "
                        "torchdistill's examples/torchvision/image_classification.py (get_distillation_box, pre_epoch_process, "
                        "MetricLogger.log_every over the train loader, forward_process, post_forward_process, loss.item()); "
                        f"torchvision ImageFolder + DataLoader, {s.workers} workers",
        "reference": "fastafd/bench/reference.py ReferenceAFD.iteration (eager fp32, Python loops over peers and "
                     "discriminators, torch's default for-loop SGD and Adam, same hyper-parameters as fastafd afd) fed by "
                     f"torchvision ImageFolder + DataLoader (shuffle, {s.workers} workers, drop_last)",
        "augmentation": "all: random-resized-crop area 0.08-1, aspect 3/4-4/3, bilinear (antialiased) resize to "
                        f"{s.image_size} px, horizontal flip 0.5, ImageNet mean/std; validation: shorter side to "
                        f"{s.val_resize}, centre crop {s.image_size}. Differences: fastafd decodes only the crop window "
                        "(DALI's ROI decode) where the others decode the whole JPEG with PIL and then crop; "
                        "timm's train.py defaults were overridden to match (--color-jitter 0 instead of 0.4, "
                        "--train-interpolation bilinear instead of random, --smoothing 0 instead of 0.1, --opt momentum "
                        "instead of Nesterov sgd, constant lr instead of cosine with 5 warm-up epochs).",
        "learning_rate": f"SGD lr {s.lr:g} (fastafd's 0.1 x batch / 256), momentum {s.momentum}, weight decay "
                         f"{s.weight_decay:g}, constant (no schedule) in every tool",
    }


def markdown(result: dict) -> str:
    c, hw, v = result["config"], result["hardware"], result["versions"]
    lines = [
        "# Training throughput against the tools users would run instead",
        "",
        f"`{result['command']}` on {hw['cpu']} ({hw['cores']} cores, GPU: {hw['gpu'] or 'none'}); "
        f"torch {v.get('torch')}, torchvision {v.get('torchvision')}, timm {v.get('timm')}, torchdistill {v.get('torchdistill')}, "
        f"DALI {v.get('nvidia-dali-cuda130')}; fastafd git {result['git_sha']}; {result['date']}.",
        "",
        f"Peers {' + '.join(c['peers'])}, {c['image_size']} px, batch {c['batch']}, {c['workers']} loader threads/workers and "
        f"torch's default intra-op threads, CPU, fp32. {c['train_images']} training JPEGs (about 500x375, mean "
        f"{c['mean_file_kb']:.0f} KB) and {c['val_images']} validation JPEGs of {c['num_classes']} classes (benchmarks/data.py's "
        f"make_folder with a class colour cast of {c['class_signal']:g} grey levels). Each run: {c['warmup']} warm-up steps, "
        f"then {c['steps']} timed steps (data loading included), then top-1 on the val split; {c['repeats_done']} repeats"
        + ("" if c["repeats_done"] == c["repeats"] else f" (of the {c['repeats']} asked for: the run was stopped after them)") + ", "
        f"interleaved (seed {c['seed']} + repeat). 1-min load average: {result['load_average_1min']['before']:.2f} before, "
        f"{result['load_average_1min']['after']:.2f} after (per run: {result['load_average_1min']['runs_min']:.2f}-"
        f"{result['load_average_1min']['runs_max']:.2f}; the tools' own processes count in it). Other processes used "
        f"{result['others_cpu_share']['kept_runs_median']:.1%} of the CPU during the median run, at most "
        f"{result['others_cpu_share']['kept_runs_max']:.1%} (/proc/stat less this benchmark's processes)"
        + (f"; with --quiet {result['others_cpu_share']['quiet']:g}, {len(result['others_cpu_share']['discarded_runs'])} run(s) "
           "disturbed by more than that were run again" if result["others_cpu_share"]["quiet"] else "") + ".",
        "",
        "| comparison | fastafd img/s | peer | peer img/s | fastafd / peer: median | min | max |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    tools = result["summary"]["tools"]
    for name, r in result["summary"]["ratios"].items():
        fast = tools[r["fastafd"]]["img_per_s"]["median"]
        lines.append(f"| {name} | {fast:.1f} | {PEER_NAMES[name]} | {r['peer_img_per_s']['median']:.1f} | "
                     f"**{r['ratio']['median']:.2f}x** | {r['ratio']['min']:.2f}x | {r['ratio']['max']:.2f}x |")
    lines += ["", "Peer img/s of `independent`: the two timm runs' images / their two windows added up (each image trains "
              "both peers, as in fastafd).", "",
              "| tool | img/s median | min | max | top-1 % (mean of peers, median over repeats) | min | max | top-1 % per peer | "
              "start to first step (s) |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for t, r in tools.items():
        per_peer = " / ".join(f"{p['median']:.1f}" for p in r["top1_per_peer"])
        lines.append(f"| {t} | {r['img_per_s']['median']:.1f} | {r['img_per_s']['min']:.1f} | {r['img_per_s']['max']:.1f} | "
                     f"{r['top1_mean_of_peers']['median']:.1f} | {r['top1_mean_of_peers']['min']:.1f} | "
                     f"{r['top1_mean_of_peers']['max']:.1f} | {per_peer} | {r['to_first_step_s']['median']:.1f} |")
    lines += ["", f"Chance is {100 / c['num_classes']:.1f} %. timm-peer0/1 are one peer each; torchdistill-dml's peers are its "
              "teacher / student.", "", "## What each tool runs", ""]
    lines += [f"* **{k}**: {text}" for k, text in result["tools_run"].items()]
    lines += ["", "## Not compared", ""] + [f"* {text}" for text in result["not_compared"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1024, help="training JPEGs generated")
    p.add_argument("--val-images", type=int, default=320, help="validation JPEGs generated")
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--class-signal", type=float, default=60.0, help="class colour cast in grey levels (make_folder)")
    p.add_argument("--data", type=Path, default=None, help="an existing ImageNet-layout folder instead of generated JPEGs")
    p.add_argument("--peers", nargs=2, default=["resnet18", "resnet18"], help="two timm model names")
    p.add_argument("--size", type=int, default=64, help="training crop size (px)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per run")
    p.add_argument("--steps", type=int, default=25, help="timed steps per run")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--workers", type=int, default=0, help="DALI threads = DataLoader workers; 0: the CPU cores")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--comparisons", nargs="+", default=list(COMPARISONS), choices=list(COMPARISONS))
    p.add_argument("--wait-load", type=float, default=0.0, help="first wait until the 1-min load average is below this (0: don't)")
    p.add_argument("--quiet", type=float, default=0.0,
                   help="before each run wait until other processes use less than this fraction of all cores, and run a tool "
                        "again (up to --retries times) when they used more during its run (0: no checks)")
    p.add_argument("--retries", type=int, default=8, help="reruns of one tool that --quiet allows before it gives up")
    p.add_argument("--max-wait", type=float, default=1800.0, help="seconds --wait-load and --quiet wait before giving up")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds one tool's run may take")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for peers.json and peers.md")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker:
        return worker(a.worker, a.spec, a.result)
    if a.warmup < 1 or a.steps < 1 or a.repeats < 1:
        raise SystemExit("peers.py: --warmup, --steps and --repeats must be >= 1")
    check_installed(a.comparisons)
    data = load_sibling("data")  # benchmarks/data.py: make_folder, hardware

    workers = a.workers or cores()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="fastafd-peers-") as tmp:
        scratch = Path(tmp)
        root = a.data or scratch / "data"
        if a.data is None:
            data.make_folder(root, a.images, classes=a.classes, seed=a.seed, val_images=a.val_images, class_signal=a.class_signal)
        classes = sorted(d.name for d in (root / "train").iterdir() if d.is_dir())
        train_files = sorted(f for f in (root / "train").rglob("*") if f.is_file())
        val_files = [f for f in (root / "val").rglob("*") if f.is_file()]
        if len(train_files) // a.batch < a.warmup + a.steps:
            raise SystemExit(f"peers.py: {len(train_files)} training images make {len(train_files) // a.batch} batches of {a.batch}: "
                             f"fewer than --warmup + --steps = {a.warmup + a.steps}; raise --images")
        s = Settings(root=str(root), peers=tuple(a.peers), image_size=a.size, batch=a.batch, warmup=a.warmup, steps=a.steps,
                     workers=workers, seed=a.seed, lr=0.1 * a.batch / 256, momentum=0.9, weight_decay=1e-4, temperature=3.0,
                     adam_lr=2e-5, adam_weight_decay=0.1, num_classes=len(classes))
        waited = wait_for_quiet(a.wait_load, a.max_wait) if a.wait_load else [os.getloadavg()[0]]
        quiet = Quiet(share=a.quiet, retries=a.retries, max_wait=a.max_wait)
        load_before = os.getloadavg()[0]
        mean_kb = statistics.mean(f.stat().st_size for f in train_files) / 1024
        info = {"argv": argv if argv is not None else sys.argv[1:], "settings": s, "train_images": len(train_files),
                "val_images": len(val_files), "mean_kb": mean_kb, "waited": waited, "load_before": load_before,
                "started": started, "hardware": data.hardware()}
        runs: list[dict[str, dict]] = []
        for r in range(a.repeats):
            spec = scratch / f"spec-{r}.json"
            spec.write_text(json.dumps({**asdict(s), "seed": a.seed + r}))
            results: dict[str, dict] = {}
            for name in a.comparisons:
                fast, peers = COMPARISONS[name]
                order = [fast, *peers] if r % 2 == 0 else [*peers, fast]
                for tool in order:
                    results[tool] = run_tool(tool, spec, scratch, a.timeout, quiet)
                    print(f"repeat {r + 1}/{a.repeats} {tool}: {results[tool]['img_per_s']:.1f} img/s, top-1 "
                          f"{' / '.join(f'{x:.1f}' for x in results[tool]['top1'])}", file=sys.stderr)
            runs.append(results)
            md = write_report(a, info, runs)  # after every repeat: an interrupted run keeps the repeats it finished
    print(md)
    return 0


def write_report(a: argparse.Namespace, info: dict, runs: list[dict[str, dict]]) -> str:
    """peers.json and peers.md of the repeats done so far; returns the Markdown."""
    from fastafd.run import env

    s: Settings = info["settings"]
    run_loads = [x for r in runs for t in r.values() for x in t["load_1min"]]
    others = [t["others_cpu_share"] for r in runs for t in r.values()]
    discarded = [x for r in runs for t in r.values() for x in t["discarded_runs_others_cpu_share"]]
    result = {
        "benchmark": "end-to-end training throughput vs timm, torchdistill and the plain reference",
        "command": "python benchmarks/peers.py " + " ".join(info["argv"]),
        "config": {"peers": list(s.peers), "image_size": s.image_size, "batch": s.batch, "warmup": s.warmup, "steps": s.steps,
                   "repeats": a.repeats, "repeats_done": len(runs), "workers": s.workers, "seed": a.seed,
                   "train_images": info["train_images"], "val_images": info["val_images"], "num_classes": s.num_classes,
                   "class_signal": a.class_signal if a.data is None else None, "mean_file_kb": round(info["mean_kb"], 1),
                   "lr": s.lr, "momentum": s.momentum, "weight_decay": s.weight_decay, "temperature": s.temperature,
                   "adam_lr": s.adam_lr, "adam_weight_decay": s.adam_weight_decay, "comparisons": a.comparisons,
                   "data": str(a.data) if a.data else "generated"},
        "tools_run": describe(s),
        "not_compared": NOT_COMPARED,
        "hardware": info["hardware"], "versions": env.versions(VERSIONS), "git_sha": env.git_sha(),
        "runs": runs,
        "summary": summarize(runs, a.comparisons),
        "load_average_1min": {"waited": info["waited"], "before": info["load_before"], "after": os.getloadavg()[0],
                              "runs_min": min(run_loads), "runs_max": max(run_loads)},
        "others_cpu_share": {"quiet": a.quiet, "kept_runs_max": max(others), "kept_runs_median": statistics.median(others),
                             "discarded_runs": discarded},
        "wall_s": round(time.time() - info["started"], 1),
        "kept_runs_s": round(sum(t["run_s"] for r in runs for t in r.values()), 1),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "peers.json").write_text(json.dumps(result, indent=1) + "\n")
    md = markdown(result)
    (a.out / "peers.md").write_text(md)
    return md


if __name__ == "__main__":
    sys.exit(main())
