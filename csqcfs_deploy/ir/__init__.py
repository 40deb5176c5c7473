"""The intermediate representations and their semantics.

* :mod:`.ann`: the captured ANN graph (what ``convert.capture`` produces);
* :mod:`.nodes`, :mod:`.graph`: the IF graph's layers and the graph;
* :mod:`.kinds`: the synapse kinds (conv, dense, identity: ANN op, IF projection and
  every kind-generic operation on them) and the per-consumer :class:`~.kinds.KindTable`;
* :mod:`.ifg`: its file format; :mod:`.encoding`: the input encoding;
* :mod:`.profiles`: the integer arithmetic of each hardware profile;
* :mod:`.synapses`: the synaptic arithmetic the back ends call (from :mod:`.kinds`);
* :mod:`.schedule` and :mod:`.neuron`: the run timing and the one specification of
  the neuron rule.

This package never imports a back end (``simulators``) or a file writer (``exporters``).
"""

from csqcfs_deploy.ir.encoding import InputEncoding
from csqcfs_deploy.ir.graph import IFGraph
from csqcfs_deploy.ir.ifg import graph_from_bytes, graph_to_bytes, load_graph, save_graph
from csqcfs_deploy.ir.kinds import (
    ConvProjection,
    DenseProjection,
    IdentityProjection,
    ProjectionT,
)
from csqcfs_deploy.ir.nodes import (
    NODE_TYPES,
    GraphMeta,
    IFLayer,
    InputLayer,
    Layer,
    Node,
    Projection,
    ReadoutLayer,
    SumPool,
)

__all__ = [
    "NODE_TYPES",
    "graph_from_bytes",
    "graph_to_bytes",
    "ConvProjection",
    "DenseProjection",
    "GraphMeta",
    "IFGraph",
    "IFLayer",
    "IdentityProjection",
    "InputEncoding",
    "InputLayer",
    "Layer",
    "Node",
    "Projection",
    "ProjectionT",
    "ReadoutLayer",
    "SumPool",
    "load_graph",
    "save_graph",
]
