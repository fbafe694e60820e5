"""Training-input throughput: fastafd's DALI pipeline vs torchvision ImageFolder + DataLoader.

Both read the same generated JPEG folder (ImageNet-like sizes and file sizes), apply the same
augmentation (random-resized-crop scale 0.08-1, ratio 3/4-4/3, to --size; horizontal flip;
normalize; float32 NCHW batches) with the same number of CPU threads / worker processes, in one
run. Each repeat times one full epoch of each pipeline, alternating (fastafd: including its per-epoch pipeline build;
torchvision: persistent workers, so worker start-up is not counted) after one warm-up epoch.

fastafd's CPU pipeline decodes the crop window in DALI and resizes/flips/normalizes in torch
(fastafd/data/cpu_finish.py); the row "resize + normalize in DALI" runs the GPU pipeline's graph
(DALI's CPU resize and crop_mirror_normalize) on the CPU instead, to show what that choice is worth.

    python benchmarks/data.py                      # writes benchmarks/results/data.{json,md}
    python benchmarks/data.py --images 256 --repeats 3 --out /tmp/data
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

RESULTS = Path(__file__).parent / "results"
FAST = "fastafd (DALI decode + torch finish, CPU)"
FAST_CL = "fastafd, channels-last output (the GPU layout)"
DALI_RESIZE = "fastafd with resize + normalize in DALI (the GPU graph on CPU)"
TORCHVISION = "torchvision ImageFolder + DataLoader"


def make_folder(root: Path, images: int, classes: int = 8, seed: int = 0, val_images: int | None = None,
                class_signal: float = 0.0) -> None:
    """JPEGs of ImageNet's typical sizes (about 500x375, some portrait) with natural-ish content.

    With ``class_signal`` 0 (this benchmark) the content does not depend on the class: only decoding
    and augmentation are measured. ``class_signal`` > 0 adds a class-specific colour cast of that many
    grey levels (a fixed random direction per class), which survives cropping and flipping, so a network
    learns the classes within a few dozen steps: benchmarks/peers.py reports accuracy with it. The
    images drawn for ``class_signal`` 0 and the default ``val_images`` (one per class) are the same
    bytes as before the option existed.
    """
    rng = np.random.default_rng(seed)
    palette = np.random.default_rng([seed, 1]).normal(size=(classes, 3))
    palette /= np.linalg.norm(palette, axis=1, keepdims=True)
    for split, n in (("train", images), ("val", classes if val_images is None else val_images)):
        for i in range(n):
            c = i % classes
            d = root / split / f"class{c:02d}"
            d.mkdir(parents=True, exist_ok=True)
            w, h = (500, 375) if i % 4 else (375, 500)
            w, h = int(w * rng.uniform(0.8, 1.1)), int(h * rng.uniform(0.8, 1.1))
            small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
            img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
            noise = rng.normal(0, 12, (h, w, 3))
            arr = np.asarray(img, dtype=np.float32) + noise
            if class_signal:
                arr = arr * (1 - class_signal / 255) + class_signal * (0.5 + 0.5 * palette[c])
            arr = np.clip(arr, 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(d / f"img{i:05d}.JPEG", quality=90)


def time_interleaved(makers: dict, repeats: int) -> tuple[dict[str, list[float]], int]:
    """Seconds per epoch of each pipeline: one warm-up epoch each, then the pipelines' timed epochs
    alternate (A B A B ...), so a change in machine load hits all of them alike."""
    sizes = {name: sum(x.shape[0] for x, _ in make(0)) for name, make in makers.items()}  # warm-up
    assert len(set(sizes.values())) == 1, sizes
    times: dict[str, list[float]] = {name: [] for name in makers}
    for r in range(repeats):
        for name, make in makers.items():
            start = time.perf_counter()
            count = sum(x.shape[0] for x, _ in make(r + 1))
            times[name].append(time.perf_counter() - start)
            assert count == sizes[name]
    return times, next(iter(sizes.values()))


def fastafd_iter(root: Path, batch: int, size: int, threads: int, channels_last: bool = False, cpu_finish: bool = True):
    from fastafd.config import DataConfig
    from fastafd.data import scan_folder
    from fastafd.data.dali import FolderReader, PipelineSettings, TrainLoader

    cfg = DataConfig(root=root, format="folder", batch_size=batch, image_size=size, num_threads=threads)
    settings = PipelineSettings(batch=batch, num_threads=threads, device_id=None, decoder="cpu", rank=0, world_size=1,
                                seed=0, channels_last=channels_last, cpu_finish=cpu_finish)
    train = TrainLoader(FolderReader(scan_folder(root).train), cfg, settings, device=torch.device("cpu"),
                        verify_root=str(root), global_batch=batch)

    def make(epoch: int):
        train.set_epoch(epoch)
        return iter(train)

    return make


def torchvision_iter(root: Path, batch: int, size: int, workers: int):
    from torchvision import datasets, transforms

    from fastafd.config import DataConfig

    cfg = DataConfig()
    tf = transforms.Compose([
        transforms.RandomResizedCrop(size, scale=cfg.scale, ratio=cfg.ratio),
        transforms.RandomHorizontalFlip(cfg.hflip),
        transforms.ToTensor(),
        transforms.Normalize(cfg.mean, cfg.std),
    ])
    loader = torch.utils.data.DataLoader(datasets.ImageFolder(root / "train", tf), batch_size=batch, shuffle=True,
                                         num_workers=workers, drop_last=True, persistent_workers=workers > 0)
    return lambda epoch: iter(loader)


VERSIONS = ("torch", "torchvision", "nvidia-dali-cuda130", "pillow", "numpy")
"""The packages the data benchmark records (:func:`fastafd.run.env.versions`)."""


def hardware() -> dict:
    from fastafd.run import env

    return {"cpu": env.cpu_name(), "cores": env.cores(), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "os": platform.platform()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=512, help="training JPEGs generated")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--threads", type=int, default=0, help="DALI threads = DataLoader workers; 0: the CPU cores")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--data", type=Path, default=None, help="an existing ImageNet-layout folder instead of generated JPEGs")
    p.add_argument("--out", type=Path, default=RESULTS, help="folder for data.json and data.md")
    a = p.parse_args(argv)
    threads = a.threads or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)

    with tempfile.TemporaryDirectory(prefix="fastafd-bench-") as tmp:
        root = a.data or Path(tmp)
        if a.data is None:
            make_folder(root, a.images)
        files = sorted((root / "train").rglob("*.JPEG"))
        mean_kb = statistics.mean(f.stat().st_size for f in files) / 1024
        makers = {FAST: fastafd_iter(root, a.batch, a.size, threads),
                  FAST_CL: fastafd_iter(root, a.batch, a.size, threads, channels_last=True),
                  DALI_RESIZE: fastafd_iter(root, a.batch, a.size, threads, cpu_finish=False),
                  TORCHVISION: torchvision_iter(root, a.batch, a.size, threads)}
        load_before = os.getloadavg()[0]
        times, n = time_interleaved(makers, a.repeats)
        load_after = os.getloadavg()[0]
        runs = {}
        for name, ts in times.items():
            rates = [n / t for t in ts]
            runs[name] = {"img_per_s_median": statistics.median(rates), "img_per_s_min": min(rates),
                          "img_per_s_max": max(rates), "epoch_s": ts, "images_per_epoch": n}
            print(f"{name}: median {statistics.median(rates):.0f} img/s (min {min(rates):.0f}, max {max(rates):.0f})",
                  file=sys.stderr)
    fast, ref = runs[FAST], runs[TORCHVISION]
    ratio = fast["img_per_s_median"] / ref["img_per_s_median"]
    ratio_cl = runs[FAST_CL]["img_per_s_median"] / ref["img_per_s_median"]
    ratio_finish = fast["img_per_s_median"] / runs[DALI_RESIZE]["img_per_s_median"]
    from fastafd.run import env

    result = {
        "benchmark": "training input pipeline throughput",
        "command": "python benchmarks/data.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "config": {"images": len(files), "mean_file_kb": round(mean_kb, 1), "batch": a.batch, "size": a.size,
                   "threads_or_workers": threads, "repeats": a.repeats,
                   "augmentation": "random-resized-crop (0.08-1, 3/4-4/3) + flip + normalize, float32 NCHW"},
        "hardware": hardware(), "versions": env.versions(VERSIONS), "runs": runs, "ratio_median": ratio, "ratio_median_channels_last": ratio_cl,
        "ratio_torch_finish_vs_dali_resize": ratio_finish,
        "load_average_1min": {"before": load_before, "after": load_after},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "data.json").write_text(json.dumps(result, indent=1) + "\n")
    hw, v = result["hardware"], result["versions"]
    lines = [
        "# Training input throughput",
        "",
        f"`{result['command']}` on {hw['cpu']} ({hw['cores']} cores, GPU: {hw['gpu'] or 'none'}); "
        f"torch {v['torch']}, torchvision {v['torchvision']}, DALI {v['nvidia-dali-cuda130']}, Pillow {v['pillow']}.",
        "",
        f"{len(files)} JPEGs (about 500x375, mean {mean_kb:.0f} KB), batch {a.batch}, {a.size}x{a.size} "
        f"random-resized-crop + flip + normalize, {threads} DALI threads / DataLoader workers; "
        f"one warm-up epoch each, then {a.repeats} timed epochs each, alternating between the pipelines "
        f"(1-min load average {load_before:.1f} before, {load_after:.1f} after).",
        "",
        "| pipeline | img/s median | min | max |",
        "| --- | ---: | ---: | ---: |",
    ]
    for name, r in runs.items():
        lines.append(f"| {name} | {r['img_per_s_median']:.0f} | {r['img_per_s_min']:.0f} | {r['img_per_s_max']:.0f} |")
    lines += ["", f"fastafd / torchvision (medians): **{ratio:.2f}x** with the CPU training layout (NCHW float32); "
              f"{ratio_cl:.2f}x with channels-last output (NHWC, what GPU training uses). "
              f"Finishing in torch instead of DALI's CPU resize + crop_mirror_normalize: {ratio_finish:.2f}x.", ""]
    (a.out / "data.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
