"""The synaptic arithmetic of the IF graph's projections, in torch, for the back ends.

``apply_projection(p, x)`` computes ``W (*) pool(x)`` for a batch ``x`` of source
values (N, *src_shape): spikes, spike counts or input integers, without
``weight_exp``; :func:`apply_weight_exp` applies it, exactly as Lava's Dense model
(left shift, or arithmetic right shift = floor division). :func:`max_abs_output`
bounds ``|W (*) pool(x)|``; :func:`sum_pool` is the sum-pool prefix alone.

These are the kind-generic operations of :mod:`csqcfs_deploy.ir.kinds.generic` (each
defined there once, dispatching to the kind modules), gathered under the name the
back ends import them by.
"""

from csqcfs_deploy.ir.kinds.generic import (
    apply_projection,
    apply_weight_exp,
    fanout,
    input_synapses,
    max_abs_output,
    projection_weight,
    sum_pool,
)

__all__ = [
    "apply_projection",
    "apply_weight_exp",
    "fanout",
    "input_synapses",
    "max_abs_output",
    "projection_weight",
    "sum_pool",
]
