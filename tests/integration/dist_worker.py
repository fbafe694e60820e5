"""Run by tests/integration/test_distributed.py under `accelerate launch` (2 or 3 CPU processes, gloo).

Every rank trains tiny tasks on its share of each global batch through fastafd's real process group
(``dist.setup``) and both gradient syncs (``fastafd/comm.py``: the coalesced all-reduce after each
backward, and the bucketed one overlapped with it, with buckets small enough to make several per
stage); rank 0 also trains the same tasks in one process on the whole global batch (no process
group). Parameters are written to OUT for the test to compare. The 2-process run also trains with
parameters that one rank leaves without gradient (:mod:`tests.integration.unused_worker`). With a second argument ``compiled``, every
variant is also trained on the ranks with regionally compiled peers (both syncs).
"""

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from fastafd import dist  # noqa: E402
from fastafd.comm import CoalescedSync, OverlappedSync  # noqa: E402
from fastafd.config import SystemConfig  # noqa: E402
from fastafd.methods import Numerics, build_task  # noqa: E402
from fastafd.optim import build_stages  # noqa: E402
from tests.helpers import batches, iterate, tiny_config  # noqa: E402
from tests.integration.unused_worker import unused_parameters  # noqa: E402

GLOBAL_BATCH, STEPS = 12, 3  # 12: divisible by 2 and 3 processes
CPU = torch.device("cpu")
VARIANTS = {
    "independent": dict(method="independent"),
    "dml": dict(method="dml"),
    "l1": dict(method="l1"),
    "l2": dict(method="l2"),
    "afd": dict(method="afd"),
    "afd_simultaneous": dict(method="afd", order="simultaneous"),
    "one": dict(method="one"),  # two branches on a shared trunk, and the gate
    "cl": dict(method="cl"),  # the trunk's gradient rescaled in backward
    "kdcl": dict(method="kdcl"),
    "afd_shared": dict(method="afd_shared"),
}


def build(cfg, grad_sync, bn_eval: bool, compiled: bool = False):
    torch.manual_seed(0)  # identical initial parameters everywhere
    task = build_task(cfg, cfg.model.num_classes, Numerics("cpu", torch.float32), CPU, False)
    if compiled:  # regional compile with aot_eager: the compiled autograd graph, without Inductor's code generation
        task.compile("regional", backend="aot_eager")
    stages = build_stages(task, cfg, device=CPU, dtype=torch.float32, steps_per_epoch=100, grad_sync=grad_sync)
    task.train()
    if bn_eval:  # per-sample forward: the 2-process and 1-process runs then see exactly the same function
        for m in task.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    return task, stages


SYNCS = {"coalesced": CoalescedSync, "overlapped": lambda: OverlappedSync(bucket_mb=0.02)}
"""0.02 MiB buckets: several per stage even for ResNet-8 peers (a ~75k-parameter stage: 10+ buckets)."""


def main(out: Path, compiled: bool) -> None:
    rt = dist.setup(SystemConfig(device="cpu", dist_timeout_s=60))
    r, n = rt.rank, rt.world_size
    data = batches(STEPS, batch=GLOBAL_BATCH)
    local = [(x.chunk(n)[r], y.chunk(n)[r]) for x, y in data]
    for name, kw in VARIANTS.items():
        kw = dict(kw)
        method = kw.pop("method")
        cfg = tiny_config(["cifar_resnet8", "cifar_resnet8"], method, batch=GLOBAL_BATCH, **kw)
        cfg.adv_optim = replace(cfg.adv_optim, lr=1e-4)
        if compiled:  # both syncs on regionally compiled peers, against the same eager references
            for sync_name, make_sync in SYNCS.items():
                sync = make_sync()
                task, stages = build(cfg, sync, bn_eval=True, compiled=True)
                iterate(task, stages, local)
                torch.save({k: v.detach() for k, v in task.named_parameters()}, out / f"{name}.compiled.{sync_name}.rank{r}.pt")
                if sync_name == "overlapped" and r == 0:
                    (out / f"{name}.compiled.launched.json").write_text(json.dumps(sync.launched))
        for sync_name, make_sync in SYNCS.items():
            if r == 0 and sync_name == "coalesced":
                task, _ = build(cfg, make_sync(), bn_eval=True)
                torch.save({k: v.detach().clone() for k, v in task.named_parameters()}, out / f"{name}.initial.pt")
            sync = make_sync()
            task, stages = build(cfg, sync, bn_eval=True)
            iterate(task, stages, local)
            torch.save({k: v.detach() for k, v in task.named_parameters()}, out / f"{name}.{sync_name}.rank{r}.pt")
            if sync_name == "overlapped" and r == 0:
                (out / f"{name}.launched.json").write_text(json.dumps(sync.launched))
        if r == 0:
            ref, ref_stages = build(cfg, None, bn_eval=True)
            iterate(ref, ref_stages, data)
            torch.save({k: v.detach() for k, v in ref.named_parameters()}, out / f"{name}.single.pt")
    # BatchNorm in training mode: each rank normalises with its own batch statistics (as DDP does);
    # parameters must still agree, and average_buffers must leave every rank with the mean buffers.
    cfg = tiny_config(["cifar_resnet8", "cifar_resnet8"], "afd", batch=GLOBAL_BATCH)
    task, stages = build(cfg, OverlappedSync(bucket_mb=0.02), bn_eval=False)
    iterate(task, stages, local)
    before = {k: v.clone() for k, v in task.named_buffers() if v.is_floating_point()}
    dist.average_buffers(task)
    after = {k: v.clone() for k, v in task.named_buffers() if v.is_floating_point()}
    params = {k: v.detach() for k, v in task.named_parameters()}
    torch.save({"before": before, "after": after, "params": params}, out / f"bn_train.rank{r}.pt")
    if n == 2:
        unused_parameters(r, out)  # ranks that leave different parameters without gradient
    rt.accelerator.wait_for_everyone()
    rt.accelerator.end_training()


if __name__ == "__main__":
    main(Path(sys.argv[1]), compiled="compiled" in sys.argv[2:])
