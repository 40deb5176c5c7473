"""Where the integer simulator runs and which of its kernels are exact there.

The simulator's exactness proof (:mod:`.arithmetic`) needs kernels that compute
integer sums exactly while they stay inside a dtype's exact-integer range. On
which device that holds, and under which of PyTorch's settings, is decided here
from a :class:`PrecisionFlags` snapshot by the pure :meth:`DevicePlan.for_device`,
so that the decisions can be checked on any machine:

* **CPU**: float32 kernels are exact while oneDNN computes float32 in IEEE float32
  (no bf16/tf32 modes) and ``torch.get_float32_matmul_precision() == "highest"``;
  float64 kernels always are.
* **CUDA**: float32 is exact only with TF32 off for cuBLAS matmuls **and** cuDNN
  convolutions and the matmul precision ``"highest"``; and only with cuDNN itself
  switched off, for float32 and float64 alike. cuDNN may pick FFT or Winograd
  convolution algorithms, which transform the operands and round in the transform,
  so their results need not be integers at all. Without cuDNN PyTorch's CUDA
  convolution is im2col + cuBLAS GEMM (or a direct depthwise kernel): every
  partial sum is an integer below the proven bound, so any summation order, split-K
  or atomic reduction gives the same exact sum. The non-determinism of such
  reductions therefore cannot change a result below the bound; only the
  transform algorithms could, and they are excluded. :func:`exact_kernels` sets all
  of this for the length of a run and restores the previous settings.
* **int8** (``torch._int_mm``, int8 x int8 -> int32, exact below 2**31): on the CPU
  for any shape; on CUDA (cuBLASLt) only for ``(m, k) x (k, n)`` with ``m > 16``
  and ``k``, ``n`` positive multiples of 8 (PyTorch's documented checks);
  elsewhere the projection falls back to the float kernels.
* **scan state**: as on the CPU (:class:`~.arithmetic.LayerArithmetic`: the sums'
  float dtype, int32 or int64; the readout in int64), on the same device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from csqcfs_deploy.ir import ConvProjection, DenseProjection, ProjectionT
from csqcfs_deploy.simulators.devices import ieee_float32, matmul_precision, resolve_device

#: ``torch._int_mm`` on CUDA: rows above this, inner and output sizes multiples of this
CUDA_INT_MM_MIN_ROWS = 16
CUDA_INT_MM_MULTIPLE = 8


def _effective(*chain: str) -> str:
    """The first setting in a node -> parent chain of ``fp32_precision`` that is not
    ``"none"`` (``"none"`` inherits); ``"ieee"`` when all are ``"none"``."""
    return next((mode for mode in chain if mode != "none"), "ieee")


@dataclass(frozen=True)
class PrecisionFlags:
    """A snapshot of PyTorch's float precision settings (read per run, since a user may
    change them): ``matmul_precision``: ``torch.get_float32_matmul_precision()``
    (``"mixed"`` where it raises);
    ``mkldnn``: the oneDNN fp32 modes (global, conv, matmul); ``cuda_matmul``,
    ``cudnn_conv``: the effective fp32 mode of cuBLAS and cuDNN convolutions
    (``"ieee"`` or ``"tf32"``); ``cudnn_enabled``: ``torch.backends.cudnn.enabled``."""

    matmul_precision: str = "highest"
    mkldnn: frozenset[str] = frozenset({"none"})
    cuda_matmul: str = "ieee"
    cudnn_conv: str = "ieee"
    cudnn_enabled: bool = False

    @classmethod
    def read(cls) -> PrecisionFlags:
        """The current settings."""
        backends = torch.backends
        mkl = backends.mkldnn
        mkldnn = {getattr(getattr(mkl, sub, None), "fp32_precision", "none")
                  for sub in ("conv", "matmul")}
        mkldnn.add(getattr(mkl, "fp32_precision", "none"))
        conv = getattr(backends.cudnn, "conv", None)
        if conv is not None and hasattr(conv, "fp32_precision"):
            root = getattr(backends, "fp32_precision", "none")
            cuda_matmul = _effective(backends.cuda.matmul.fp32_precision, root)
            cudnn_conv = _effective(conv.fp32_precision, backends.cudnn.fp32_precision, root)
        else:  # torch < 2.9: the legacy flags
            cuda_matmul = "tf32" if backends.cuda.matmul.allow_tf32 else "ieee"
            cudnn_conv = "tf32" if backends.cudnn.allow_tf32 else "ieee"
        return cls(matmul_precision(), frozenset(mkldnn), cuda_matmul, cudnn_conv,
                   bool(backends.cudnn.enabled))


@dataclass(frozen=True)
class DevicePlan:
    """The float kernels' exactness for one run (module docstring): ``float32_exact``
    and ``float64_exact``: float kernels of that dtype compute integer sums exactly
    below its exact-integer range on ``device``. (The int8 kernel's shape rule depends
    on the device alone: :func:`int8_shape_ok`.)"""

    device: torch.device
    float32_exact: bool
    float64_exact: bool

    @classmethod
    def for_device(cls, device: torch.device, flags: PrecisionFlags) -> DevicePlan:
        """The plan for ``device`` (cpu or cuda) under the precision ``flags``."""
        highest = flags.matmul_precision == "highest"
        if device.type == "cuda":
            float_ok = not flags.cudnn_enabled
            f32 = (float_ok and highest and flags.cuda_matmul == "ieee"
                   and flags.cudnn_conv == "ieee")
            return cls(device, f32, float_ok)
        f32 = flags.mkldnn <= {"none", "ieee"} and highest
        return cls(device, f32, True)


def int8_shape_ok(device: torch.device, m: int, k: int, n: int) -> bool:
    """``torch._int_mm`` accepts ``(m, k) x (k, n)`` on ``device``: any shape on the
    CPU; on CUDA ``m > 16`` and ``k``, ``n`` positive multiples of 8."""
    if device.type != "cuda":
        return True
    return (m > CUDA_INT_MM_MIN_ROWS and k > 0 and n > 0
            and k % CUDA_INT_MM_MULTIPLE == 0 and n % CUDA_INT_MM_MULTIPLE == 0)


def int8_projection_ok(device: torch.device, p: ProjectionT, rows: int,
                       src_shape: tuple[int, ...]) -> bool:
    """The int8 GEMM of projection ``p`` over ``rows`` source rows (each of shape
    ``src_shape``) has a shape ``torch._int_mm`` accepts on ``device``."""
    shape = int8_gemm_shape(p, rows, src_shape)
    return shape is not None and int8_shape_ok(device, *shape)


def int8_gemm_shape(p: ProjectionT, rows: int, src_shape: tuple[int, ...]
                    ) -> tuple[int, int, int] | None:
    """``(m, k, n)`` of the simulator's int8 GEMM for ``p`` (im2col for a conv), or None
    for a kind without one."""
    w_shape = np.shape(p.weight)
    if isinstance(p, ConvProjection):
        out = p.out_shape(src_shape)
        return rows * int(np.prod(out[1:])), int(np.prod(w_shape[1:])), int(w_shape[0])
    if isinstance(p, DenseProjection):
        return rows, int(w_shape[1]), int(w_shape[0])
    return None


def simulator_device(name: str) -> torch.device:
    """``--device`` of the int back end: cpu or cuda[:i] (UsageError otherwise;
    BackendUnavailable when CUDA is absent)."""
    return resolve_device(name, "int")


@contextlib.contextmanager
def exact_kernels(device: torch.device) -> Iterator[None]:
    """For the length of a run on ``device``: on CUDA, TF32 off and matmul precision
    "highest" (:func:`~csqcfs_deploy.simulators.devices.ieee_float32`) and cuDNN off
    (module docstring); every setting restored after. On the CPU nothing changes."""
    if device.type != "cuda":
        yield
        return
    saved = torch.backends.cudnn.enabled
    with ieee_float32(device):
        torch.backends.cudnn.enabled = False
        try:
            yield
        finally:
            torch.backends.cudnn.enabled = saved
