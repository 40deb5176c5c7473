"""Folding: a captured ANN becomes the float IF graph (SPEC section 3).

:func:`fold` runs the pipeline: :func:`~csqcfs_deploy.convert.capture.capture` the
model, rewrite it with the fold passes (:mod:`.passes`: :data:`FOLD_PASSES` in
order, through :func:`run_passes`), then group it into neuron groups and
projections (:mod:`.group`: :func:`build_float_graph`): an
:class:`~csqcfs_deploy.ir.graph.IFGraph` with ``v_th = 1`` and ``v_init = phi``
that, evaluated in ANN mode, reproduces the network.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from csqcfs_deploy.convert.capture import capture
from csqcfs_deploy.convert.group import build_float_graph
from csqcfs_deploy.convert.passes import (
    FOLD_PASSES,
    AbsorbAvgPool,
    ExplicitShortcuts,
    FoldLog,
    FoldPass,
    MergeBatchNorm,
    RejectBadThreshold,
    RejectNonFinite,
    RemoveDropout,
    ScaleThresholds,
    run_passes,
)
from csqcfs_deploy.ir import IFGraph, InputEncoding
from csqcfs_deploy.ir.ann import AnnGraph


@dataclass(frozen=True)
class FoldResult:
    """The captured ANN, the folded ANN, the float IF graph and the passes' log."""

    ann: AnnGraph
    folded: AnnGraph
    graph: IFGraph
    log: FoldLog


def fold(model: nn.Module, input_shape: tuple[int, ...], encoding: InputEncoding,
         arch: str = "", num_classes: int = 0) -> FoldResult:
    """Capture, fold and group ``model`` into a float IF graph."""
    ann = capture(model, input_shape)
    folded, log = run_passes(ann)
    graph = build_float_graph(folded, encoding, arch=arch, num_classes=num_classes)
    return FoldResult(ann, folded, graph, log)


__all__ = [
    "FOLD_PASSES",
    "AbsorbAvgPool",
    "ExplicitShortcuts",
    "FoldLog",
    "FoldPass",
    "FoldResult",
    "MergeBatchNorm",
    "RejectBadThreshold",
    "RejectNonFinite",
    "RemoveDropout",
    "ScaleThresholds",
    "build_float_graph",
    "fold",
    "run_passes",
]
