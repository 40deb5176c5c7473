"""Grouped convolutions in NIR: stored dense, block diagonal.

NIR's type inference reads a Conv2d's input channels off ``weight.shape[1]`` and
ignores ``groups``, so the writer stores a grouped conv weight (O, I/g, kH, kW)
as the equivalent dense one (O, I, kH, kW) with ``metadata.groups = g``; the
reader compresses it back, refusing a weight outside the diagonal blocks.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from csqcfs_deploy.errors import InputFileError


def expand_groups(w: npt.NDArray[Any], groups: int) -> npt.NDArray[Any]:
    """Grouped conv weight (O, I/g, kH, kW) -> the equivalent dense one (O, I, kH, kW)."""
    if groups == 1:
        return w
    o, ig, kh, kw = w.shape
    og = o // groups
    full = np.zeros((o, ig * groups, kh, kw), dtype=w.dtype)
    for g in range(groups):
        full[g * og:(g + 1) * og, g * ig:(g + 1) * ig] = w[g * og:(g + 1) * og]
    return full


def compress_groups(name: str, w: npt.NDArray[Any], groups: int) -> npt.NDArray[Any]:
    """Inverse of :func:`expand_groups`, refusing a weight outside the diagonal blocks."""
    if groups == 1:
        return w
    o, i, kh, kw = w.shape
    if groups < 1 or o % groups or i % groups:
        raise InputFileError(f"node {name}: metadata groups {groups} does not divide the "
                             f"weight shape {w.shape}")
    og, ig = o // groups, i // groups
    out = np.empty((o, ig, kh, kw), dtype=w.dtype)
    rest = w.copy()
    for g in range(groups):
        block = (slice(g * og, (g + 1) * og), slice(g * ig, (g + 1) * ig))
        out[g * og:(g + 1) * og] = w[block]
        rest[block] = 0
    if np.any(rest):
        raise InputFileError(f"node {name}: weights outside the {groups} groups of a grouped "
                             "convolution")
    return out
