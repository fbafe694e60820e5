"""Regional compilation keeps the overlap: under torch.compile, the gradients of a peer's last blocks are
accumulated (and their all-reduce can start) while its first blocks are still in backward.

Compiled with the ``aot_eager`` backend: the same autograd graph as Inductor (one
``CompiledFunctionBackward`` node per compiled function), without the code generation that makes
Inductor slow on CPU; Inductor's numerics are checked in test_speed_paths.py."""

import pytest
import timm
import torch

from fastafd.models import regions
from fastafd.models.peers import features_and_logits
from tests.helpers import batches, tiny_config, tiny_task


def _backward_events(task, x, y):
    """Run one forward + backward of the task's loss; the order in which compiled nodes start their backward
    (``("node", i)``) and parameters' post-accumulate-grad hooks fire (``("param", name)``)."""
    events, handles = [], []
    for name, p in task.peers.named_parameters():
        handles.append(p.register_post_accumulate_grad_hook(lambda _p, name=name: events.append(("param", name))))
    loss, _ = task.forward_loss(x, y)
    seen, todo, compiled = set(), [loss.grad_fn], []
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "CompiledFunctionBackward" in node.name():
            compiled.append(node)
        todo.extend(n for n, _ in node.next_functions)
    for i, node in enumerate(compiled):
        handles.append(node.register_prehook(lambda _g, i=i: events.append(("node", i))))
    torch.autograd.backward(loss, inputs=list(task.peers.parameters()))
    for h in handles:
        h.remove()
    return events, len(compiled)


@pytest.mark.parametrize("scope", ["regional", "whole"])
def test_compiled_peers_accumulate_their_last_blocks_gradients_before_the_first_blocks_backward(scope):
    task, _ = tiny_task(tiny_config(("cifar_resnet8", "cifar_resnet8"), "dml"), compile=True, scope=scope, backend="aot_eager")
    (x, y), = batches(1)
    events, nodes = _backward_events(task, x, y)

    def between(peer):  # compiled backward nodes started after peer's layer3 gradients and before its layer1 gradients
        last3 = max(i for i, e in enumerate(events) if e[1] and str(e[1]).startswith(f"{peer}.layer3."))
        first1 = min(i for i, e in enumerate(events) if e[1] and str(e[1]).startswith(f"{peer}.layer1."))
        return sum(e[0] == "node" for e in events[last3:first1])

    if scope == "whole":  # the issue: one node per unit, every hook fires after its whole backward
        assert nodes == 1 and [between(p) for p in (0, 1)] == [0, 0]
        return
    # regional: a node per stage of each peer (3 x 2) and the fused loss; each peer's last stage's gradients
    # (the largest bucket of a ResNet) are accumulated before the backward of its first stage starts
    assert nodes == 7
    assert [between(p) for p in (0, 1)] == [2, 2], events

def test_repeated_blocks_of_timm_families():
    def names(model):
        ids = {id(b) for b in regions.repeated_blocks(model)}
        return [n for n, m in model.named_modules() if id(m) in ids]

    with torch.device("meta"):
        assert names(timm.create_model("resnet18")) == ["layer1", "layer2", "layer3", "layer4"]
        assert names(timm.create_model("vit_tiny_patch16_224")) == [f"blocks.{i}" for i in range(12)]
        assert names(timm.create_model("convnext_atto")) == [f"stages.{i}" for i in range(4)]
        assert names(timm.create_model("regnetx_002")) == ["s1", "s2", "s3", "s4"]


def test_identical_blocks_share_one_compiled_graph():
    """A ViT's blocks compile once (regional compilation's shorter cold start)."""
    torch._dynamo.reset()
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, depth=4, num_classes=10)
    regions.compile_regions(model, "aot_eager")
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    _, logits = features_and_logits(model, torch.randn(2, 3, 32, 32))
    logits.sum().backward()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before == 1
    model.eval()
    with torch.no_grad():  # evaluation runs the eager blocks: no recompile at the train/eval switch
        features_and_logits(model, torch.randn(2, 3, 32, 32))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - before == 1


def test_blocks_of_different_shapes_compile_without_recompiles():
    """ResNet's stages differ in shape: each gets its own graph, not a recompile of a shared one."""
    # torch's own patch: pytest's monkeypatch does not see the config module's attribute, and its undo deletes the option
    with torch._dynamo.config.patch(error_on_recompile=True):
        model = timm.create_model("cifar_resnet8", num_classes=10)
        regions.compile_regions(model, "aot_eager")
        _, logits = features_and_logits(model, torch.randn(2, 3, 32, 32))
        logits.sum().backward()
