"""fastafd's ONE and CL steps vs plain-PyTorch loops written here independently (float64): same parameters
and BatchNorm statistics after 3 iterations; the gate's weights; CL's 1/H rescaling of the trunk gradient."""

import pytest
import timm
import torch
import torch.nn.functional as F

from fastafd.models.branches import Gate
from tests.helpers import SGD, batches, iterate, tiny_config, tiny_task

NETS = {
    # name: (trunk children, last stage children), as the network's forward_features runs them
    "cifar_resnet8": (("conv1", "bn1", "act1", "layer1", "layer2"), ("layer3",)),
    "resnet10t": (("conv1", "bn1", "act1", "maxpool", "layer1", "layer2", "layer3"), ("layer4",)),
}
H = 3
T = 3.0


class Reference:
    """H plain timm networks; the trunk of network 0 is shared, network k's last stage + head is branch k."""

    def __init__(self, name, task, gate=False):
        self.trunk_names, self.stage_names = NETS[name]
        self.nets = [timm.create_model(name, num_classes=10) for _ in range(H)]
        state = task.state_dict()
        for k, net in enumerate(self.nets):
            mine = {key.removeprefix("net.trunk."): v for key, v in state.items() if key.startswith("net.trunk.")}
            mine.update({key.removeprefix(f"net.branches.{k}."): v for key, v in state.items() if key.startswith(f"net.branches.{k}.")})
            net.load_state_dict(mine)  # strict: every key of the plain network is in the task
        self.gate = None
        params = self.trunk_params() + [p for net in self.nets for n in self.stage_names + ("fc",) for p in getattr(net, n).parameters()]
        if gate:
            self.gate = torch.nn.Linear(task.gate.fc.in_features, H)
            self.gate_bn = torch.nn.BatchNorm1d(H)
            self.gate.load_state_dict(task.gate.fc.state_dict())
            self.gate_bn.load_state_dict(task.gate.bn.state_dict())
            params += list(self.gate.parameters()) + list(self.gate_bn.parameters())
        self.opt = torch.optim.SGD(params, lr=SGD.lr, momentum=SGD.momentum, weight_decay=SGD.weight_decay)

    def trunk_params(self):
        return [p for n in self.trunk_names for p in getattr(self.nets[0], n).parameters()]

    def trunk(self, x):
        for n in self.trunk_names:
            x = getattr(self.nets[0], n)(x)
        return x

    def branch(self, k, h):
        net = self.nets[k]
        for n in self.stage_names:
            h = getattr(net, n)(h)
        return net.fc(h.mean(dim=(2, 3)))

    def one_iteration(self, x, y):
        h = self.trunk(x)
        zs = [self.branch(k, h) for k in range(H)]
        g = torch.softmax(F.relu(self.gate_bn(self.gate(h.mean(dim=(2, 3))))), dim=1)
        ze = sum(g[:, k : k + 1] * zs[k] for k in range(H))
        teacher = F.softmax(ze.detach() / T, dim=1)
        loss = F.cross_entropy(ze, y)
        for z in zs:
            loss = loss + F.cross_entropy(z, y) + T * T * F.kl_div(F.log_softmax(z / T, dim=1), teacher, reduction="batchmean")
        self.step(loss)

    def cl_iteration(self, x, y, beta=0.5):
        h = self.trunk(x)
        shared = h.detach().requires_grad_()  # backpropagation rescaling by hand: the trunk gets grad / H
        zs = [self.branch(k, shared) for k in range(H)]
        loss = 0
        for k, z in enumerate(zs):
            others = sum(zs[j].detach() for j in range(H) if j != k) / (H - 1)
            kl = F.kl_div(F.log_softmax(z / T, dim=1), F.softmax(others / T, dim=1), reduction="batchmean")
            loss = loss + beta * F.cross_entropy(z, y) + (1 - beta) * T * T * kl
        self.opt.zero_grad()
        loss.backward()
        h.backward(shared.grad / H)
        self.opt.step()

    def step(self, loss):
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()


@pytest.fixture
def float64():
    torch.use_deterministic_algorithms(True)
    torch.set_default_dtype(torch.float64)
    yield
    torch.use_deterministic_algorithms(False)
    torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("method, name", [("one", "cifar_resnet8"), ("cl", "cifar_resnet8"), ("one", "resnet10t")])
