"""The three NIR flavours, what each promises, the portable threshold rule, and the
choice of flavour (default ``portable``, falling back to ``native``).

* ``portable`` (default): for readers that ignore metadata (``v`` starts at 0,
  ``v += I``, spike when ``v > v_threshold``, hard reset to 0). Per-channel
  thresholds (``v_threshold`` is a per-neuron array: norse and sinabs read it);
  :func:`portable_threshold` folds the initial membrane and the comparison into
  it; float32 arrays (float64 when a value is not exact in float32).
* ``portable-uniform``: ``portable`` with one threshold per layer (a graph
  quantized with ``--per-layer-thresholds``), for snnTorch and spikingjelly,
  which assert a uniform threshold.
* ``native``: int64 arrays, per-channel thresholds, ``v_threshold`` = ``v_th``;
  exact for a reader that applies the metadata. Plain readers must not read it
  silently wrong, so in the *file* its IF nodes are stored with the NIR type
  :data:`NATIVE_IF_TYPE` (not a NIR type): ``nir.read`` (which norse, snnTorch,
  spikingjelly and sinabs call) refuses the file, and our reader maps the type back
  (:func:`restore_native_types`). In memory, ``graph_to_nir(g, "native")`` still
  holds ``nir.IF`` nodes.

The strings here (format name, exactness notes, schedule hint, the native type) are
stored in every file: they are the file format and must stay byte-identical.
Format version 2 (this writer) added ``portable-uniform``, per-channel ``portable``
and the native type; version-1 files (``native`` with ``nir.IF`` nodes, uniform
``portable``) are still read.
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
NIR_FORMAT_VERSION = 2
#: Format versions our reader accepts (1: before native files hid their IF type).
READABLE_FORMAT_VERSIONS: tuple[int, ...] = (1, 2)
DEFAULT_FLAVOR = "portable"
FLAVORS: tuple[str, ...] = ("portable", "portable-uniform", "native")
PORTABLE_FLAVORS: tuple[str, ...] = ("portable", "portable-uniform")
FOREIGN_PROFILE = "int16"
#: The stored NIR "type" of a native file's IF nodes: not a NIR type, so plain readers refuse.
NATIVE_IF_TYPE = "CsqcfsIF"

NATIVE_EXACTNESS = ("exact at every T, P and schedule for a reader that applies this file's "
                    "metadata (soft reset, initial membrane, comparison, profile arithmetic); "
                    f"its IF nodes are stored as type {NATIVE_IF_TYPE}, so plain NIR readers "
                    "(nir.read) refuse the file")
PORTABLE_EXACTNESS = ("exact only at T = 1 without pre-simulation (P = 0), as long as no "
                      "current wraps or voltage saturates: v starts at 0, the initial membrane "
                      "and the comparison are folded into v_threshold (per channel), hard "
                      "reset; from step 2 on a reader that ignores the metadata differs")
PORTABLE_UNIFORM_EXACTNESS = PORTABLE_EXACTNESS.replace("(per channel)",
                                                        "(one value per layer)")
EXACTNESS: dict[str, str] = {"native": NATIVE_EXACTNESS, "portable": PORTABLE_EXACTNESS,
                             "portable-uniform": PORTABLE_UNIFORM_EXACTNESS}
SCHEDULE_HINT = ("synchronous: every projection delivers its source's spikes of the same step; "
                 "pipelined (Lava/Loihi): projection delay = depth(dst) - depth(src) steps, "
                 "see node metadata pipelined_delay")


def exactness(flavor: str) -> str:
    """The exactness note stored in a ``flavor`` file's graph metadata."""
    return EXACTNESS[flavor]


def check_flavor(flavor: str) -> None:
    """UsageError unless ``flavor`` is one of :data:`FLAVORS`."""
    if flavor not in FLAVORS:
        raise UsageError(f"unknown NIR flavour {flavor!r} (known: {', '.join(FLAVORS)})")


