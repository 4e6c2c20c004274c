"""Split a model at a layer with torch.fx and run only the part after it.

When a model is FX-traceable and everything its output depends on after ``layer`` is computed from
the layer's output alone (no skip connection around the layer, the layer called once), the
*suffix* module maps the layer output (N, U, h, w) to the model output. Ablations can then run from
cached activations without re-running the part of the model before the layer.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import fx, nn

from dissect.record.trace import find_module


class _LayerLeafTracer(fx.Tracer):
    """A tracer that keeps the target layer as one ``call_module`` node (never traced into)."""

    def __init__(self, layer: str) -> None:
        super().__init__()
        self.layer = layer

    def is_leaf_module(self, module: nn.Module, module_qualified_name: str) -> bool:
        if module_qualified_name == self.layer:
            return True
        return super().is_leaf_module(module, module_qualified_name)


def _needed_nodes(output: fx.Node, cut: fx.Node) -> set[fx.Node] | None:
    """Nodes the output depends on, walking back no further than ``cut``.

    Returns None when the output depends on a graph input other than through ``cut``.
    """
    needed: set[fx.Node] = set()
    stack = [output]
    while stack:
        node = stack.pop()
        if node in needed:
            continue
        needed.add(node)
        if node is cut:
            continue
        if node.op == "placeholder":
            return None
        stack.extend(node.all_input_nodes)
    return needed


def split_at_layer(model: nn.Module, layer: str) -> fx.GraphModule | None:
    """The part of ``model`` after ``layer``, as a module taking the layer output.

    Parameters
    ----------
    model : nn.Module (eval mode is kept; parameters are shared, not copied)
    layer : dotted ``named_modules()`` name (LayerError when unknown)

    Returns
    -------
    A ``torch.fx.GraphModule`` with ``suffix(acts) == model(x)`` whenever ``acts`` is the output of
    ``layer`` for input ``x``; or None when the model cannot be split there: not symbolically
    traceable, the layer called more than once (or never) in the traced graph, or the output depends
    on values computed before the layer (e.g. a residual connection around it).
    """
    find_module(model, layer)
    tracer = _LayerLeafTracer(layer)
    try:
        graph = tracer.trace(model)
    except Exception:  # noqa: BLE001 - any tracing failure means: not splittable, use hooks
        return None
    layer_nodes = [node for node in graph.nodes
                   if node.op == "call_module" and node.target == layer]
    outputs = [node for node in graph.nodes if node.op == "output"]
    if len(layer_nodes) != 1 or len(outputs) != 1:
        return None
    cut, output = layer_nodes[0], outputs[0]
    needed = _needed_nodes(output, cut)
    if needed is None or cut not in needed:
        return None
    suffix_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {cut: suffix_graph.placeholder("activation")}
    lookup: Callable[[fx.Node], fx.Node] = env.__getitem__
    for node in graph.nodes:
        if node in needed and node is not cut and node is not output:
            env[node] = suffix_graph.node_copy(node, lookup)
    suffix_graph.output(fx.map_arg(output.args[0], lookup))
    suffix_graph.lint()
    suffix = fx.GraphModule(tracer.root, suffix_graph, class_name="Suffix")
    suffix.train(model.training)
    return suffix
