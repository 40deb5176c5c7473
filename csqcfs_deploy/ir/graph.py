"""The IF graph: layers and projections, validated on construction (SPEC section 3)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from csqcfs_deploy.errors import GraphError
from csqcfs_deploy.ir.fields import MAX_GRAPH_NEURONS, check_neurons
from csqcfs_deploy.ir.kinds import PROJECTION_KINDS, ProjectionT
from csqcfs_deploy.ir.nodes import (
    GraphMeta,
    IFLayer,
    InputLayer,
    Layer,
    Node,
    ReadoutLayer,
    set_field,
)
from csqcfs_deploy.ir.profiles import PROFILES

#: Most layers plus projections in one graph.
MAX_NODES = 4096
LAYER_KINDS = (InputLayer, IFLayer, ReadoutLayer)

# --------------------------------------------------------------------------- graph


@dataclass(frozen=True, eq=False)
class IFGraph(Node):
    """Layers and projections; validated on construction (shapes, DAG, one input/readout)."""

    layers: tuple[Layer, ...]
    projections: tuple[ProjectionT, ...]
    meta: GraphMeta
    _by_name: dict[str, Layer | ProjectionT] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._check_node_types()
        by_name: dict[str, Layer | ProjectionT] = {}
        for node in (*self.layers, *self.projections):
            if node.name in by_name:
                raise GraphError(f"duplicate node name {node.name!r}")
            by_name[node.name] = node
        set_field(self, "_by_name", by_name)
        layer_of = {la.name: la for la in self.layers}
        inputs = [la for la in self.layers if isinstance(la, InputLayer)]
        readouts = [la for la in self.layers if isinstance(la, ReadoutLayer)]
        if len(inputs) != 1:
            raise GraphError(f"graph needs exactly one input layer, has {len(inputs)}")
        if len(readouts) != 1:
            raise GraphError(f"graph needs exactly one readout layer, has {len(readouts)}")
        for p in self.projections:
            for end in (p.src, p.dst):
                if end not in layer_of:
                    raise GraphError(f"projection {p.name}: unknown layer {end!r}")
            if isinstance(layer_of[p.dst], InputLayer):
                raise GraphError(f"projection {p.name} targets the input layer")
            if isinstance(layer_of[p.src], ReadoutLayer):
                raise GraphError(f"projection {p.name} starts at the readout (it does not spike)")
            out = p.out_shape(layer_of[p.src].shape)
            if out != layer_of[p.dst].shape:
                raise GraphError(f"projection {p.name}: produces shape {out} but layer "
                                 f"{p.dst} has shape {layer_of[p.dst].shape}")
        for la in self.layers:
            if not isinstance(la, InputLayer) and not self.incoming(la.name):
                raise GraphError(f"layer {la.name} has no incoming projection")
        self.topological_order()  # raises on a cycle
        self._check_weight_exps()

    def _check_node_types(self) -> None:
        """Layers, projections and meta of the right classes, within :data:`MAX_NODES`."""
        for f in ("layers", "projections"):
            value = getattr(self, f)
            if not isinstance(value, (tuple, list)):
                raise GraphError(f"graph {f} must be a sequence, got {type(value).__name__}")
            set_field(self, f, tuple(value))
        if len(self.layers) + len(self.projections) > MAX_NODES:
            raise GraphError(f"graph has {len(self.layers) + len(self.projections)} nodes, "
                             f"more than the limit of {MAX_NODES}")
        for la in self.layers:
            if not isinstance(la, LAYER_KINDS):
                raise GraphError(f"graph layers: {type(la).__name__} is not a layer")
        for p in self.projections:
            if not isinstance(p, PROJECTION_KINDS):
                raise GraphError(f"graph projections: {type(p).__name__} is not a projection")
        if not isinstance(self.meta, GraphMeta):
            raise GraphError(f"graph meta: {type(self.meta).__name__} is not a GraphMeta")
        check_neurons(sum(math.prod(la.shape) for la in self.layers), "graph",
                      MAX_GRAPH_NEURONS)

    def _check_weight_exps(self) -> None:
        """Every weight exponent within the profile's range (an integer graph)."""
        if self.meta.profile is None:
            return
        prof = PROFILES[self.meta.profile]
        for p in self.projections:
            if not prof.weight_exp_min <= p.weight_exp <= prof.weight_exp_max:
                raise GraphError(f"projection {p.name}: weight_exp {p.weight_exp} outside "
                                 f"profile {prof.name}'s range {prof.weight_exp_min}.."
                                 f"{prof.weight_exp_max}")

    # ---- lookup ----------------------------------------------------------
    def node(self, name: str) -> Layer | ProjectionT:
        """The layer or projection named ``name`` (GraphError if there is none)."""
        try:
            return self._by_name[name]
        except KeyError:
            raise GraphError(f"no node named {name!r}") from None

    def layer(self, name: str) -> Layer:
        """The layer named ``name`` (GraphError if there is none, or it is a projection)."""
        node = self.node(name)
        if not isinstance(node, (InputLayer, IFLayer, ReadoutLayer)):
            raise GraphError(f"node {name!r} is not a layer")
        return node

    def neuron_group(self, name: str) -> IFLayer | ReadoutLayer:
        """The IF layer or readout named ``name`` (GraphError for the input or a projection)."""
        node = self.node(name)
        if not isinstance(node, (IFLayer, ReadoutLayer)):
            raise GraphError(f"node {name!r} is not an IF layer or the readout")
        return node

    def projection(self, name: str) -> ProjectionT:
        """The projection named ``name`` (GraphError if there is none, or it is a layer)."""
        node = self.node(name)
        if not isinstance(node, PROJECTION_KINDS):
            raise GraphError(f"node {name!r} is not a projection")
        return node

    @property
    def input(self) -> InputLayer:
        return next(la for la in self.layers if isinstance(la, InputLayer))

    @property
    def readout(self) -> ReadoutLayer:
        return next(la for la in self.layers if isinstance(la, ReadoutLayer))

    @property
    def if_layers(self) -> tuple[IFLayer, ...]:
        order = self.topological_order()
        return tuple(la for n in order if isinstance(la := self.node(n), IFLayer))

    @property
    def is_integer(self) -> bool:
        return self.meta.profile is not None

    def incoming(self, layer: str) -> tuple[ProjectionT, ...]:
        return tuple(p for p in self.projections if p.dst == layer)

    def outgoing(self, layer: str) -> tuple[ProjectionT, ...]:
        return tuple(p for p in self.projections if p.src == layer)

    def topological_order(self) -> tuple[str, ...]:
        """Layer names, every layer after all of its sources (input first)."""
        indeg = {la.name: 0 for la in self.layers}
        for p in self.projections:
            indeg[p.dst] += 1
        ready = [la.name for la in self.layers if indeg[la.name] == 0]
        order: list[str] = []
        while ready:
            name = ready.pop(0)
            order.append(name)
            for p in self.outgoing(name):
                indeg[p.dst] -= 1
                if indeg[p.dst] == 0:
                    ready.append(p.dst)
        if len(order) != len(self.layers):
            stuck = sorted(n for n, d in indeg.items() if d > 0)
            raise GraphError(f"graph has a cycle through {', '.join(stuck)}")
        return tuple(order)

    def depths(self) -> dict[str, int]:
        """Longest number of synaptic hops from the input to each layer."""
        depth: dict[str, int] = {}
        for name in self.topological_order():
            inc = self.incoming(name)
            depth[name] = 0 if not inc else 1 + max(depth[p.src] for p in inc)
        return depth

    def replace(self, **changes: Any) -> IFGraph:
        kwargs: dict[str, Any] = {"layers": self.layers, "projections": self.projections,
                                  "meta": self.meta}
        kwargs.update(changes)
        return IFGraph(**kwargs)

    def equals(self, other: object) -> bool:
        if not isinstance(other, IFGraph):
            return False
        if len(self.layers) != len(other.layers) or len(self.projections) != len(
            other.projections
        ):
            return False
        pairs: Iterator[tuple[Node, Node]] = zip(
            (*self.layers, *self.projections, self.meta),
            (*other.layers, *other.projections, other.meta),
            strict=True,
        )
        return all(a.equals(b) for a, b in pairs)