def portable_obstacle(graph: IFGraph, flavor: str, profile: Profile) -> str | None:
    """Why ``graph`` cannot be written in the portable ``flavor`` (naming the layer or
    projection), or None when it can."""
    for p in graph.projections:
        if p.pool is not None and p.pool.padding != (0, 0):
            return (f"projection {p.name} has a padded sum pool, which Norse and nirtorch "
                    "ignore")
        if p.weight_exp != 0:
            return f"projection {p.name} has weight exponent {p.weight_exp}, which NIR " \
                   "cannot express"
    if flavor == "portable-uniform":
        for la in graph.if_layers:
            th = portable_threshold(la, profile)
            if np.any(th != th[0]):
                return (f"layer {la.name} has per-channel thresholds ({int(la.v_th.min())}.."
                        f"{int(la.v_th.max())}); portable-uniform needs one threshold per "
                        "layer: convert the checkpoint with --per-layer-thresholds")
    return None


def check_portable(graph: IFGraph, flavor: str, profile: Profile) -> None:
    """UsageError naming the layer or projection that the portable ``flavor`` cannot say."""
    reason = portable_obstacle(graph, flavor, profile)
    if reason is not None:
        raise UsageError(f"the {flavor} NIR flavour cannot express this graph: {reason} "
                         "(use --flavor native)")


@dataclass(frozen=True)
class FlavorChoice:
    """The flavour written, and why the default fell back to ``native`` ("" if it did not)."""

    flavor: str
    fallback: str = ""


def choose_flavor(graph: IFGraph, requested: str | None, profile: Profile) -> FlavorChoice:
    """``requested`` as given (checked), or the default: ``portable`` where the graph can be
    said portably, else ``native`` with the reason."""
    if requested is not None:
        check_flavor(requested)
        if requested in PORTABLE_FLAVORS:
            check_portable(graph, requested, profile)
        return FlavorChoice(requested)
    reason = portable_obstacle(graph, DEFAULT_FLAVOR, profile)
    if reason is None:
        return FlavorChoice(DEFAULT_FLAVOR)
    return FlavorChoice("native", reason)


def restore_native_types(record: dict[str, Any]) -> dict[str, Any]:
    """A file's raw ``node`` record with our native IF type mapped back to ``"IF"``.

    Only in a graph whose metadata names :data:`NIR_FORMAT` (a foreign file with that
    type string keeps it and is refused as an unsupported node type). Works in place.
    """
    md = record.get("metadata")
    nodes = record.get("nodes")
    if not (isinstance(md, dict) and md.get("format") == NIR_FORMAT and isinstance(nodes, dict)):
        return record
    for node in nodes.values():
        if isinstance(node, dict) and node.get("type") == NATIVE_IF_TYPE:
            node["type"] = "IF"
    return record


def hide_native_types(record: dict[str, Any]) -> dict[str, Any]:
    """``NIRGraph.to_dict()`` of a native graph with its IF nodes typed :data:`NATIVE_IF_TYPE`
    (what is stored in the file; other flavours unchanged). Works in place."""
    md = record.get("metadata")
    if not (isinstance(md, dict) and md.get("format") == NIR_FORMAT
            and md.get("flavor") == "native"):
        return record
    for node in record["nodes"].values():
        if node.get("type") == "IF":
            node["type"] = NATIVE_IF_TYPE
    return record


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
    float64 (portable flavours).

    A half-integer ``x`` is exact in float32 when ``2 x`` is an exactly representable
    integer, so the test is ``max(|integers|, 2 |halves|) <= exact_float_bound(float32)``.
    """
    if flavor == "native":
        return ValueCast(np.dtype(np.int64))
    biggest = max([float(np.abs(a).max(initial=0)) for a in integers]
                  + [2 * float(np.abs(a).max(initial=0)) for a in halves], default=0.0)
    exact = biggest <= exact_float_bound(torch.float32)
    return ValueCast(np.dtype(np.float32 if exact else np.float64))
