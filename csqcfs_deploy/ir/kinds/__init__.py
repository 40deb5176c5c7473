"""Projection kinds: one module per kind, the generic operations declared once.

* :mod:`.table`: :class:`KindTable`, the per-consumer handler table of the back ends
  and file formats, and :func:`kind_name` (``ConvProjection`` -> ``conv``);
* :mod:`.generic`: every operation on a synapse group, ANN op or IF projection
  (apply, fan-out, MACs, bounds, input and output scaling, op -> projection), each
  either written once for all kinds or a ``singledispatch`` declaration whose
  default is a :class:`~csqcfs_deploy.errors.TargetError`;
* :mod:`.conv`, :mod:`.dense`, :mod:`.identity`: each kind's ANN op (``ConvOp`` ...),
  its IF projection node (``ConvProjection`` ..., registered in
  :data:`~csqcfs_deploy.ir.nodes.NODE_TYPES` under its class name, the ``.ifg`` type
  tag) and its implementation of every per-kind operation.

A new kind is a new module here, imported below and added to the unions.
"""

from __future__ import annotations

from csqcfs_deploy.errors import TargetError
from csqcfs_deploy.ir.kinds.conv import ConvOp, ConvProjection
from csqcfs_deploy.ir.kinds.dense import DenseProjection, LinearOp
from csqcfs_deploy.ir.kinds.generic import (
    BiasedOp,
    FloatArray,
    WeightedOp,
    Wiring,
    apply_projection,
    apply_weight_exp,
    apply_weights,
    fanout,
    input_synapses,
    max_abs_output,
    op_forward,
    op_to_projection,
    per_channel_view,
    projection_macs,
    projection_weight,
    scale_op_inputs,
    scale_op_outputs,
    sum_pool,
)
from csqcfs_deploy.ir.kinds.identity import IdentityOp, IdentityProjection
from csqcfs_deploy.ir.kinds.table import KindTable, kind_name

#: Every projection kind (the IF graph's synapse groups).
ProjectionT = ConvProjection | DenseProjection | IdentityProjection
PROJECTION_KINDS = (ConvProjection, DenseProjection, IdentityProjection)

#: Every weighted ANN op (the captured graph's synapses).
WeightedOpT = ConvOp | LinearOp | IdentityOp
WEIGHTED_OPS = (ConvOp, LinearOp, IdentityOp)


def to_projection(op: WeightedOp, wiring: Wiring) -> ProjectionT:
    """The IF projection of a folded ANN op (:func:`op_to_projection`, one of the kinds)."""
    p = op_to_projection(op, wiring)
    if not isinstance(p, PROJECTION_KINDS):
        raise TargetError(f"projection {wiring.name}: kind {kind_name(p)} is not one of the "
                          "IF graph's projection kinds")
    return p


__all__ = [
    "PROJECTION_KINDS",
    "WEIGHTED_OPS",
    "BiasedOp",
    "ConvOp",
    "ConvProjection",
    "DenseProjection",
    "FloatArray",
    "IdentityOp",
    "IdentityProjection",
    "KindTable",
    "LinearOp",
    "ProjectionT",
    "WeightedOp",
    "WeightedOpT",
    "Wiring",
    "apply_projection",
    "apply_weight_exp",
    "apply_weights",
    "fanout",
    "input_synapses",
    "kind_name",
    "max_abs_output",
    "op_forward",
    "op_to_projection",
    "per_channel_view",
    "projection_macs",
    "projection_weight",
    "scale_op_inputs",
    "scale_op_outputs",
    "sum_pool",
    "to_projection",
]