def test_matches_reference_after_three_iterations(method, name, float64):
    cfg = tiny_config((name,) * H, method=method, temperature=T)
    task, stages = tiny_task(cfg)
    ref = Reference(name, task, gate=method == "one")
    initial = task.net.branches[1].fc.weight.detach().clone()
    data = [(x.double(), y) for x, y in batches(3)]
    iterate(task, stages, data)
    for x, y in data:
        (ref.one_iteration if method == "one" else ref.cl_iteration)(x, y)

    pairs = [(getattr(task.net.trunk, n), getattr(ref.nets[0], n)) for n in ref.trunk_names]
    pairs += [(task.net.branches[k][n], getattr(ref.nets[k], n)) for k in range(H) for n in ref.stage_names + ("fc",)]
    if method == "one":
        pairs += [(task.gate.fc, ref.gate), (task.gate.bn, ref.gate_bn)]
    compared = 0
    for mine, theirs in pairs:
        for a, b in zip([*mine.parameters(), *mine.buffers()], [*theirs.parameters(), *theirs.buffers()], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
            compared += 1
    assert compared > 30
    assert not torch.equal(task.net.branches[1].fc.weight, initial)  # it trained


def test_gate_weights_are_a_distribution_per_sample():
    gate = Gate(16, 4)
    g = gate(torch.randn(8, 16, 5, 5) * 3)
    assert g.shape == (8, 4)
    assert (g >= 0).all()
    torch.testing.assert_close(g.sum(dim=1), torch.ones(8))


def test_cl_trunk_gradient_is_the_sum_of_the_heads_scaled_by_one_over_h(float64):
    cfg = tiny_config(("cifar_resnet8",) * H, method="cl")
    task, _ = tiny_task(cfg)
    x, y = batches(1)[0]
    x = x.double()

    def trunk_grads(rescale: bool):
        task.zero_grad()
        if not rescale:
            task.trunk_to_branches = lambda h: h  # the heads' gradients summed, unscaled
        loss, _ = task.forward_loss(x, y)
        loss.backward()
        vars(task).pop("trunk_to_branches", None)
        return [p.grad.clone() for p in task.net.trunk.parameters()]

    task.eval()  # the same BatchNorm behaviour in both passes
    scaled, summed = trunk_grads(True), trunk_grads(False)
    assert any(g.abs().sum() > 0 for g in summed)
    for a, b in zip(scaled, summed, strict=True):
        torch.testing.assert_close(a, b / H, rtol=1e-10, atol=1e-14)
    # the heads themselves are not rescaled
    task.zero_grad()
    task.forward_loss(x, y)[0].backward()
    head = task.net.branches[0].fc.weight.grad.clone()
    task.trunk_to_branches = lambda h: h
    task.zero_grad()
    task.forward_loss(x, y)[0].backward()
    torch.testing.assert_close(head, task.net.branches[0].fc.weight.grad)


@pytest.mark.slow
def test_compiled_channels_last_step_matches_eager():
    """CL: its rescaling is a custom autograd function inside the compiled unit (ONE's gate is plain modules)."""
    cfg = tiny_config(("cifar_resnet8",) * 2, method="cl")
    data = batches(2)
    eager, m_eager = _trained(cfg, data)
    compiled, m_compiled = _trained(cfg, data, compile=True, channels_last=True)
    for key in m_eager:
        torch.testing.assert_close(m_compiled[key], m_eager[key], rtol=1e-3, atol=1e-4)
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4, msg=name)
    assert not any("_orig_mod" in k for k in compiled.state_dict())


@pytest.mark.parametrize("method", ["one", "cl"])
def test_bf16_step_stays_within_bf16_rounding_of_fp32(method):
    cfg = tiny_config(("cifar_resnet8",) * 2, method=method)
    data = batches(1)
    fp32, m32 = _trained(cfg, data)
    bf16, m16 = _trained(cfg, data, dtype=torch.bfloat16)
    for key in m32:
        torch.testing.assert_close(m16[key], m32[key], rtol=3e-2, atol=2e-2)
    drift = max((a - b).abs().max().item() for a, b in zip(fp32.parameters(), bf16.parameters(), strict=True))
    moved = max((a - b).abs().max().item() for a, b in zip(fp32.parameters(), tiny_task(cfg)[0].parameters(), strict=True))
    assert drift < 2e-2 and moved > 5 * drift  # it trained, and bf16 moved the parameters the same way


def _trained(cfg, data, **kw):
    task, stages = tiny_task(cfg, **kw)
    if kw.get("channels_last"):
        data = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in data]
    return task, iterate(task, stages, data)


def test_mixed_networks_and_unsplittable_models_are_refused_in_one_line():
    from fastafd.errors import UserError

    with pytest.raises(UserError, match="branches one network, but model.peers names cifar_resnet20, cifar_resnet8"):
        tiny_config(("cifar_resnet8", "cifar_resnet20"), method="one")
    with pytest.raises(UserError, match="cannot be split into a shared trunk and branches"):
        tiny_task(tiny_config(("convnext_atto",) * 2, method="cl"))
