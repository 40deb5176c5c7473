"""Capture a trained network as an ANN graph with ``torch.fx`` (SPEC section 1).

The captured :class:`AnnGraph` is a DAG of :class:`AnnNode` s, each holding one
operation with float64 numpy parameters and its output shape (without the
batch dimension). Supported: Conv2d (stride, padding, groups, bias; zero
padding, no dilation), Linear, BatchNorm1d/2d, CS-QCFS / QCFS activations,
AvgPool2d, AdaptiveAvgPool2d to a size that divides the input, Flatten (also
``torch.flatten`` and ``x.view(x.size(0), -1)``), Dropout, Identity, residual
``+`` and a final Linear readout. Anything else is refused with a
:class:`GraphError` that names the node and its op.

Activations are recognised by the reference implementations' convention: a
module with a learnable threshold ``up`` (one value or one per channel), an
integer level count ``t`` and optionally ``mode == 'softplus'`` (threshold
``softplus(up)``, else ``up``); ``phi`` is read from the module if present
(default 0.5).
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.nn import functional as F

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

# --------------------------------------------------------------------------- recognise


def is_activation(module: nn.Module) -> bool:
    """True for a module following the QCFS convention (``up`` threshold, ``t`` levels)."""
    # read the raw tables: during fx tracing, attribute access returns proxies
    up = _raw_up(module)
    t = vars(module).get("t", getattr(type(module), "t", None))
    return isinstance(up, torch.Tensor) and isinstance(t, int) and not isinstance(t, bool)


def _raw_up(module: nn.Module) -> torch.Tensor | None:
    for table in (module._parameters, module._buffers, vars(module)):
        up = table.get("up")
        if isinstance(up, torch.Tensor):
            return up
    return None


def activation_threshold(module: nn.Module) -> torch.Tensor:
    """The activation's threshold (``softplus(up)`` in softplus mode, else ``up``), 1-D."""
    up = _raw_up(module)
    assert up is not None
    up = up.detach().to(torch.float64).flatten()
    if getattr(module, "mode", None) == "softplus":
        return F.softplus(up)
    return up


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        if len(v) == 1:
            return int(v[0]), int(v[0])
        return int(v[0]), int(v[1])
    return int(v), int(v)


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().to(torch.float64).cpu().numpy().copy()


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return is_activation(m) or super().is_leaf_module(m, qualname)


def _refuse(node: fx.Node, what: str, why: str = "is not supported") -> GraphError:
    return GraphError(f"node '{node.name}' ({what}) {why}; supported: Conv2d, Linear, "
                      "BatchNorm, CS-QCFS/QCFS, AvgPool2d, AdaptiveAvgPool2d, Flatten, "
                      "Dropout, residual +")


