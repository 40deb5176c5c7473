"""The torch devices the back ends run on, shared by the Norse and integer back ends.

* :func:`resolve_device`: a ``--device`` string -> ``torch.device`` (``cpu`` or
  ``cuda[:i]``), BackendUnavailable when CUDA is asked for and absent;
* :func:`ieee_float32`: a context manager switching TF32 off for cuDNN
  convolutions and cuBLAS matmuls on CUDA, restoring the previous settings.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from csqcfs_deploy.errors import BackendUnavailable, UsageError


def resolve_device(name: str, backend: str) -> torch.device:
    """``cpu`` or ``cuda[:i]`` for the back end named ``backend`` (in messages);
    UsageError for any other device, BackendUnavailable when CUDA is absent."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"unknown device {name!r} (the {backend} back end runs on cpu or "
                         "cuda)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise BackendUnavailable(f"--device {name}: no CUDA GPU is available to torch "
                                     "(torch.cuda.is_available() is False); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise BackendUnavailable(f"--device {name}: only {torch.cuda.device_count()} "
                                     "CUDA device(s)")
    elif device.type != "cpu":
        raise UsageError(f"device {name!r}: the {backend} back end runs on cpu or cuda")
    return device


def matmul_precision() -> str:
    """``torch.get_float32_matmul_precision()``, or ``"mixed"`` where PyTorch refuses to
    answer (per-operator ``fp32_precision`` settings that disagree with it)."""
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:
        return "mixed"


@contextlib.contextmanager
def ieee_float32(device: torch.device) -> Iterator[None]:
    """On CUDA, switch TF32 off for cuDNN convolutions and cuBLAS matmuls and make the
    float32 matmul precision ``"highest"``; every setting restored after.

    TF32 keeps 10 mantissa bits, so float32 sums of integers would round. On the
    CPU this changes nothing.
    """
    if device.type != "cuda":
        yield
        return
    conv = getattr(torch.backends.cudnn, "conv", None)
    if conv is None or not hasattr(conv, "fp32_precision"):  # torch < 2.9: the legacy flags
        with _legacy_tf32_off():
            yield
        return
    # set_float32_matmul_precision writes the cuBLAS and oneDNN matmul settings too
    nodes = (conv, torch.backends.cuda.matmul,
             getattr(torch.backends.mkldnn, "matmul"))  # noqa: B009 - untyped in torch
    saved = tuple(node.fp32_precision for node in nodes)
    saved_precision = matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        conv.fp32_precision = "ieee"
        yield
    finally:
        if saved_precision != "mixed":
            torch.set_float32_matmul_precision(saved_precision)
        for node, value in zip(nodes, saved, strict=True):
            node.fp32_precision = value


@contextlib.contextmanager
def _legacy_tf32_off() -> Iterator[None]:
    """torch < 2.9: ``allow_tf32`` off for cuDNN and cuBLAS and the matmul precision
    "highest", restored after."""
    matmul = torch.backends.cuda.matmul
    saved = (torch.backends.cudnn.allow_tf32, matmul.allow_tf32,
             torch.get_float32_matmul_precision())
    try:
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = matmul.allow_tf32 = False
        yield
    finally:
        torch.set_float32_matmul_precision(saved[2])
        torch.backends.cudnn.allow_tf32, matmul.allow_tf32 = saved[:2]
