"""The integer simulator's synaptic sums: weight layouts and kernels per projection kind.

For a source's values ``x`` (rows, *src_shape) -- the integer input, or spikes
as 0/1 -- projection ``p`` contributes ``shift(W_p (*) pool_p(x), weight_exp_p)``
(rows, *dst_shape) to its target, computed as exact integers (the bound is
proven by :mod:`.arithmetic`):

* **float kernels**: ``F.conv2d`` / ``F.linear`` / a per-channel product in the
  layer's sum dtype (float32 or float64). Sources are channels-last, so conv
  weights are channels-last and a dense projection from a (C, H, W) source
  takes its columns in (H, W, C) order (the flattening is then a view);
* **int8 kernels** (``kernel="int8"``): ``torch._int_mm`` (int8 x int8 ->
  int32, exact below 2**31) on the weights' mantissas ``W / weight_step`` laid
  out as (K, O), conv as im2col over (N, H, W, C); the product is scaled back
  by ``weight_step``. Used for a conv (groups 1) or dense projection whose
  mantissas and source values fit int8.

Each projection kind registers one :class:`KindKernels` in :data:`KERNELS_BY_KIND`
(a :class:`~csqcfs_deploy.ir.kinds.KindTable`); a kind it lacks is a TargetError.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

import numpy as np
import torch
from torch.nn import functional as F

from csqcfs_deploy.ir import ConvProjection, DenseProjection, IdentityProjection, ProjectionT
from csqcfs_deploy.ir.kinds import KindTable
from csqcfs_deploy.ir.profiles import Profile
from csqcfs_deploy.ir.synapses import sum_pool
from csqcfs_deploy.simulators.integer.arithmetic import INT32_MAX
from csqcfs_deploy.simulators.integer.device import int8_projection_ok
from csqcfs_deploy.simulators.integer.kernels import Candidate, KernelChoice, KernelChooser, Timer

SynapseKernel = Literal["auto", "float", "int8"]
KERNELS: tuple[str, ...] = ("auto", "float", "int8")

#: kernel names (:data:`~.kernels.CANDIDATE_ORDER`) -> the dtype of their weights and inputs
_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float64": torch.float64,
                                   "int8": torch.int8}
_DTYPE_NAMES: dict[torch.dtype, str] = {torch.float32: "float32", torch.float64: "float64"}

P = TypeVar("P")
Layout = Callable[[P, torch.Tensor, tuple[int, ...], torch.dtype], torch.Tensor]
Sums = Callable[[P, torch.Tensor, torch.Tensor], torch.Tensor]


def _everywhere(p: object) -> bool:
    return True


@dataclass(frozen=True)
class KindKernels(Generic[P]):
    """How the simulator computes one projection kind's sums.

    ``layout(p, w, pooled_shape, dtype)``: the kernel's weight from the int64
    weight ``w`` (mantissas when ``dtype`` is int8); ``float_sums(p, x, w)`` and
    ``int8_sums(p, x, w)``: ``W (*) x`` of pooled source values ``x``
    (rows, *pooled_shape), ``int8_sums`` None when the kind has no int8 kernel;
    ``int8_applies(p)``: a further condition of the int8 kernel; ``elementwise``:
    the sums are a per-channel product (an identity shortcut), so they can be
    added in place into another projection's sums.
    """

    layout: Layout[P]
    float_sums: Sums[P]
    int8_sums: Sums[P] | None = None
    int8_applies: Callable[[P], bool] = _everywhere
    elementwise: bool = False


KERNELS_BY_KIND: KindTable[KindKernels[Any]] = KindTable("integer simulator")


def channels_last(t: torch.Tensor) -> torch.Tensor:
    """``t`` in channels-last memory when 4-D (the simulator's layout), else unchanged."""
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


def _flatten_hwc(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) channels-last -> (N, H*W*C), a view; (N, F) unchanged."""
    return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1) if x.dim() == 4 else x


# --------------------------------------------------------------------------- conv


def _conv_layout(p: ConvProjection, w: torch.Tensor, pooled: tuple[int, ...],
                 dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.int8:  # (O, I, kh, kw) -> (kh * kw * I, O)
        return w.permute(2, 3, 1, 0).reshape(-1, w.shape[0]).to(dtype).contiguous()
    return channels_last(w.to(dtype))


def _conv_float(p: ConvProjection, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x, w, None, p.stride, p.padding, 1, p.groups)


def _conv_int8(p: ConvProjection, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """im2col on (N, H, W, C) int8 values, one ``_int_mm`` -> (N, O, H', W') int32."""
    n = x.shape[0]
    kh, kw = p.kernel
    (sh, sw), (ph, pw) = p.stride, p.padding
    nhwc = x.permute(0, 2, 3, 1)
    if ph or pw:
        nhwc = F.pad(nhwc, (0, 0, pw, pw, ph, ph))
    nhwc = nhwc.contiguous()
    _, hp, wp, c = nhwc.shape
    oh, ow = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    s0, s1, s2, s3 = nhwc.stride()
    patches = nhwc.as_strided((n, oh, ow, kh, kw, c), (s0, s1 * sh, s2 * sw, s1, s2, s3))
    out = torch._int_mm(patches.reshape(n * oh * ow, kh * kw * c), w)
    return out.view(n, oh, ow, -1).permute(0, 3, 1, 2)


KERNELS_BY_KIND.add(ConvProjection, KindKernels[ConvProjection](
    _conv_layout, _conv_float, _conv_int8, int8_applies=lambda p: p.groups == 1))


# --------------------------------------------------------------------------- dense


def _dense_layout(p: DenseProjection, w: torch.Tensor, pooled: tuple[int, ...],
                  dtype: torch.dtype) -> torch.Tensor:
    if len(pooled) == 3:  # columns in (H, W, C) order, for channels-last sources
        c, h, wd = pooled
        w = w.view(-1, c, h, wd).permute(0, 2, 3, 1).reshape(w.shape[0], -1)
    return w.t().to(dtype).contiguous() if dtype == torch.int8 else w.to(dtype)


def _dense_float(p: DenseProjection, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return F.linear(_flatten_hwc(x), w)


def _dense_int8(p: DenseProjection, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch._int_mm(_flatten_hwc(x).contiguous(), w)


KERNELS_BY_KIND.add(DenseProjection, KindKernels[DenseProjection](
    _dense_layout, _dense_float, _dense_int8))


# --------------------------------------------------------------------------- identity


def _identity_layout(p: IdentityProjection, w: torch.Tensor, pooled: tuple[int, ...],
                     dtype: torch.dtype) -> torch.Tensor:
    return w.to(dtype).view(1, -1, *([1] * (len(pooled) - 1)))


def _identity_float(p: IdentityProjection, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * w


KERNELS_BY_KIND.add(IdentityProjection, KindKernels[IdentityProjection](
    _identity_layout, _identity_float, elementwise=True))


# --------------------------------------------------------------------------- sources


@dataclass
class Source:
    """A layer's output (spikes as float32 0/1, or the int64 input) with its largest
    magnitude, converted once per dtype that a consumer asks for."""

    values: torch.Tensor
    max_abs: float
    as_dtype: dict[torch.dtype, torch.Tensor] = field(default_factory=dict)

    def get(self, dtype: torch.dtype) -> torch.Tensor:
        if self.values.dtype == dtype:
            return self.values
        if dtype not in self.as_dtype:
            self.as_dtype[dtype] = self.values.to(dtype)
        return self.as_dtype[dtype]


class Synapses:
    """The synaptic kernels of one graph's projections, weights laid out once per dtype.

    ``kernel``: ``"auto"`` times the exact candidates of each projection the first
    time it is computed for a given number of rows and sum dtype, and keeps the
    fastest (:mod:`.kernels`: what is measured and when; ``timer`` is its clock):
    float32 (when the layer's sums are float32), float64, and int8 where
    :meth:`int8_exact` proves it exact; an elementwise (identity) projection is
    not measured (its sum dtype). ``"float"``: the float kernels in the layer's
    sum dtype; ``"int8"``: the int8 kernel wherever :meth:`int8_exact` proves it
    exact, the float kernels elsewhere. :attr:`run_choices`: per projection, the
    :class:`~.kernels.KernelChoice` of the latest run (:meth:`start_run` clears it).
    """

    def __init__(self, profile: Profile, kernel: SynapseKernel,
                 device: torch.device | None = None,
                 timer: Timer = time.perf_counter) -> None:
        self.profile = profile
        self.kernel = kernel
        self.device = torch.device("cpu") if device is None else device  # of the weights
        self.chooser = KernelChooser(timer)
        self.run_choices: dict[str, KernelChoice] = {}
        self._weights: dict[tuple[str, torch.dtype], torch.Tensor] = {}
        self._int8_fan: dict[str, float | None] = {}

    def start_run(self) -> None:
        """Forget the latest run's choices (not the measurements)."""
        self.run_choices = {}

    @staticmethod
    def elementwise(p: ProjectionT) -> bool:
        """``p``'s kind is a per-channel product (an identity shortcut)."""
        return bool(KERNELS_BY_KIND.lookup(p).elementwise)

    def weight(self, p: ProjectionT, dtype: torch.dtype, src_shape: tuple[int, ...]
               ) -> torch.Tensor:
        """The weight of ``p`` laid out for its kernel in ``dtype`` (int8: mantissas)."""
        key = (p.name, dtype)
        if key not in self._weights:
            w = torch.tensor(np.asarray(p.weight), dtype=torch.int64, device=self.device)
            if dtype == torch.int8:
                w = w // self.profile.weight_step
            layout = KERNELS_BY_KIND.lookup(p).layout
            self._weights[key] = layout(p, w, p.pooled_shape(src_shape), dtype)
        return self._weights[key]

    def _mantissa_fan(self, p: ProjectionT) -> float | None:
        """The largest row sum of ``|W / weight_step|`` of ``p`` when its mantissas fit
        int8 and its kind has an int8 kernel that applies, else None (cached)."""
        if p.name not in self._int8_fan:
            kinds = KERNELS_BY_KIND.lookup(p)
            fan: float | None = None
            if kinds.int8_sums is not None and kinds.int8_applies(p):
                w = np.asarray(p.weight) // self.profile.weight_step
                if w.size and w.min() >= -128 and w.max() <= 127:
                    fan = float(np.abs(w).reshape(w.shape[0], -1).sum(axis=1).max())
            self._int8_fan[p.name] = fan
        return self._int8_fan[p.name]

    def int8_exact(self, p: ProjectionT, max_src: float) -> bool:
        """The int8 kernel exists for ``p``'s kind and is exact for ``p``: int8
        mantissas, int8 (pooled) integer source values, int32 sums."""
        fan = self._mantissa_fan(p)
        window = 1 if p.pool is None else p.pool.window
        if fan is None or max_src * window > 127 or not float(max_src).is_integer():
            return False
        return fan * window * max_src * self.profile.weight_step <= INT32_MAX

    def int8_ok(self, p: ProjectionT, max_src: float) -> bool:
        """The int8 kernel is asked for (``kernel="int8"``) and exact for ``p``."""
        return self.kernel == "int8" and self.int8_exact(p, max_src)

    def adds_in_place(self, p: ProjectionT, src: Source) -> bool:
        """An unpooled, unshifted elementwise projection (always on the float kernel in
        the sum dtype): its sums can be added straight into another projection's sums
        (:meth:`add_into`: ``addcmul_``, one pass)."""
        return self.elementwise(p) and p.pool is None and p.weight_exp == 0

    def add_into(self, sums: torch.Tensor, p: ProjectionT, src: Source,
                 src_shape: tuple[int, ...], rows: int) -> None:
        """Add the sums of :meth:`adds_in_place` projection ``p`` (first ``rows`` rows)
        into ``sums`` in place, in ``sums``' dtype (exact: the layer's bound)."""
        w = self.weight(p, sums.dtype, src_shape)
        sums.addcmul_(src.get(sums.dtype)[:rows], w)
        self.run_choices[p.name] = KernelChoice(_DTYPE_NAMES[sums.dtype])

    def candidate_names(self, p: ProjectionT, src: Source, src_shape: tuple[int, ...],
                        sum_dtype: torch.dtype, rows: int) -> tuple[str, ...]:
        """The exact kernels :attr:`kernel` allows for ``p`` on this source, in
        :data:`~.kernels.CANDIDATE_ORDER` (class docstring)."""
        native = _DTYPE_NAMES[sum_dtype]
        if self.kernel == "float" or self.elementwise(p):
            return (native,)
        int8 = (self.int8_exact(p, src.max_abs)
                and int8_projection_ok(self.device, p, rows, src_shape))  # CUDA shape rule
        if self.kernel == "int8":
            return ("int8",) if int8 else (native,)
        floats = ("float32", "float64") if sum_dtype == torch.float32 else (native,)
        return (*floats, "int8") if int8 else floats

    def candidate(self, name: str, p: ProjectionT, src: Source, src_shape: tuple[int, ...],
                  sum_dtype: torch.dtype) -> Candidate:
        """Kernel ``name`` of ``p`` with its weight and source values prepared now (so
        that a measurement times the kernel only)."""
        kinds = KERNELS_BY_KIND.lookup(p)
        dtype = _DTYPES[name]
        values, w = src.get(dtype), self.weight(p, dtype, src_shape)
        if name != "int8":
            def float_sums(rows: int) -> torch.Tensor:
                out = kinds.float_sums(p, self.pool(p, values[:rows]), w)
                return self._finish(p, out, sum_dtype, 1)
            return Candidate(name, float_sums)
        int8_sums = kinds.int8_sums
        assert int8_sums is not None  # candidate_names offers int8 only with a kernel

        def sums_int8(rows: int) -> torch.Tensor:
            x = values[:rows]
            if p.pool is not None:  # window sums of int8 values <= 127: exact in float32
                x = self.pool(p, x.to(torch.float32)).to(torch.int8)
            return self._finish(p, int8_sums(p, x, w), sum_dtype, self.profile.weight_step)

        return Candidate(name, sums_int8,
                         lambda rows: int8_projection_ok(self.device, p, rows, src_shape))

    @staticmethod
    def _finish(p: ProjectionT, out: torch.Tensor, sum_dtype: torch.dtype, step: int
                ) -> torch.Tensor:
        """Kernel sums ``out`` (float32/float64, or int32 mantissa sums) as exact integers
        in ``sum_dtype``, times ``step`` (the weight step of mantissa sums, else 1) and
        shifted by ``weight_exp`` (floored): one conversion and one multiply, exact
        because every product is an integer (or, before the floor, an integer times a
        power of two) below the layer's bound."""
        if out.dtype != sum_dtype:
            out = out.to(sum_dtype)
        factor = step * 2.0**p.weight_exp
        if p.weight_exp < 0:
            return torch.floor(out.mul_(factor))
        return out.mul_(factor) if factor != 1 else out

    def project(self, p: ProjectionT, src: Source, src_shape: tuple[int, ...],
                sum_dtype: torch.dtype, rows: int) -> torch.Tensor:
        """``shift(W (*) pool(x), weight_exp)`` for the first ``rows`` rows of the source,
        as exact integers in ``sum_dtype`` (float32/float64), by the kernel chosen for
        (``p``, ``rows``, ``sum_dtype``) -- measured now if that is new (:mod:`.kernels`)."""
        names = self.candidate_names(p, src, src_shape, sum_dtype, rows)
        key = (p.name, rows, sum_dtype, names)
        new = key not in self.chooser.choices
        out, choice = self.chooser.sums(
            key, rows, names, lambda name: self.candidate(name, p, src, src_shape, sum_dtype))
        self.run_choices[p.name] = choice
        if new and choice.measured:
            self._evict_unchosen(p)
        return out

    def _evict_unchosen(self, p: ProjectionT) -> None:
        """Drop the weight layouts of ``p`` that no choice of ``p`` uses (the losers of a
        measurement), so measuring costs no memory after it."""
        used = {_DTYPES[c.chosen] for k, c in self.chooser.choices.items() if k[0] == p.name}
        for dtype in _DTYPES.values():
            if dtype not in used:
                self._weights.pop((p.name, dtype), None)

    @staticmethod
    def pool(p: ProjectionT, x: torch.Tensor) -> torch.Tensor:
        """``p``'s sum pool of ``x`` (float windows through ``avg_pool2d`` with divisor 1)."""
        pool = p.pool
        if pool is None:
            return x
        if all(2 * pd <= k for pd, k in zip(pool.padding, pool.kernel, strict=True)) \
                and x.dtype in (torch.float32, torch.float64):
            return F.avg_pool2d(x, pool.kernel, pool.stride, pool.padding,
                                divisor_override=1)
        return sum_pool(x, pool)
