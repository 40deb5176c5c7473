"""Capture a trained network as an ANN graph with ``torch.fx`` (SPEC section 1).

The captured :class:`AnnGraph` is a DAG of :class:`AnnNode` s, each holding one
operation with float64 numpy parameters and its output shape (without the
batch dimension). Supported: Conv2d (stride, padding, groups, bias; zero
padding, no dilation), Linear, BatchNorm1d/2d, CS-QCFS / QCFS activations,
AvgPool2d, AdaptiveAvgPool2d to a size that divides the input, Flatten (also
``torch.flatten`` and ``x.view(x.size(0), -1)``), Dropout, Identity, residual
``+`` and a final Linear readout. Anything else is refused with a
:class:`GraphError` that names the node and its op.

Activations are recognised by what they compute, not by attribute names
(:mod:`.activation`): before tracing, the model runs once eagerly (which also
checks the input shape), every module outside ``torch.nn`` is probed on the
input it saw, and those whose forward is a clip-floor-shift chain become leaf
ActOps with ``lambda`` evaluated by the module's own arithmetic. Modules with an
integer ``T`` attribute are captured in their ANN mode (``T = 0``).

Each fx node is translated by a handler looked up in a table: by fx opcode
(:data:`_OPCODES`), by leaf-module class (:func:`~csqcfs_deploy.convert.modules.module_op`,
a ``singledispatch`` over the module's class and its bases), by function target
(:data:`_FUNCTIONS`) and by method name (:data:`_METHODS`).
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from csqcfs_deploy.convert.activation import ActivationSpec, ann_mode, recognise
from csqcfs_deploy.convert.modules import Site, activation_op, leaf_op, refuse
from csqcfs_deploy.errors import GraphError
from csqcfs_deploy.ir.ann import (
    ActOp,
    AddOp,
    AnnGraph,
    AnnNode,
    AvgPoolOp,
    BatchNormOp,
    ConvOp,
    DropoutOp,
    FlattenOp,
    InputOp,
    LinearOp,
    Op,
)


class _Tracer(fx.Tracer):
    """Keeps the recognised activations as leaves and traces through everything else."""

    def __init__(self, activations: dict[str, ActivationSpec]) -> None:
        super().__init__()
        self.activations = activations

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.activations or super().is_leaf_module(m, qualname)


_SHORT = {ConvOp: "conv", LinearOp: "fc", BatchNormOp: "bn", ActOp: "act", AvgPoolOp: "pool",
          FlattenOp: "flatten", DropoutOp: "dropout"}


def _readable_name(node: fx.Node, op: Op) -> str:
    """fx names Sequential children '_3'; call them 'act3', 'conv0', ... instead."""
    target = str(node.target)
    if target.isdigit():
        return f"{_SHORT.get(type(op), 'node')}{target}"
    return node.name


def _shape_of(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        return None
    return tuple(int(d) for d in meta.shape[1:])


# --------------------------------------------------------------------------- the walk


@dataclass
class _Capture:
    """The state of one capture: nodes so far, what each fx node stands for, the output."""

    input_shape: tuple[int, ...]
    modules: dict[str, nn.Module]
    activations: dict[str, ActivationSpec]
    nodes: list[AnnNode] = field(default_factory=list)
    alias: dict[str, str] = field(default_factory=dict)  # fx node name -> AnnNode name
    sizes: set[str] = field(default_factory=set)  # fx nodes that are x.size(0) / x.shape[0]
    output: str | None = None

    def src(self, arg: Any, node: fx.Node) -> str:
        """The AnnNode name an fx argument stands for."""
        if not isinstance(arg, fx.Node) or arg.name not in self.alias:
            raise GraphError(f"node '{node.name}' takes an input that is not a captured tensor")
        return self.alias[arg.name]

    def emit(self, node: fx.Node, name: str, op: Op, inputs: tuple[str, ...],
             shape: tuple[int, ...], origin: str) -> None:
        self.nodes.append(AnnNode(name, op, inputs, shape, origin))
        self.alias[node.name] = name


Shape = tuple[int, ...] | None
#: Translates one fx node (with its output shape, if it has one) into the capture.
Handler = Callable[[_Capture, fx.Node, Shape], None]


def _placeholder(cap: _Capture, node: fx.Node, shape: Shape) -> None:
    if any(isinstance(n.op, InputOp) for n in cap.nodes):
        raise GraphError(f"node '{node.name}': the model takes more than one input")
    cap.emit(node, node.name, InputOp(), (), tuple(cap.input_shape), "input")


def _output(cap: _Capture, node: fx.Node, shape: Shape) -> None:
    out = node.args[0]
    if not isinstance(out, fx.Node):
        raise GraphError("the model must return a single tensor (the readout)")
    cap.output = cap.src(out, node)


def _get_attr(cap: _Capture, node: fx.Node, shape: Shape) -> None:
    raise refuse(node, f"attribute '{node.target}'", "reads a tensor attribute")


def _call_module(cap: _Capture, node: fx.Node, shape: Shape) -> None:
    m = cap.modules[str(node.target)]
    kind = f"{type(m).__name__} '{node.target}'"
    in_node = node.args[0] if node.args else None
    in_shape = _shape_of(in_node) if isinstance(in_node, fx.Node) else None
    if shape is None:
        raise refuse(node, kind, "returns no tensor")
    site = Site(node, kind, in_shape or (), shape)
    spec = cap.activations.get(str(node.target))
    op = activation_op(spec, site) if spec is not None else leaf_op(m, site)
    if len(node.args) != 1 or node.kwargs:
        raise refuse(node, kind, "is called with more than one argument")
    if op is None:
        cap.alias[node.name] = cap.src(node.args[0], node)
        return
    cap.emit(node, _readable_name(node, op), op, (cap.src(node.args[0], node),), shape,
             str(node.target))


def _lookup(table: dict[Any, Handler], key: Any) -> Handler | None:
    try:
        return table.get(key)
    except TypeError:  # an unhashable target is in no table
        return None


def _call_function(cap: _Capture, node: fx.Node, shape: Shape) -> None:
    handler = _lookup(_FUNCTIONS, node.target)
    if handler is None:
        raise refuse(node, f"function {getattr(node.target, '__name__', str(node.target))}")
    handler(cap, node, shape)


def _call_method(cap: _Capture, node: fx.Node, shape: Shape) -> None:
    handler = _METHODS.get(str(node.target))
    if handler is None:
        raise refuse(node, f"method {node.target}")
    handler(cap, node, shape)


_OPCODES: dict[str, Handler] = {
    "placeholder": _placeholder, "output": _output, "get_attr": _get_attr,
    "call_module": _call_module, "call_function": _call_function, "call_method": _call_method,
}


# ---- call_function targets


def _add(cap: _Capture, node: fx.Node, shape: Shape) -> None:
    tensors = [a for a in node.args if isinstance(a, fx.Node)]
    if len(tensors) != 2 or len(node.args) != 2 or node.kwargs:
        fname = getattr(node.target, "__name__", str(node.target))
        raise refuse(node, f"function {fname}", "adds something other than two tensors")
    cap.emit(node, node.name, AddOp(), (cap.src(tensors[0], node), cap.src(tensors[1], node)),
             shape or (), "+")


def _flatten_function(cap: _Capture, node: fx.Node, shape: Shape) -> None:
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
    if start != 1 or end != -1:
        raise refuse(node, "function flatten", f"flattens dims {start}..{end} (only 1..-1)")
    cap.emit(node, node.name, FlattenOp(), (cap.src(node.args[0], node),), shape or (),
             "torch.flatten")


def _getitem(cap: _Capture, node: fx.Node, shape: Shape) -> None:
    """``x.size()[0]`` / ``x.shape[0]``: a batch size, not a tensor."""
    if node.args and isinstance(node.args[0], fx.Node) and node.args[0].name in cap.sizes:
        cap.sizes.add(node.name)
        return
    raise refuse(node, "function getitem")


def _getattr(cap: _Capture, node: fx.Node, shape: Shape) -> None:
    """``x.shape``: a size, not a tensor."""
    if len(node.args) == 2 and node.args[1] == "shape":
        cap.sizes.add(node.name)
        return
    raise refuse(node, "function getattr")


_FUNCTIONS: dict[Any, Handler] = {
    operator.add: _add, torch.add: _add, operator.iadd: _add, torch.flatten: _flatten_function,
    operator.getitem: _getitem, getattr: _getattr,
}


# ---- call_method names


def _size(cap: _Capture, node: fx.Node, shape: Shape) -> None:
    cap.sizes.add(node.name)


def _reshape(cap: _Capture, node: fx.Node, shape: Shape) -> None:
    """``x.view(x.size(0), -1)``, ``x.reshape(...)`` alike, ``x.flatten(1)``: a flatten."""
    method = str(node.target)
    if method == "flatten":
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        ok = start == 1 and len(node.args) <= 2
    else:
        dims = node.args[1:]
        ok = (len(dims) == 2 and isinstance(dims[0], fx.Node) and dims[0].name in cap.sizes
              and dims[1] == -1)
    if not ok or shape is None or len(shape) != 1:
        raise refuse(node, f"method {method}", "reshapes other than x.view(x.size(0), -1)")
    cap.emit(node, node.name, FlattenOp(), (cap.src(node.args[0], node),), shape,
             f".{method}")


_METHODS: dict[str, Handler] = {"size": _size, "view": _reshape, "reshape": _reshape,
                                "flatten": _reshape}


# --------------------------------------------------------------------------- capture


def capture(model: nn.Module, input_shape: tuple[int, ...]) -> AnnGraph:
    """Trace ``model`` (eval mode, ANN mode) on inputs of shape (N, *input_shape)."""
    model = model.eval()
    with ann_mode(model):
        activations = find_activations(model, input_shape)
        try:
            traced_graph = _Tracer(activations).trace(model)
        except (torch.fx.proxy.TraceError, TypeError, RuntimeError, NotImplementedError) as exc:
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise GraphError(f"model cannot be captured with torch.fx (data-dependent control "
                             f"flow or an untraceable call): {msg}") from None
        gm = fx.GraphModule(model, traced_graph)
        try:
            with torch.no_grad():
                ShapeProp(gm).propagate(_probe_input(model, input_shape))
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            msg = str(exc).strip().splitlines()[0]
            raise GraphError(f"model does not run on inputs of shape {tuple(input_shape)}: "
                             f"{msg}") from None
        cap = _Capture(tuple(input_shape), dict(gm.named_modules()), activations)
        for node in gm.graph.nodes:
            handler = _OPCODES.get(node.op)
            if handler is None:
                raise refuse(node, node.op)
            handler(cap, node, _shape_of(node))
    if cap.output is None:
        raise GraphError("the model returns nothing")
    graph = AnnGraph(tuple(cap.nodes), cap.output)
    _check_readout(graph)
    return graph


def _probe_input(model: nn.Module, input_shape: tuple[int, ...]) -> torch.Tensor:
    """A seeded random batch of two inputs in the model's parameter dtype."""
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    gen = torch.Generator().manual_seed(0)
    return torch.randn(2, *input_shape, generator=gen).to(dtype)


