"""The Norse back end: an integer IF graph as a Norse (PyTorch) module, spike for spike.

:func:`to_norse` turns an integer :class:`~csqcfs_deploy.ir.graph.IFGraph` into a
:class:`NorseIFNetwork`, a ``torch.nn.Module`` made of Norse parts that runs the
**synchronous** schedule (SPEC sections 4 and 6, timing in
:mod:`csqcfs_deploy.ir.schedule` and :class:`csqcfs_deploy.ir.neuron.LayerEvents`)
and reproduces the integer simulator (:func:`csqcfs_deploy.simulators.integer.simulate`)
exactly: every spike of every layer at every step.

Layout, after Norse's own ``functional/`` vs ``module/`` split:

* :mod:`.bounds`: why the float arithmetic is exact, per layer
  (:class:`LayerBound`, :func:`layer_bounds`, :func:`check_exact`,
  :func:`exact_dtype`), from the bounds of :mod:`csqcfs_deploy.ir.neuron`;
* :mod:`.functional`: the pure step functions :func:`if_feed_forward_step` and
  :func:`readout_feed_forward_step`, a *deliberate independent copy* of
  :func:`csqcfs_deploy.ir.neuron.if_step` in Norse's terms (Norse's ``threshold``
  for the spike, ``reset_subtract`` / ``reset_value`` for the reset), so that
  Norse's parts are what gets verified;
* :mod:`.synapses`: one ``nn.Sequential`` per projection (:class:`SumPool2d`,
  ``nn.Conv2d`` / ``nn.Linear`` / :class:`ChannelScale`, :class:`IntegerRound`,
  :class:`WeightExponent`), per kind through a ``KindTable("norse")``;
* :mod:`.cells`: the Norse ``SNNCell`` modules :class:`IFNeuronCell` and
  :class:`ReadoutCell`;
* :mod:`.network`: :class:`NorseIFNetwork`, the stateful container (Norse's
  ``SequentialState`` conventions for a DAG), and :func:`to_norse`;
* :mod:`.runner`: ``--backend norse`` (:class:`NorseRunner`, :func:`open_runner`).
"""

from csqcfs_deploy.simulators.norse import norse_import  # noqa: F401  (first: quietly)
from csqcfs_deploy.simulators.norse.bounds import (
    FLOAT_DTYPES,
    LayerBound,
    check_exact,
    dtype_name,
    exact_dtype,
    layer_bounds,
    projection_bound,
)
from csqcfs_deploy.simulators.norse.cells import IFNeuronCell, ReadoutCell
from csqcfs_deploy.simulators.norse.functional import (
    THRESHOLD_METHODS,
    IFNeuronParameters,
    IFNeuronState,
    ReadoutParameters,
    ReadoutState,
    if_feed_forward_step,
    readout_feed_forward_step,
    saturating_add,
    synaptic_current,
)
from csqcfs_deploy.simulators.norse.network import (
    NetworkState,
    NorseIFNetwork,
    ieee_float32,
    module_events,
    to_norse,
)
from csqcfs_deploy.simulators.norse.runner import NorseRunner, open_runner, resolve_device
from csqcfs_deploy.simulators.norse.synapses import (
    SYNAPSES,
    ChannelScale,
    IntegerRound,
    SumPool2d,
    WeightExponent,
    synapse_module,
)

__all__ = [
    "FLOAT_DTYPES",
    "SYNAPSES",
    "THRESHOLD_METHODS",
    "ChannelScale",
    "IFNeuronCell",
    "IFNeuronParameters",
    "IFNeuronState",
    "IntegerRound",
    "LayerBound",
    "NetworkState",
    "NorseIFNetwork",
    "NorseRunner",
    "ReadoutCell",
    "ReadoutParameters",
    "ReadoutState",
    "SumPool2d",
    "WeightExponent",
    "check_exact",
    "dtype_name",
    "exact_dtype",
    "ieee_float32",
    "if_feed_forward_step",
    "layer_bounds",
    "module_events",
    "open_runner",
    "projection_bound",
    "readout_feed_forward_step",
    "resolve_device",
    "saturating_add",
    "synapse_module",
    "synaptic_current",
    "to_norse",
]
