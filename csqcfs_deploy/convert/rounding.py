"""Error-compensating weight rounding from calibration data (GPTQ-style; Frantar et al. 2023).

Nearest rounding makes every weight's error independent, so a neuron's summed
error grows with its fan-in. With the second moment of a projection's inputs
on calibration data, ``H = E[x x^T]`` over its (pooled, im2col) input features
``x`` (d,), the rounding of one output row ``w`` (d,) can instead minimise
``E[((q - w) . x)^2] = (q - w)^T H (q - w)``: round the features one at a time
and move each one's error onto the features not yet rounded, weighted by the
inverse Hessian's Cholesky factor ``U`` (``H^-1 = U^T U``)::

    for i in 0 .. d-1:
        q_i   = clip(round(w_i), lo, hi)
        e     = (w_i - q_i) / U[i, i]
        w_j  -= e * U[i, j]            for j > i

Every output row shares ``H`` (the rows are independent given it). The result
is still a plain integer weight on the profile's grid: nothing about the
integer semantics changes, only which integers are chosen.

:class:`SecondMoments` gathers ``H`` for every dense projection and every
ungrouped conv projection while :func:`~.calibrate.float_run` runs; rows are
subsampled (seeded) so that each one costs at most about ``ROWS_PER_FEATURE * d``
rows.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch
from torch.nn import functional as F

from csqcfs_deploy.ir import ConvProjection, DenseProjection, IFGraph
from csqcfs_deploy.ir.kinds import sum_pool

#: Feature rows gathered per feature dimension (over all batches and steps).
ROWS_PER_FEATURE = 8
#: Relative damping of H's diagonal (GPTQ's default).
DAMP = 0.01


class SecondMoments:
    """Accumulates ``sum x x^T`` (float32) of every eligible projection's input features."""

    def __init__(self, graph: IFGraph, samples: int, steps: int) -> None:
        self.graph = graph
        self.sums: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}
        self.budget: dict[str, int] = {}
        self.events = max(1, (samples + 63) // 64) * steps
        self.gen = torch.Generator().manual_seed(0)
        for p in graph.projections:
            if isinstance(p, ConvProjection) and p.groups == 1 or isinstance(p, DenseProjection):
                d = int(np.prod(p.weight.shape[1:]))
                self.budget[p.name] = ROWS_PER_FEATURE * d

    def features(self, p: ConvProjection | DenseProjection, x: torch.Tensor) -> torch.Tensor:
        """(rows, d) input features of ``p`` for source values ``x`` (N, *src_shape)."""
        if p.pool is not None:
            x = sum_pool(x, p.pool)
        if isinstance(p, ConvProjection):
            kh, kw = p.weight.shape[2], p.weight.shape[3]
            cols = F.unfold(x, (kh, kw), padding=p.padding, stride=p.stride)
            return cols.transpose(1, 2).reshape(-1, cols.shape[1])
        return x.reshape(x.shape[0], -1)

    def add(self, name: str, x: torch.Tensor) -> None:
        """Add one batch-step of source values ``x`` for projection ``name``."""
        if name not in self.budget:
            return
        p = self.graph.projection(name)
        assert isinstance(p, (ConvProjection, DenseProjection))
        f = self.features(p, x)
        keep = max(1, self.budget[name] // self.events)
        if f.shape[0] > keep:
            f = f[torch.randperm(f.shape[0], generator=self.gen)[:keep]]
        f32 = f.to(torch.float32)
        h = f32.T @ f32
        self.sums[name] = h if name not in self.sums else self.sums[name] + h
        self.rows[name] = self.rows.get(name, 0) + int(f.shape[0])

    def result(self) -> dict[str, npt.NDArray[np.float64]]:
        """``H`` per projection: the mean of ``x x^T`` over the rows gathered."""
        return {k: (v.to(torch.float64) / max(self.rows[k], 1)).numpy()
                for k, v in self.sums.items()}


def gptq_round(target: npt.NDArray[np.float64], hessian: npt.NDArray[np.float64],
               lo: int, hi: int) -> npt.NDArray[np.int64]:
    """Integers in ``lo..hi`` for real targets (O, d), minimising ``(q-w)^T H (q-w)`` per
    row greedily (module docstring); ``hessian`` (d, d)."""
    w = torch.from_numpy(np.array(target, dtype=np.float64))
    h = torch.from_numpy(np.array(hessian, dtype=np.float64))
    d = h.shape[0]
    dead = torch.diag(h) <= 0
    h[dead, dead] = 1.0
    h += DAMP * float(torch.diag(h).mean()) * torch.eye(d, dtype=torch.float64)
    try:
        chol = torch.linalg.cholesky(h)
        u = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
    except RuntimeError:  # not positive definite even damped: nearest rounding
        out: npt.NDArray[np.int64] = np.clip(np.rint(target), lo, hi).astype(np.int64)
        return out
    q = torch.zeros_like(w)
    block = 128
    for b0 in range(0, d, block):
        b1 = min(b0 + block, d)
        wb = w[:, b0:b1].clone()
        errs = torch.zeros_like(wb)
        for i in range(b1 - b0):
            col = wb[:, i]
            qc = torch.clamp(torch.round(col), lo, hi)
            q[:, b0 + i] = qc
            e = (col - qc) / u[b0 + i, b0 + i]
            wb[:, i:] -= e[:, None] * u[b0 + i, b0 + i:b1][None, :]
            errs[:, i] = e
        w[:, b1:] -= errs @ u[b0:b1, b1:]
    res: npt.NDArray[np.int64] = q.numpy().astype(np.int64)
    return res
