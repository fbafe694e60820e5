"""The CUDA paths: grouped discriminators, bf16/fp16 autocast, channels-last, torch.compile, the
device-side skip of a non-finite step, the trainer and the step benchmark on a GPU, and DALI's GPU
pipeline. Marked ``gpu`` and skipped without a CUDA device: run them with ``pytest -m gpu`` on a
machine with one (DALI's test also needs nvidia-dali installed there)."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch

from fastafd import cli, losses
from fastafd.bench.reference import RefDiscriminator
from fastafd.models.discriminator import DiscriminatorBank
from tests.helpers import batches, fill_bank, ids, iterate, tiny_config, tiny_task

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUDA = torch.device("cuda")
PAIR = ("cifar_resnet8", "cifar_resnet8")


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 comparisons without TF32 (Ampere and later use it for convolutions and matmuls by default)."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_grouped_discriminator_bank_on_cuda_equals_per_peer_discriminators():
    torch.manual_seed(0)
    k, c = 3, 64
    discs = [RefDiscriminator(c).to(CUDA) for _ in range(k)]
    bank = DiscriminatorBank(c, k).to(CUDA)
    fill_bank(bank, discs)
    maps = torch.randn(k, 16, c, 4, 4, device=CUDA, requires_grad=True)
    ref = torch.stack([d(maps[i]) for i, d in enumerate(discs)])
    (g_ref,) = torch.autograd.grad(ref.square().sum(), maps)
    out = bank(maps)
    (g_out,) = torch.autograd.grad(out.square().sum(), maps)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_out, g_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("order", ["sequential", "simultaneous"])
def test_afd_iterations_on_cuda_match_cpu_in_fp32(order):
    cfg = tiny_config(PAIR, order=order)
    cfg.adv_optim = replace(cfg.adv_optim, lr=1e-7)  # Adam amplifies rounding of near-zero gradients (see test_speed_paths)
    cpu_task, cpu_stages = tiny_task(cfg)
    gpu_task, gpu_stages = tiny_task(cfg, device="cuda")
    m_cpu = iterate(cpu_task, cpu_stages, batches(2))
    m_gpu = iterate(gpu_task, gpu_stages, batches(2, device="cuda"))
    for key in m_cpu:
        torch.testing.assert_close(m_gpu[key].cpu(), m_cpu[key], rtol=1e-3, atol=1e-4, msg=key)
    for (name, a), b in zip(cpu_task.state_dict().items(), gpu_task.state_dict().values(), strict=True):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.parametrize("order", ["sequential", "simultaneous"])
def test_bf16_channels_last_compiled_step_on_cuda_tracks_fp32(order):
    cfg = tiny_config(PAIR, order=order)
    fast, fast_stages = tiny_task(cfg, device="cuda", dtype=torch.bfloat16, compile=True, channels_last=True)
    ref, ref_stages = tiny_task(cfg, device="cuda")
    data = batches(3, device="cuda", channels_last=True)
    m_fast = iterate(fast, fast_stages, data[:1])
    m_ref = iterate(ref, ref_stages, data[:1])
    for key in ("ce", "kl", "d_loss", "g_loss"):
        torch.testing.assert_close(m_fast[key].float(), m_ref[key].float(), rtol=3e-2, atol=2e-2, msg=key)
    m_fast = iterate(fast, fast_stages, data[1:], start=1)
    assert all(torch.isfinite(v).all() for v in m_fast.values())
    assert fast_stages.guard.skipped.item() == 0
    conv = next(m for m in fast.peers[0].modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)


def assert_one_step_skipped(task, stages, before: dict, opts: dict) -> None:
    """Parameters, buffers and every optimizer's state are as ``before`` / ``opts``, and the guard counted one skip."""
    for key, value in task.state_dict().items():
        assert torch.equal(value, before[key]), key
    for name, s in stages.items():
        for pid, st in opts[name].items():
            for field, value in st.items():
                assert torch.equal(value, s.optimizer.state_dict()["state"][pid][field]), (name, field)
    assert stages.guard.skipped.item() == 1


@pytest.mark.parametrize("order", ["sequential", "simultaneous"])
def test_fp16_nan_in_one_peer_loss_skips_every_optimizer_on_cuda(order, monkeypatch):
    task, stages = tiny_task(tiny_config(PAIR, order=order), device="cuda", dtype=torch.float16)
    data = batches(2, device="cuda")
    iterate(task, stages, data[:1])  # optimizer states exist
    before = {k: v.detach().clone() for k, v in task.state_dict().items()}
    opts = {n: copy.deepcopy(s.optimizer.state_dict()["state"]) for n, s in stages.items()}
    real_ce = losses.cross_entropy
    monkeypatch.setattr(losses, "cross_entropy",
                        lambda logits, target: real_ce(logits, target) * torch.tensor([float("nan"), 1.0], device=logits.device))
    iterate(task, stages, data[1:], start=1)
    assert_one_step_skipped(task, stages, before, opts)


