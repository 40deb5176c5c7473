"""The two NIR flavours, what each promises, and the portable threshold rule.

* ``native``: int64 arrays, per-channel thresholds, ``v_threshold`` = ``v_th``;
  exact for a reader that applies the metadata.
* ``portable``: for readers that ignore metadata (``v`` starts at 0, ``v += I``,
  spike when ``v > v_threshold``, hard reset to 0). One threshold per layer,
  :func:`portable_threshold` folds the initial membrane and the comparison into
  it; float32 arrays (float64 when a value is not exact in float32).

The strings here (format name, exactness notes, schedule hint) are stored in
every file's metadata: they are the file format and must stay byte-identical.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from csqcfs_deploy.errors import UsageError
from csqcfs_deploy.ir import IFGraph, IFLayer
from csqcfs_deploy.ir.neuron import exact_float_bound
from csqcfs_deploy.ir.profiles import Profile

NIR_FORMAT = "csqcfs-deploy-nir"
NIR_FORMAT_VERSION = 1
FLAVORS: tuple[str, ...] = ("native", "portable")
FOREIGN_PROFILE = "int16"

NATIVE_EXACTNESS = ("exact at every T, P and schedule for a reader that applies this file's "
                    "metadata (soft reset, initial membrane, comparison, profile arithmetic)")
PORTABLE_EXACTNESS = ("exact only at T = 1 without pre-simulation (P = 0), as long as no "
                      "current wraps or voltage saturates: v starts at 0, the initial membrane "
                      "and the comparison are folded into v_threshold, hard reset; from step 2 "
                      "on a reader that ignores the metadata differs")
SCHEDULE_HINT = ("synchronous: every projection delivers its source's spikes of the same step; "
                 "pipelined (Lava/Loihi): projection delay = depth(dst) - depth(src) steps, "
                 "see node metadata pipelined_delay")


def exactness(flavor: str) -> str:
    """The exactness note stored in a ``flavor`` file's graph metadata."""
    return NATIVE_EXACTNESS if flavor == "native" else PORTABLE_EXACTNESS


def check_flavor(flavor: str) -> None:
    """UsageError unless ``flavor`` is one of :data:`FLAVORS`."""
    if flavor not in FLAVORS:
        raise UsageError(f"unknown NIR flavour {flavor!r} (known: {', '.join(FLAVORS)})")


def check_portable(graph: IFGraph) -> None:
    """The portable flavour needs one threshold and one initial membrane per layer."""
    for la in graph.if_layers:
        if np.any(la.v_th != la.v_th[0]) or np.any(la.v_init != la.v_init[0]):
            raise UsageError(
                f"layer {la.name} has per-channel thresholds ({int(la.v_th.min())}.."
                f"{int(la.v_th.max())}); the portable NIR flavour needs one threshold per layer: "
                "convert the checkpoint with --per-layer-thresholds (or use --flavor native)")
    for p in graph.projections:
        if p.pool is not None and p.pool.padding != (0, 0):
            raise UsageError(f"projection {p.name} has a padded sum pool; Norse and nirtorch "
                             "ignore SumPool2d padding, so the portable flavour refuses it (use "
                             "--flavor native)")
        if p.weight_exp != 0:
            raise UsageError(f"projection {p.name} has weight exponent {p.weight_exp}, which NIR "
                             "cannot express; use --flavor native")


def portable_half(profile: Profile) -> float:
    """``+1/2`` for a profile firing on ``v > v_th``, ``-1/2`` for one firing on ``v >= v_th``."""
    return 0.5 if profile.strict else -0.5


def portable_threshold_of(v_th: npt.NDArray[Any], v_init: npt.NDArray[Any], profile: Profile
                          ) -> npt.NDArray[Any]:
    """Per channel (C,) float64: the NIR threshold with which ``v > th`` from ``v = 0``
    fires as step 1 of the IF graph.

    Step 1 fires when ``v_init + I (>|>=) v_th`` for an integer input ``I``, that is
    ``I > v_th - v_init`` (strict) or ``I > v_th - v_init - 1``. Half an integer
    above that bound, ``th = v_th - v_init +- 1/2`` gives the same spikes to a reader
    comparing with ``>=`` (spikingjelly, sinabs) as to one comparing with ``>`` (NIR,
    Norse, snntorch). The writer stores it; the reader checks a portable file by it.
    """
    threshold: npt.NDArray[np.float64] = (v_th - v_init).astype(np.float64) + portable_half(
        profile)
    return threshold


def portable_threshold(layer: IFLayer, profile: Profile) -> npt.NDArray[Any]:
    """:func:`portable_threshold_of` for one IF layer's ``v_th`` and ``v_init``."""
    return portable_threshold_of(layer.v_th, layer.v_init, profile)


@dataclass(frozen=True)
class ValueCast:
    """Stores a flavour's parameter arrays: int64 (native) or float (portable)."""

    dtype: np.dtype[Any]

    def __call__(self, values: npt.NDArray[Any]) -> npt.NDArray[Any]:
        return np.ascontiguousarray(values, dtype=self.dtype)


def value_cast(flavor: str, integers: list[npt.NDArray[Any]], halves: list[npt.NDArray[Any]]
               ) -> ValueCast:
    """int64 (native); float32 when every integer and half-integer is exact in it, else
    float64 (portable).

    A half-integer ``x`` is exact in float32 when ``2 x`` is an exactly representable
    integer, so the test is ``max(|integers|, 2 |halves|) <= exact_float_bound(float32)``.
    """
    if flavor == "native":
        return ValueCast(np.dtype(np.int64))
    biggest = max([float(np.abs(a).max(initial=0)) for a in integers]
                  + [2 * float(np.abs(a).max(initial=0)) for a in halves], default=0.0)
    exact = biggest <= exact_float_bound(torch.float32)
    return ValueCast(np.dtype(np.float32 if exact else np.float64))
