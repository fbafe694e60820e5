"""Issue 27: with three peers, dml (the logit loss alone) must not end far below independent training.

A fixed, learnable task (10 classes, each a fixed random 3 x SIZE x SIZE template plus heavy Gaussian noise),
three cifar_resnet8 peers, the trainer's stages and schedule, the default method config. With the paper's KL
ring (``method.k_scheme ring``, the old default) dml ended 5.2 points below independent here (30.5 against 35.7 %;
5.5 with data seed 1: the ring's peers chase one another, docs/method.md, *K > 2: which peers teach*); with
the default rule (every other peer teaches, 1/(K-1) each) it ends 1.4 above (37.1 %).
"""

import torch

from fastafd.config import DataConfig, LoopConfig, MethodConfig, ModelConfig, OptimConfig, TrainConfig
from fastafd.methods import Numerics, build_task
from fastafd.optim import build_stages

SIZE, NOISE, STEPS, BATCH = 16, 5.0, 150, 32


def task_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    templates = torch.randn(10, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    return templates[y] + NOISE * torch.randn(n, 3, SIZE, SIZE, generator=g), y


def final_top1(method: str, **method_kw) -> float:
    """Mean top-1 (%) of the three peers on 1,000 held-out samples after STEPS steps."""
    torch.manual_seed(0)
    cfg = TrainConfig(
        model=ModelConfig(peers=("cifar_resnet8",) * 3, num_classes=10),
        method=MethodConfig(name=method, **method_kw),
        data=DataConfig(format="synthetic", batch_size=BATCH, image_size=SIZE),
        optim=OptimConfig(name="sgd", lr=0.05, lr_batch_ref=0, momentum=0.9, weight_decay=5e-4, milestones=(0.5, 0.75)),
        loop=LoopConfig(epochs=1),
    )
    cpu = torch.device("cpu")
    task = build_task(cfg, 10, Numerics(), cpu, False)
    stages = build_stages(task, cfg, device=cpu, dtype=torch.float32, steps_per_epoch=STEPS)
    (x, y), (xv, yv) = task_data(2048, 1), task_data(1000, 2)
    g = torch.Generator().manual_seed(0)
    task.train()
    for step in range(STEPS):
        idx = torch.randint(0, len(y), (BATCH,), generator=g)
        stages.set_step(step)
        with stages.iteration():
            task.train_step(x[idx], y[idx], stages)
    task.eval()
    return float(task.eval_step(xv, yv)["correct"][:, 0].float().mean()) / len(yv) * 100


def test_three_peer_dml_is_not_far_below_independent_training():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the numbers above were measured with one thread
    try:
        independent, dml = final_top1("independent"), final_top1("dml")
    finally:
        torch.set_num_threads(threads)
    assert dml > independent - 3.0, f"K = 3 dml {dml:.1f} against independent {independent:.1f}"


def test_alignment_term_follows_the_k_scheme():
    from tests.helpers import batches, tiny_config, tiny_task

    x, y = batches(1)[0]
    for scheme, teachers in (("all", [[1, 2], [0, 2], [0, 1]]), ("ring", [[2], [0], [1]])):
        task, _ = tiny_task(tiny_config(("cifar_resnet8",) * 3, method="l1", k_scheme=scheme))
        _, metrics = task.forward_loss(x, y)
        with torch.no_grad():
            feats, _ = task.forward_peers(x)
            mapped = [t(f) for t, f in zip(task.transfers, feats, strict=True)]
        want = [sum((mapped[k] - mapped[j]).abs().mean() for j in js) / len(js) for k, js in enumerate(teachers)]
        torch.testing.assert_close(metrics["align"], torch.stack(want))