def test_train_cli_on_cuda(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTAFD_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    code = cli.main([
        "train", "--out", str(out), "--model.peers", *PAIR, "--data.format", "synthetic", "--data.synthetic_classes", "10",
        "--data.image_size", "32", "--data.batch_size", "16", "--data.synthetic_samples", "256", "--loop.epochs", "2",
        "--loop.max_steps_per_epoch", "4", "--system.device", "cuda",
    ])
    assert code == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] and all(0 <= r["ensemble_top1"] <= 100 for r in records)
    assert json.loads((out / "env.json").read_text())["device"].startswith("cuda")


def test_bench_step_on_cuda(tmp_path):
    args = ["bench", "step", "--peers", *PAIR, "--image_size", "32", "--batch_size", "16", "--device", "cuda",
            "--warmup", "2", "--steps", "2", "--repeats", "2", "--out", str(tmp_path), "--name", "t"]  # fmt: skip
    assert cli.main(args) == 0
    report = json.loads((tmp_path / "step-t.json").read_text())
    assert report["device"] == "cuda" and report["hardware"]["gpu"]
    assert all(r["img_per_s_median"] > 0 for r in report["results"])


def test_dali_gpu_pipeline_feeds_every_image_once_in_the_training_layout(tmp_path):
    pytest.importorskip("nvidia.dali")
    from fastafd.config import DataConfig
    from fastafd.data import build_data
    from tests.integration.test_data_pipeline import TRAIN_IDS, make_folder

    make_folder(tmp_path)
    cfg = DataConfig(root=tmp_path, num_threads=2, image_size=16, batch_size=4)
    train, val, _ = build_data(cfg, rank=0, world_size=1, local_rank=0, device=CUDA, seed=0, channels_last=True,
                               dtype=torch.bfloat16)
    seen = []
    for x, y in train:
        assert x.device.type == "cuda" and y.device.type == "cuda"
        assert x.dtype == torch.bfloat16 and x.shape[1:] == (3, 16, 16) and x.is_contiguous(memory_format=torch.channels_last)
        seen += ids(x.cpu())
    assert len(seen) == len(set(seen)) and set(seen) <= TRAIN_IDS and len(seen) == len(TRAIN_IDS) // 4 * 4
    assert sum(x.shape[0] for x, _ in val) == 13


# -- what a first CUDA run would meet (issue: GPU paths) -----------------------------------------------


def test_resume_with_channels_last_bf16_compiled_peers_steps_and_tracks_the_uninterrupted_run(tmp_path):
    """Optimizer state comes back in the parameters' memory format: the fused CUDA kernels refuse
    mismatched strides, so the first step after a requeue would fail."""
    from fastafd import state
    from fastafd.checkpoint import store
    from fastafd.metrics import RunningMeans
    from tests.integration.test_first_cuda_run import _NoLoader

    cfg = tiny_config(PAIR)
    fast = dict(device="cuda", dtype=torch.bfloat16, compile=True, channels_last=True)
    data = batches(4, device="cuda", channels_last=True)
    straight, straight_stages = tiny_task(cfg, **fast)
    iterate(straight, straight_stages, data)
    task, stages = tiny_task(cfg, **fast)
    iterate(task, stages, data[:2])
    tensors, st = state.capture(task, stages, _NoLoader(), RunningMeans(), state.Position(1, 2, 2), {}, CUDA)
    path = store.write(tmp_path, 2, tensors, st, keep=1)
    resumed, resumed_stages = tiny_task(cfg, seed=7, **fast)
    state.restore(store.load(path), resumed, resumed_stages, _NoLoader(), RunningMeans(), rank=0, world_size=1,
                  device=CUDA, same_schedule=True)
    iterate(resumed, resumed_stages, data[2:], start=2)
    assert resumed_stages.guard.skipped.item() == 0
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(b.float(), a.float(), rtol=2e-2, atol=2e-2, msg=name)  # cuDNN/atomics: not bitwise