def _module_op(node: fx.Node, m: nn.Module, in_shape: tuple[int, ...],
               out_shape: tuple[int, ...]) -> Op | None:
    """Translate one leaf module; None means 'pass through' (Identity)."""
    kind = f"{type(m).__name__} '{node.target}'"
    if is_activation(m):
        thr = activation_threshold(m)
        channels = out_shape[0]
        if thr.numel() == 1:
            thr = thr.expand(channels)
        elif thr.numel() != channels:
            raise GraphError(f"node '{node.name}' ({kind}): threshold has {thr.numel()} values "
                             f"for {channels} channels")
        phi = float(getattr(m, "phi", 0.5))
        lam = thr.numpy().copy()
        return ActOp(lam, int(m.t), phi, lam.copy())  # type: ignore[arg-type]
    if isinstance(m, nn.Conv2d):
        if m.padding_mode != "zeros":
            raise _refuse(node, kind, f"uses padding_mode={m.padding_mode!r}")
        if _pair(m.dilation) != (1, 1):
            raise _refuse(node, kind, "uses dilation")
        if isinstance(m.padding, str):
            raise _refuse(node, kind, f"uses padding={m.padding!r}; give explicit padding")
        return ConvOp(_np(m.weight), _np(m.bias), _pair(m.stride), _pair(m.padding),  # type: ignore[arg-type]
                      int(m.groups))
    if isinstance(m, nn.Linear):
        return LinearOp(_np(m.weight), _np(m.bias))  # type: ignore[arg-type]
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        if m.running_mean is None or m.running_var is None:
            raise _refuse(node, kind, "has no running statistics (track_running_stats=False)")
        var = m.running_var.detach().to(torch.float64)
        mean = m.running_mean.detach().to(torch.float64)
        gamma = (m.weight.detach().to(torch.float64) if m.weight is not None
                 else torch.ones_like(var))
        beta = m.bias.detach().to(torch.float64) if m.bias is not None else torch.zeros_like(var)
        scale = gamma / torch.sqrt(var + m.eps)
        return BatchNormOp(scale.numpy().copy(), (beta - mean * scale).numpy().copy())
    if isinstance(m, nn.AvgPool2d):
        if m.ceil_mode:
            raise _refuse(node, kind, "uses ceil_mode=True")
        if m.divisor_override is not None:
            raise _refuse(node, kind, "uses divisor_override")
        pad = _pair(m.padding)
        if pad != (0, 0) and not m.count_include_pad:
            raise _refuse(node, kind, "uses count_include_pad=False with padding")
        k = _pair(m.kernel_size)
        return AvgPoolOp(k, _pair(m.stride if m.stride is not None else k), pad)
    if isinstance(m, nn.AdaptiveAvgPool2d):
        return _adaptive_pool(node, kind, m.output_size, in_shape)
    if isinstance(m, nn.Flatten):
        if m.start_dim != 1 or m.end_dim != -1:
            raise _refuse(node, kind, f"flattens dims {m.start_dim}..{m.end_dim} (only 1..-1)")
        return FlattenOp()
    if isinstance(m, (nn.Dropout, nn.Dropout1d, nn.Dropout2d)):
        return DropoutOp()
    if isinstance(m, nn.Identity):
        return None
    raise _refuse(node, kind)