def _first_layer(model: nn.Module) -> str:
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return f"its first layer Conv2d '{name}' takes {m.in_channels} input channels"
        if isinstance(m, nn.Linear):
            return f"its first layer Linear '{name}' takes {m.in_features} input features"
    return "it expects a different shape"


class InputShapeError(GraphError):
    """The model does not run on the data's input shape."""


def find_activations(model: nn.Module, input_shape: tuple[int, ...]
                     ) -> dict[str, ActivationSpec]:
    """Run the model once (shape check), then probe every module outside ``torch.nn``
    on the input it saw: module path -> spec of each recognised activation.

    Raises :class:`InputShapeError` (one line naming both shapes) when the model
    does not run on ``(N, *input_shape)``, and GraphError naming the module for a
    quantizing module that is not a clip-floor-shift activation.
    """
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for name, m in model.named_modules():
        if not name or type(m).__module__.startswith("torch."):
            continue

        def hook(mod: nn.Module, args: tuple[object, ...], name: str = name) -> None:
            if name not in seen and len(args) == 1 and isinstance(args[0], torch.Tensor):
                seen[name] = args[0].detach().clone()

        handles.append(m.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(_probe_input(model, input_shape))
    except Exception as exc:  # noqa: BLE001 - any failure of the user's forward on this shape
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputShapeError(
            f"the model does not run on inputs of shape {tuple(input_shape)} ({msg[:160]}); "
            f"{_first_layer(model)}; pick the dataset with --dataset or give your own data "
            "with --data FILE.npz") from None
    finally:
        for h in handles:
            h.remove()
    found: dict[str, ActivationSpec] = {}
    for name, x in seen.items():
        if any(name.startswith(f"{outer}.") for outer in found):
            continue  # inside an activation already recognised
        spec = recognise(model.get_submodule(name), x, name)
        if spec is not None:
            found[name] = spec
    return found


def _check_readout(graph: AnnGraph) -> None:
    node = graph.node(graph.output)
    while isinstance(node.op, DropoutOp):
        node = graph.node(node.inputs[0])
    if not isinstance(node.op, LinearOp):
        raise GraphError(f"the model must end in a Linear readout without activation; its "
                         f"output comes from node '{node.name}' ({type(node.op).__name__})")


__all__ = ["InputShapeError", "capture", "find_activations"]
