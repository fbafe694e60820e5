"""The task interface shared by all methods, and the parts every method uses (peer forward, logit loss, eval)."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from torch import Tensor, nn

from fastafd import losses, metrics
from fastafd.models import regions
from fastafd.models.peers import create_peer, feature_shape, features_and_logits
from fastafd.steps import Stage

if TYPE_CHECKING:
    from fastafd.config import MethodConfig, TrainConfig

OptimKey = Literal["optim", "adv_optim"]


@dataclass
class StageSpec:
    """A stage a method needs: its parameters and which optimizer config (``optim`` or ``adv_optim``) drives them."""

    params: list[nn.Parameter]
    optim: OptimKey


@dataclass
class Numerics:
    """How the task runs its forward passes: the autocast dtype on this device type."""

    device_type: str = "cpu"
    dtype: torch.dtype = torch.float32

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)


class Task(nn.Module):
    """Owns the trainable parts of one method and runs one training iteration.

    :meth:`build` is the construction seam: it makes the task of a config (the default builds K
    standalone peers; a multi-branch method builds its own networks). :meth:`deployable_state` says
    what the deployable networks are (export), :meth:`ensemble` how they vote (evaluation).
    The trainer only calls :meth:`stages` (to build optimizers), :meth:`compile`, :meth:`train_step`
    and :meth:`eval_step`; everything that differs between methods lives in the subclasses, and the
    class attributes below are all that the rest of fastafd (config validation, help, display,
    resume rules) knows about a method (see :mod:`fastafd.methods.registry`).
    Peer ``k``'s discriminator (afd) uses peer ``teachers[k] = (k - 1) mod K`` (cyclic scheme; mutual for K = 2);
    the KL term (and l1/l2's alignment) follows ``method.k_scheme``: every other peer, 1/(K-1) each (``all``), or
    the same ring (``ring``, the paper's); :attr:`distil_teachers` lists peer k's teachers.
    """

    method: ClassVar[str]
    """``--method.name`` of this method."""
    summary: ClassVar[str] = ""
    """One line for ``fastafd methods``, the help and the recipes' descriptions."""
    needs_pair: ClassVar[bool] = True
    """Whether it distils between peers (then K >= 2 is required)."""
    optimizers: ClassVar[tuple[OptimKey, ...]] = ("optim",)
    """The optimizer configs its stages use (a resume that changes one's ``name`` is refused)."""
    loss_keys: ClassVar[tuple[str, ...]] = ("ce",)
    """Per-peer training metrics shown in the progress output and the epoch summary, in this order."""
    eval_keys: ClassVar[tuple[str, ...]] = ()
    """Per-peer evaluation extras of :meth:`eval_extras` (TensorBoard ``val/<key>/<peer>``, ``metrics.jsonl``)."""
    same_architecture: ClassVar[bool] = False
    """Whether every name in ``model.peers`` must be the same network (the multi-branch methods: one
    network with K branches); the recipes pair such a method only with same-network peers."""
    recipe_defaults: ClassVar[dict[str, float]] = {}
    """``method.*`` values the recipes set for this method (CL: its paper's temperature)."""
    compile_units: ClassVar[tuple[str, ...]] = ()
    """``system.compile_scope=whole``: the methods of the task that :meth:`compile` replaces by their
    ``torch.compile`` d version (each a forward of the peers + loss); the stages' backward and optimizer
    steps stay eager."""
    fused_units: ClassVar[tuple[str, ...]] = ()
    """``system.compile_scope=regional`` (the default): the methods that run no peer (losses, transfer
    layers, discriminators), compiled whole as they are; the peers' repeated blocks are compiled one by
    one (:mod:`fastafd.models.regions`) and the units of :attr:`compile_units` run eager around them."""

    def __init__(
        self,
        peers: list[nn.Module],
        shapes: list[tuple[int, int, int]],
        cfg: MethodConfig,
        numerics: Numerics,
        names: list[str] | None = None,
    ) -> None:
        super().__init__()
        self.peers = nn.ModuleList(peers)
        self.names = list(names) if names else [type(p).__name__ for p in peers]
        self.shapes = list(shapes)
        self.cfg = cfg
        self.numerics = numerics
        k = len(peers)
        self.teacher_of = [(i - 1) % k for i in range(k)]
        self.register_buffer("teachers", torch.tensor(self.teacher_of), persistent=False)
        self.distil_teachers = [[j for j in range(k) if j != i] for i in range(k)] if cfg.k_scheme == "all" else [[j] for j in self.teacher_of]
        """Peer k's teachers in the KL (and alignment) term; equally weighted (``method.k_scheme``)."""

    @classmethod
    def build(cls, cfg: TrainConfig, num_classes: int, numerics: Numerics, device: torch.device, channels_last: bool) -> Task:
        """The task of ``cfg`` (uncompiled: the caller calls :meth:`compile` when the run compiles; the caller
        seeds). The default creates the K peers as standalone networks and measures their feature maps."""
        size = cfg.data.image_size
        peers = [create_peer(name, num_classes, image_size=size, drop_rate=cfg.model.drop_rate, pretrained=cfg.model.pretrained)
                 for name in cfg.model.peers]
        shapes = [feature_shape(p, size, name) for p, name in zip(peers, cfg.model.peers, strict=True)]
        task = cls(peers, shapes, cfg.method, numerics, names=list(cfg.model.peers))
        task.to(device=device, memory_format=torch.channels_last if channels_last else torch.preserve_format)
        return task

    @classmethod
    def check(cls, cfg: TrainConfig) -> None:
        """Refuse, in one line (:class:`UserError`), a config this method cannot train (called by config
        validation, before anything is built or written); K >= 2 for :attr:`needs_pair` is checked there."""

    @classmethod
    def deployable_state(cls, state: Mapping[str, Tensor], k: int) -> dict[str, Tensor]:
        """Deployable network ``k`` (peer k) from the task's state dict, under the plain network's key names."""
        prefix = f"peers.{k}."
        return {key[len(prefix):]: v for key, v in state.items() if key.startswith(prefix)}

    @property
    def k(self) -> int:
        return len(self.peers)

    def compile(self, scope: Literal["regional", "whole"] = "regional", backend: str = "inductor") -> None:
        """The one place where a task is compiled (the trainer calls this once, before the first step).

        ``regional``: each peer's repeated blocks compiled on their own (each block's backward its own
        autograd node, so the overlapped all-reduce starts while earlier blocks are still in backward),
        plus the :attr:`fused_units`. ``whole``: the :attr:`compile_units`, each a whole forward + loss.
        A unit becomes an instance attribute that shadows the method, so the task's own code calls the
        compiled version; :meth:`eval_step` and checkpoints use the module itself (no ``_orig_mod.``).
        ``backend``: Inductor; tests use ``aot_eager`` (the same autograd graph, no code generation).
        """
        share = "retain_graph" if self.retains_peer_graph else ""
        if share:
            # a second backward through one compiled forward (retain_graph) needs the saved tensors that AOTAutograd
            # would otherwise donate to (free in) the first backward
            torch._functorch.config.donated_buffer = False
        if scope == "whole":
            units = self.compile_units
        else:
            blocks = [b for peer in self.peers for b in regions.compile_regions(peer, backend, share)]
            # blocks of one class share a code object, hence dynamo's per-code recompile limit (8):
            # allow a graph per block, train and a smaller last batch
            dynamo = torch._dynamo.config
            dynamo.recompile_limit = max(dynamo.recompile_limit, 2 * len(blocks) + 8)
            units = self.fused_units
        for name in units:
            setattr(self, name, torch.compile(regions.own_code(getattr(self, name), share), backend=backend))

    @property
    def retains_peer_graph(self) -> bool:
        """Whether an iteration back-propagates twice through the peers' forward (``retain_graph``): its
        regionally compiled blocks then keep their saved buffers (:func:`fastafd.models.regions.compile_block`)."""
        return False

    @classmethod
    def describe_eval(cls, peers: list[dict]) -> str:
        """Extra text for the epoch summary from the evaluated per-peer rows (AFD: D(real)/D(fake))."""
        return ""

    # -- the three calls the trainer makes -------------------------------------------------------

    def stages(self) -> dict[str, StageSpec]:
        raise NotImplementedError

    def train_step(self, x: Tensor, y: Tensor, stages: Mapping[str, Stage]) -> dict[str, Tensor]:
        """One iteration; returns detached per-peer metrics as ``(K,)`` device tensors."""
        raise NotImplementedError

    @torch.no_grad()
    def eval_step(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        """Sums over the batch: ``correct`` (K, 2) top-1/top-5 hits per peer, ``ensemble`` (2,), ``count``."""
        with self.numerics.autocast():
            feats, logits = self.forward_peers(x)
        out = {
            "correct": metrics.topk_correct(logits, y),
            "ensemble": metrics.topk_correct(self.ensemble(feats, logits), y),
            "count": torch.full((), y.shape[0], device=y.device),  # filled on the device: no host-to-device copy
        }
        out.update(self.eval_extras(feats))
        return out

    def ensemble(self, feats: list[Tensor], logits: Tensor) -> Tensor:
        """The ensemble's class scores ``(B, classes)`` from the ``(K, B, classes)`` logits: the mean of the
        deployable networks' probabilities (ONE: its gate-weighted logits)."""
        return logits.float().softmax(dim=-1).mean(dim=0)

    def eval_extras(self, feats: list[Tensor]) -> dict[str, Tensor]:
        """Method-specific evaluation sums (AFD: discriminator outputs)."""
        return {}

    # -- shared pieces -----------------------------------------------------------------------------

    def peer_parameters(self) -> list[nn.Parameter]:
        return [p for peer in self.peers for p in peer.parameters()]

    def forward_peers(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        """Feature maps F_k (list, NCHW) and logits stacked as ``(K, B, classes)``, one forward pass per peer."""
        outs = [features_and_logits(peer, x) for peer in self.peers]
        return [f for f, _ in outs], torch.stack([z for _, z in outs])

    def logit_loss(self, logits: Tensor, y: Tensor, *, kl: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
        """``sum_k CE(y, z_k) + kl_weight * T^2 KL(z_teacher(k) || z_k)`` (with ``k_scheme=all`` the KL to every other
        peer, averaged); the per-peer terms as metrics."""
        ce = losses.cross_entropy(logits, y)
        metrics = {"ce": ce.detach()}
        total = ce.sum()
        if kl:
            if self.cfg.k_scheme == "all" and self.k > 2:
                kl_term = losses.kl_to_peers(logits, self.cfg.temperature)
            else:  # the ring; for K = 2 both rules are this one
                kl_term = losses.kl_to_teacher(logits, self.teachers, self.cfg.temperature)
            total = total + self.cfg.kl_weight * kl_term.sum()
            metrics["kl"] = kl_term.detach()
        return total, metrics


class SingleStageTask(Task):
    """A method with one loss and one optimizer: :meth:`forward_loss` (the unit of compile) gives the
    loss, the ``logit`` stage (SGD over every peer parameter, plus :meth:`extra_parameters`) steps on it."""

    compile_units = ("forward_loss",)
    fused_units = ("logit_loss",)

    def stages(self) -> dict[str, StageSpec]:
        return {"logit": StageSpec(self.peer_parameters() + self.extra_parameters(), "optim")}

    def extra_parameters(self) -> list[nn.Parameter]:
        """Trainable parts of the method besides the peers (l1/l2: the transfer layers)."""
        return []

    def forward_loss(self, x: Tensor, y: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def train_step(self, x: Tensor, y: Tensor, stages: Mapping[str, Stage]) -> dict[str, Tensor]:
        loss, step_metrics = self.forward_loss(x, y)
        stages["logit"].step(loss)
        return step_metrics