def _adaptive_pool(node: fx.Node, kind: str, output_size: Any,
                   in_shape: tuple[int, ...]) -> AvgPoolOp:
    _, h, w = in_shape
    oh, ow = _pair(output_size if output_size is not None else (h, w))
    oh, ow = (oh or h), (ow or w)
    if h % oh or w % ow:
        raise _refuse(node, kind, f"pools {h}x{w} to {oh}x{ow}, which is not a whole division")
    return AvgPoolOp((h // oh, w // ow), (h // oh, w // ow), (0, 0))


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


def capture(model: nn.Module, input_shape: tuple[int, ...]) -> AnnGraph:
    """Trace ``model`` (eval mode) on inputs of shape (N, *input_shape) into an AnnGraph."""
    model = model.eval()
    try:
        traced_graph = _Tracer().trace(model)
    except (torch.fx.proxy.TraceError, TypeError, RuntimeError, NotImplementedError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GraphError(f"model cannot be captured with torch.fx (data-dependent control "
                         f"flow or an untraceable call): {msg}") from None
    gm = fx.GraphModule(model, traced_graph)
    try:
        with torch.no_grad():
            param = next(model.parameters(), None)
            dtype = param.dtype if param is not None else torch.float32
            ShapeProp(gm).propagate(torch.zeros(2, *input_shape, dtype=dtype))
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        msg = str(exc).strip().splitlines()[0]
        raise GraphError(f"model does not run on inputs of shape {tuple(input_shape)}: "
                         f"{msg}") from None

    nodes: list[AnnNode] = []
    alias: dict[str, str] = {}  # fx node name -> AnnNode name it stands for
    sizes: set[str] = set()  # fx nodes that are x.size(0) / x.shape[0]
    output: str | None = None

    def src(arg: Any, node: fx.Node) -> str:
        if not isinstance(arg, fx.Node) or arg.name not in alias:
            raise GraphError(f"node '{node.name}' takes an input that is not a captured tensor")
        return alias[arg.name]

    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        shape = _shape_of(node)
        if node.op == "placeholder":
            if any(isinstance(n.op, InputOp) for n in nodes):
                raise GraphError(f"node '{node.name}': the model takes more than one input")
            nodes.append(AnnNode(node.name, InputOp(), (), tuple(input_shape), "input"))
            alias[node.name] = node.name
            continue
        if node.op == "output":
            out = node.args[0]
            if not isinstance(out, fx.Node):
                raise GraphError("the model must return a single tensor (the readout)")
            output = src(out, node)
            continue
        if node.op == "get_attr":
            raise _refuse(node, f"attribute '{node.target}'", "reads a tensor attribute")
        if node.op == "call_module":
            m = modules[str(node.target)]
            in_node = node.args[0] if node.args else None
            in_shape = _shape_of(in_node) if isinstance(in_node, fx.Node) else None
            if shape is None:
                raise _refuse(node, f"{type(m).__name__} '{node.target}'", "returns no tensor")
            op = _module_op(node, m, in_shape or (), shape)
            if len(node.args) != 1 or node.kwargs:
                raise _refuse(node, f"{type(m).__name__} '{node.target}'",
                              "is called with more than one argument")
            if op is None:
                alias[node.name] = src(node.args[0], node)
                continue
            name = _readable_name(node, op)
            nodes.append(AnnNode(name, op, (src(node.args[0], node),), shape, str(node.target)))
            alias[node.name] = name
            continue
        if node.op == "call_function":
            _capture_function(node, shape, nodes, alias, sizes, src)
            continue
        if node.op == "call_method":
            _capture_method(node, shape, nodes, alias, sizes, src)
            continue
        raise _refuse(node, node.op)
    if output is None:
        raise GraphError("the model returns nothing")
    graph = AnnGraph(tuple(nodes), output)
    _check_readout(graph)
    return graph


def _capture_function(node: fx.Node, shape: tuple[int, ...] | None, nodes: list[AnnNode],
                      alias: dict[str, str], sizes: set[str], src: Any) -> None:
    fn = node.target
    fname = getattr(fn, "__name__", str(fn))
    if fn in (operator.add, torch.add, operator.iadd):
        tensors = [a for a in node.args if isinstance(a, fx.Node)]
        if len(tensors) != 2 or len(node.args) != 2 or node.kwargs:
            raise _refuse(node, f"function {fname}", "adds something other than two tensors")
        nodes.append(AnnNode(node.name, AddOp(), (src(tensors[0], node), src(tensors[1], node)),
                             shape or (), "+"))
        alias[node.name] = node.name
        return
    if fn is torch.flatten:
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        if start != 1 or end != -1:
            raise _refuse(node, "function flatten", f"flattens dims {start}..{end} (only 1..-1)")
        nodes.append(AnnNode(node.name, FlattenOp(), (src(node.args[0], node),), shape or (),
                             "torch.flatten"))
        alias[node.name] = node.name
        return
    if fn is operator.getitem and node.args and isinstance(node.args[0], fx.Node) \
            and node.args[0].name in sizes:
        sizes.add(node.name)
        return
    if fn is getattr and len(node.args) == 2 and node.args[1] == "shape":
        sizes.add(node.name)
        return
    raise _refuse(node, f"function {fname}")


def _capture_method(node: fx.Node, shape: tuple[int, ...] | None, nodes: list[AnnNode],
                    alias: dict[str, str], sizes: set[str], src: Any) -> None:
    method = str(node.target)
    if method == "size":
        sizes.add(node.name)
        return
    if method in ("view", "reshape", "flatten"):
        if method == "flatten":
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            ok = start == 1 and len(node.args) <= 2
        else:
            dims = node.args[1:]
            ok = (len(dims) == 2 and isinstance(dims[0], fx.Node) and dims[0].name in sizes
                  and dims[1] == -1)
        if not ok or shape is None or len(shape) != 1:
            raise _refuse(node, f"method {method}", "reshapes other than x.view(x.size(0), -1)")
        nodes.append(AnnNode(node.name, FlattenOp(), (src(node.args[0], node),), shape,
                             f".{method}"))
        alias[node.name] = node.name
        return
    raise _refuse(node, f"method {method}")


def _check_readout(graph: AnnGraph) -> None:
    node = graph.node(graph.output)
    while isinstance(node.op, DropoutOp):
        node = graph.node(node.inputs[0])
    if not isinstance(node.op, LinearOp):
        raise GraphError(f"the model must end in a Linear readout without activation; its "
                         f"output comes from node '{node.name}' ({type(node.op).__name__})")


