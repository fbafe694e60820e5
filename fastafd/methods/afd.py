"""``afd``: online adversarial knowledge distillation (Chung et al., ICML 2020), cyclic for K > 2.

One iteration, in the "sequential" order of docs/method.md:

1. forward all peers; **logit step** (SGD): ``sum_k CE(y, z_k) + T^2 KL(z_j || z_k)`` updates every peer;
2. forward the feature extractors again at the new weights and map them with the transfer layers;
3. **discriminator step** (Adam): ``sum_k (1 - D_k(T_j(F_j)))^2 + D_k(T_k(F_k))^2`` on detached maps;
4. **feature step** (Adam): ``sum_k (1 - D_k(T_k(F_k)))^2`` through the updated, frozen discriminators
   updates the feature extractors G_k and the transfer layers T_k.

Discriminator ``D_k`` calls its teacher's map real and its own network's map fake; the teacher of
peer ``k`` is peer ``k - 1`` (mod K), so K discriminators suffice for any K. The K discriminators
run as one :class:`DiscriminatorBank` (grouped convolutions), and the losses of all peers are
batched over the peer dimension: no Python loop over discriminators in the hot path.

``method.order=simultaneous`` (opt-in, a deviation from docs/method.md) runs the feature extractors once:
the logit loss and the generator loss are both taken from that forward pass, their gradients are
computed before either optimizer moves the shared weights, and then SGD and Adam step in turn. The
logit gradients are computed (and checked for non-finite values) before the discriminator steps, so
a non-finite logit gradient skips every optimizer of the iteration, as in the sequential order.

Mapped feature maps travel as a list of K ``(B, C, H, W)`` tensors in the common shape (channels-last
on CUDA); the discriminator bank concatenates them along channels, one copy that keeps the layout.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from fastafd import losses
from fastafd.methods.base import StageSpec, Task
from fastafd.methods.registry import register
from fastafd.models.discriminator import DiscriminatorBank
from fastafd.models.peers import feature_parameters, features
from fastafd.models.transfer import common_shape, make_transfer
from fastafd.steps import Stage


@register
class AFD(Task):
    method = "afd"
    summary = "AFD: logit loss + adversarial (LSGAN) feature-map distillation through one discriminator per peer, own Adam stages"
    optimizers = ("optim", "adv_optim")
    loss_keys = ("ce", "kl", "g_loss", "d_loss")
    eval_keys = ("d_real", "d_fake")
    compile_units = ("logit_forward", "mapped_features", "disc_loss", "gen_loss", "forward_all")
    fused_units = ("logit_loss", "transform", "disc_loss", "gen_loss")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        target = common_shape(self.shapes)
        self.transfers = nn.ModuleList(make_transfer(s, target) for s in self.shapes)
        self.discriminators = DiscriminatorBank(target[0], self.k)

    @property
    def retains_peer_graph(self) -> bool:
        return self.cfg.order == "simultaneous"  # the logit and the generator gradients through one forward

    def stages(self) -> dict[str, StageSpec]:
        extractor = [p for peer in self.peers for p in feature_parameters(peer)]
        return {
            "logit": StageSpec(self.peer_parameters(), "optim"),
            "disc": StageSpec(list(self.discriminators.parameters()), "adv_optim"),
            "feat": StageSpec(extractor + list(self.transfers.parameters()), "adv_optim"),
        }

    # -- forward + loss units (each one compiled when the run compiles) ----------------------------

    def logit_forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        with self.numerics.autocast():
            _, logits = self.forward_peers(x)
        return self.logit_loss(logits, y)

    def mapped_features(self, x: Tensor) -> list[Tensor]:
        """``T_k(G_k(x))`` for every peer: K maps in the common shape."""
        with self.numerics.autocast():
            feats = [features(peer, x) for peer in self.peers]
        return self.transform(feats)

    def transform(self, feats: list[Tensor]) -> list[Tensor]:
        """The transfer layers: ``T_k(F_k)`` for every peer."""
        with self.numerics.autocast():
            return [t(f) for t, f in zip(self.transfers, feats, strict=True)]

    def forward_all(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor], list[Tensor]]:
        """Simultaneous mode: one forward pass gives the logit loss and the mapped feature maps."""
        with self.numerics.autocast():
            feats, logits = self.forward_peers(x)
        mapped = self.transform(feats)
        loss, metrics = self.logit_loss(logits, y)
        return loss, metrics, mapped

    def discriminate(self, maps: list[Tensor]) -> Tensor:
        """``D_k(maps[k])`` for every k: K ``(B, C, H, W)`` maps -> ``(K, B)``."""
        with self.numerics.autocast():
            return self.discriminators(maps)

    def teacher_maps(self, maps: list[Tensor]) -> list[Tensor]:
        """The map each discriminator calls real: its peer's teacher's (``maps[teacher_of[k]]``)."""
        return [maps[j] for j in self.teacher_of]

    def disc_loss(self, mapped: list[Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        fake = [m.detach() for m in mapped]
        d_real, d_fake = self.discriminate(self.teacher_maps(fake)), self.discriminate(fake)
        loss = losses.lsgan_discriminator(d_real, d_fake)
        return loss.sum(), {"d_loss": loss.detach(), "d_real": d_real.detach().float().mean(1), "d_fake": d_fake.detach().float().mean(1)}

    def gen_loss(self, mapped: list[Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        loss = losses.lsgan_generator(self.discriminate(mapped))
        return self.cfg.feature_weight * loss.sum(), {"g_loss": loss.detach()}

    # -- one iteration -------------------------------------------------------------------------

    def train_step(self, x: Tensor, y: Tensor, stages: Mapping[str, Stage]) -> dict[str, Tensor]:
        if self.cfg.order == "simultaneous":
            return self.train_step_simultaneous(x, y, stages)
        loss, metrics = self.logit_forward(x, y)
        stages["logit"].step(loss)
        mapped = self.mapped_features(x)
        loss, d_metrics = self.disc_loss(mapped)
        stages["disc"].step(loss)
        loss, g_metrics = self.gen_loss(mapped)
        stages["feat"].step(loss)
        return metrics | d_metrics | g_metrics

    def train_step_simultaneous(self, x: Tensor, y: Tensor, stages: Mapping[str, Stage]) -> dict[str, Tensor]:
        logit, disc, feat = stages["logit"], stages["disc"], stages["feat"]
        logit_loss, metrics, mapped = self.forward_all(x, y)
        logit.guard.check(logit_loss)
        # both gradients before either optimizer moves the weights the two stages share; the logit
        # gradients (checked in set_grads) before the discriminator steps
        logit.set_grads(torch.autograd.grad(logit.guard.scale(logit_loss), logit.params, retain_graph=True, allow_unused=True))
        d_loss, d_metrics = self.disc_loss(mapped)
        disc.step(d_loss)
        g_loss, g_metrics = self.gen_loss(mapped)
        feat.guard.check(g_loss)
        g_feat = torch.autograd.grad(feat.guard.scale(g_loss), feat.params, allow_unused=True)
        logit.apply()
        feat.step_with(g_feat)
        return metrics | d_metrics | g_metrics

    @classmethod
    def describe_eval(cls, peers: list[dict]) -> str:
        """Each discriminator's mean output on real/fake validation maps: about 0.5/0.5 when the game is balanced."""
        return "D(real)/D(fake) " + " ".join(f"{p['d_real']:.2f}/{p['d_fake']:.2f}" for p in peers)

    def eval_extras(self, feats: list[Tensor]) -> dict[str, Tensor]:
        """Sums of each discriminator's output on its real (teacher's) and fake (own) maps."""
        with self.numerics.autocast():
            fake = [t(f) for t, f in zip(self.transfers, feats, strict=True)]
            d_fake = self.discriminate(fake).float()
            d_real = self.discriminate(self.teacher_maps(fake)).float()
        return {"d_real": d_real.sum(1), "d_fake": d_fake.sum(1)}
