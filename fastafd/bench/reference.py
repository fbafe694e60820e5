"""A deliberately simple, slow, obviously correct AFD iteration, written from docs/method.md alone.

It is two things: the oracle of the correctness tests (``tests/integration/test_reference_afd.py``
checks that fastafd's step gives the same parameters) and the baseline of the step benchmark,
written the way a paper's code usually is (eager, fp32, NCHW, a Python loop over peers and
discriminators, one optimizer call per stage). No other fastafd code is used here: the reference
gets plain modules (the peers; its own transfer layers and discriminators, weights copied in when
comparing) and implements the losses, the cyclic teacher choice, the parameter split and the stage
order itself.
"""

import torch
import torch.nn.functional as F
from torch import nn


class RefDiscriminator(nn.Module):
    """docs/method.md: Conv3x3 (C -> C/2, stride 1) + BN + LeakyReLU(0.2), Conv3x3 (C/2 -> C/4, stride 2) + BN +
    LeakyReLU(0.2), global average pool, Linear (C/4 -> 1), sigmoid."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c // 2, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c // 2)
        self.conv2 = nn.Conv2d(c // 2, c // 4, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c // 4)
        self.fc = nn.Linear(c // 4, 1)

    def forward(self, x):
        x = F.leaky_relu(self.bn1(self.conv1(x)), 0.2)
        x = F.leaky_relu(self.bn2(self.conv2(x)), 0.2)
        x = x.mean(dim=(2, 3))
        return torch.sigmoid(self.fc(x))[:, 0]


class RefTransfer(nn.Module):
    """docs/method.md: identity when shapes match; otherwise 1x1 conv + BN + ReLU to the common channel count and
    adaptive average pooling to the smaller spatial size."""

    def __init__(self, shape, target):
        super().__init__()
        self.identity = tuple(shape) == tuple(target)
        if not self.identity:
            self.conv = nn.Conv2d(shape[0], target[0], 1, bias=False)
            self.bn = nn.BatchNorm2d(target[0])
            self.size = target[1:]

    def forward(self, x):
        if self.identity:
            return x
        return F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(x))), self.size)


def copy_into(dst: nn.Module, src: nn.Module) -> None:
    """Copy parameters and buffers position by position (the shapes must agree)."""
    dst_t = list(dst.parameters()) + [b for b in dst.buffers()]
    src_t = list(src.parameters()) + [b for b in src.buffers()]
    assert len(dst_t) == len(src_t), (len(dst_t), len(src_t))
    with torch.no_grad():
        for d, s in zip(dst_t, src_t):
            assert d.shape == s.shape, (d.shape, s.shape)
            d.copy_(s)


def feature_map(net, x):
    """F_k: the last stage's output in NCHW, as timm's forward_intermediates gives it (docs/method.md)."""
    return net.forward_intermediates(x, indices=1, output_fmt="NCHW", intermediates_only=True)[-1]


class ReferenceAFD:
    def __init__(self, nets, shapes, *, temperature, sgd, adam, k_scheme="ring"):
        self.nets = nets
        self.k_scheme = k_scheme  # the KL term's teachers: "ring" (k - 1) or "all" (every other net, 1/(K-1) each)
        self.k = len(nets)
        target = (max(s[0] for s in shapes), min(s[1] for s in shapes), min(s[2] for s in shapes))
        self.transfers = [RefTransfer(s, target) for s in shapes]
        self.discs = [RefDiscriminator(target[0]) for _ in shapes]
        self.t = temperature
        net_params = self.net_params = [p for net in nets for p in net.parameters()]
        # feature extractor G_k: every parameter except the classifier (timm's get_classifier())
        heads = {id(p) for net in nets for p in net.get_classifier().parameters()}
        g_params = [p for net in nets for p in net.parameters() if id(p) not in heads]
        t_params = [p for tr in self.transfers for p in tr.parameters()]
        d_params = [p for d in self.discs for p in d.parameters()]
        self.opt_logit = torch.optim.SGD(net_params, **sgd)
        self.opt_d = torch.optim.Adam(d_params, **adam)
        self.g_params = g_params + t_params
        self.opt_g = torch.optim.Adam(self.g_params, **adam)

    def teacher(self, k):
        # network k learns from its predecessor; network 1 learns from network K
        return (k - 1) % self.k

    def kl_teachers(self, k):
        # docs/method.md, k_scheme: the ring's one teacher, or every other network
        return [self.teacher(k)] if self.k_scheme == "ring" else [j for j in range(self.k) if j != k]

    def logit_loss(self, logits, y):
        total = 0.0
        for k in range(self.k):
            ce = F.cross_entropy(logits[k], y)
            log_p_k = F.log_softmax(logits[k] / self.t, dim=1)
            teachers = self.kl_teachers(k)
            kl = 0.0
            for j in teachers:
                p_j = F.softmax(logits[j].detach() / self.t, dim=1)
                kl = kl + (p_j * (torch.log(p_j) - log_p_k)).sum(dim=1).mean()
            total = total + ce + self.t**2 * kl / len(teachers)
        return total

    def disc_step(self, maps):
        # D_k calls the teacher's map real and its own network's fake
        k_range = range(self.k)
        self.opt_d.zero_grad()
        loss_d = 0.0
        for k in k_range:
            j = self.teacher(k)
            loss_d = loss_d + ((1 - self.discs[k](maps[j].detach())) ** 2).mean() + (self.discs[k](maps[k].detach()) ** 2).mean()
        loss_d.backward()
        self.opt_d.step()

    def gen_loss(self, maps):
        loss_g = 0.0
        for k in range(self.k):
            loss_g = loss_g + ((1 - self.discs[k](maps[k])) ** 2).mean()
        return loss_g

    def iteration(self, x, y):
        """Sequential order (docs/method.md default)."""
        # 1. logit stage
        self.opt_logit.zero_grad()
        self.logit_loss([net(x) for net in self.nets], y).backward()
        self.opt_logit.step()
        # 2. feature maps at the new weights
        maps = [self.transfers[k](feature_map(self.nets[k], x)) for k in range(self.k)]
        # 3. discriminator stage
        self.disc_step(maps)
        # 4. feature stage through the (updated, not stepped) discriminators
        self.opt_g.zero_grad()
        self.gen_loss(maps).backward()
        self.opt_g.step()

    def iteration_simultaneous(self, x, y):
        """Simultaneous order: one forward pass of the feature extractors serves both stages."""
        outs = [net.forward_intermediates(x, indices=1, output_fmt="NCHW") for net in self.nets]  # (final, [last map])
        logits = [net.forward_head(final) for net, (final, _) in zip(self.nets, outs)]
        maps = [self.transfers[k](outs[k][1][-1]) for k in range(self.k)]
        total = self.logit_loss(logits, y)
        self.disc_step(maps)
        loss_g = self.gen_loss(maps)
        g_logit = torch.autograd.grad(total, self.net_params, retain_graph=True)
        g_feat = torch.autograd.grad(loss_g, self.g_params, allow_unused=True)  # a ViT's final norm: no feature-map gradient
        for p, g in zip(self.net_params, g_logit):
            p.grad = g
        self.opt_logit.step()
        for p, g in zip(self.g_params, g_feat):
            p.grad = g
        self.opt_g.step()
