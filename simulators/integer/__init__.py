"""The bit-accurate integer simulator: the golden reference (SPEC section 4).

Modules, in the order a run uses them:

* :mod:`.arithmetic`: the per-layer exactness proof (:class:`LayerArithmetic`,
  :func:`sum_dtype_for`), built from the bounds of :mod:`csqcfs_deploy.ir.neuron`;
* :mod:`.synapses`: weight layouts and the float and int8 kernels of each
  projection kind (a :class:`~csqcfs_deploy.ir.kinds.KindTable`);
* :mod:`.scan`: the IF and readout scans over all steps of one layer, timed by
  :class:`~csqcfs_deploy.ir.neuron.LayerEvents`;
* :mod:`.fast`: the scan's in-place form of :func:`csqcfs_deploy.ir.neuron.if_step`
  (a deliberate copy, checked against it);
* :mod:`.simulator`: :class:`Simulator` and :func:`simulate`;
* :mod:`.reference`: :func:`reference_simulate`, the plain independent check;
* :mod:`.backend`: the ``--backend int`` runner.
"""

from csqcfs_deploy.simulators.integer.arithmetic import (
    LayerArithmetic,
    float32_kernels_exact,
    shifted_total,
    sum_dtype_for,
)
from csqcfs_deploy.simulators.integer.fast import IFConstants, if_fire_final, if_fire_reset_
from csqcfs_deploy.simulators.integer.reference import reference_simulate
from csqcfs_deploy.simulators.integer.simulator import Simulator, simulate
from csqcfs_deploy.simulators.integer.synapses import KERNELS, SynapseKernel

__all__ = [
    "KERNELS",
    "IFConstants",
    "LayerArithmetic",
    "Simulator",
    "SynapseKernel",
    "float32_kernels_exact",
    "if_fire_final",
    "if_fire_reset_",
    "reference_simulate",
    "shifted_total",
    "simulate",
    "sum_dtype_for",
]