def test_a_skip_on_the_very_first_step_leaves_sgd_momentum_clean_on_cuda():
    from fastafd.optim import build_optimizer, device_skip
    from fastafd.steps import StepGuard
    from tests.helpers import SGD

    torch.manual_seed(0)
    init = [torch.randn(64, 32, device=CUDA), torch.randn(32, device=CUDA)]
    g1, g2 = [torch.randn_like(t) for t in init], [torch.randn_like(t) for t in init]

    def run(grads_and_skips):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt, guard = build_optimizer(params, SGD, SGD.lr, CUDA), StepGuard(CUDA)
        assert device_skip(opt, CUDA)
        for grads, skip in grads_and_skips:
            guard.begin()
            for p, g in zip(params, grads):
                p.grad = g.clone()
            guard.found_inf.fill_(float(skip))
            guard.step(opt, device_skip=True)
            guard.end()
        return params

    for a, b in zip(run([(g1, True), (g2, False)]), run([(g2, False)])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("order", ["sequential", "simultaneous"])
def test_bf16_inf_gradient_behind_a_finite_loss_skips_every_optimizer_on_cuda(order):
    task, stages = tiny_task(tiny_config(PAIR, order=order), device="cuda", dtype=torch.bfloat16, compile=True, channels_last=True)
    data = batches(2, device="cuda", channels_last=True)
    iterate(task, stages, data[:1])
    before = {k: v.detach().clone() for k, v in task.state_dict().items()}
    opts = {n: copy.deepcopy(s.optimizer.state_dict()["state"]) for n, s in stages.items()}
    hook = task.peers[0].conv1.weight.register_hook(lambda g: g * float("inf"))
    metrics = iterate(task, stages, data[1:], start=1)
    hook.remove()
    assert all(torch.isfinite(v).all() for v in metrics.values())
    assert_one_step_skipped(task, stages, before, opts)


def _steady_state_steps_without_host_syncs(task, stages, loader, steps: int) -> None:
    """Warm up (compile, cuDNN autotune, allocator), then ``steps`` loader + train steps with torch's sync
    detector set to raise: any host synchronisation in the hot path fails the test."""
    it = iter(loader)
    for _ in range(2):
        x, y = next(it)
        with stages.iteration():
            task.train_step(x, y, stages)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(steps):
            x, y = next(it)
            with stages.iteration():
                task.train_step(x, y, stages)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("fmt", ["folder", "shards"])
def test_folder_and_shard_loaders_and_the_step_run_without_host_syncs(tmp_path, fmt):
    pytest.importorskip("nvidia.dali")
    from fastafd.config import DataConfig
    from fastafd.data import build_data
    from fastafd.data.shards import pack
    from tests.integration.test_data_pipeline import make_folder

    make_folder(tmp_path / "folder", train=(24, 24), val=(2, 2))
    root = tmp_path / "folder"
    if fmt == "shards":
        pack(root, tmp_path / "shards", shard_samples=8, seed=0, progress=False)
        root = tmp_path / "shards"
    cfg = DataConfig(root=root, num_threads=2, image_size=32, batch_size=4)
    train, _, info = build_data(cfg, rank=0, world_size=1, local_rank=0, device=CUDA, seed=0, channels_last=True,
                                dtype=torch.bfloat16)
    task, stages = tiny_task(replace(tiny_config(PAIR), model=replace(tiny_config(PAIR).model, num_classes=info.num_classes)),
                             device="cuda", dtype=torch.bfloat16, compile=True, channels_last=True)
    _steady_state_steps_without_host_syncs(task, stages, train, steps=6)


def test_no_recompiles_across_train_eval_and_the_epoch_boundary(tmp_path, monkeypatch):
    import torch._dynamo

    monkeypatch.setenv("FASTAFD_CACHE", str(tmp_path / "cache"))
    with torch._dynamo.config.patch(error_on_recompile=True):  # not monkeypatch: its undo deletes the option
        code = cli.main([
            "train", "--out", str(tmp_path / "run"), "--model.peers", *PAIR, "--data.format", "synthetic",
            "--data.synthetic_classes", "10", "--data.image_size", "32", "--data.batch_size", "16", "--data.synthetic_samples", "128",
            "--loop.epochs", "3", "--system.device", "cuda", "--system.compile", "on", "--log.progress", "off",
        ])  # 8 steps per epoch, evaluation after each: train -> eval -> train twice, across two epoch boundaries
    assert code == 0


def test_cudnn_benchmark_is_on_for_cuda_training(tmp_path, monkeypatch):
    from fastafd.session import build_session

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    cfg = tiny_config(PAIR)
    cfg.system.device = "cuda"
    session = build_session(cfg)
    assert torch.backends.cudnn.benchmark
    session.runtime.accelerator.end_training()
