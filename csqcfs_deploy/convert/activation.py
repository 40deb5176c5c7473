"""Recognise a QCFS-family activation by what its ``forward`` computes (SPEC section 1).

Nothing is read from attribute names. The module's ``forward`` is run once on a
concrete input under a :class:`~torch.overrides.TorchFunctionMode` that follows
every tensor derived from the input (through straight-through tricks and
``autograd.Function`` s such as a gradient-passing floor). Tensors that do not
depend on the input (the thresholds, computed from the parameters by the
module's own arithmetic: softplus, abs, identity or anything else) are plain
constants. The input's path must be one chain of elementwise steps

    affine (x * m + c)  |  clamp(lo, hi) (also relu, hardtanh, min/max)  |  floor

with exactly one floor; the chain is rewritten into the canonical form

    h(x) = S * clip(floor(a * x + b), q_lo, q_hi) + D

and accepted as ``lambda / L * clip(floor(x * L / lambda + phi), 0, L)`` when
``q_lo = 0``, ``q_hi = L`` (an integer >= 1), ``D = 0``, ``a * S = 1`` (so
``lambda = S * L``) and ``b = phi`` is one value in [0, 1) (an integer part of
``b`` is moved into the clip bounds first). ``lambda`` may be one value or one
per channel (dim 1 of the input); anything that varies over other dimensions is
refused. A module that combines the input with itself in any other way, or calls
an op outside the chain, is refused with the reason.

A module switching behaviour on an integer attribute ``T`` (the reference code's
SNN mode) is analysed, and captured, in its ANN mode ``T = 0``
(:func:`ann_mode`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from csqcfs_deploy.errors import GraphError

#: Relative tolerance for identities between constants (``a * S = 1``, integer bounds).
REL_TOL = 1e-5

_IDENTITY = {"detach", "clone", "contiguous", "float", "double", "to", "type_as", "data",
             "requires_grad_", "detach_", "cpu"}
_ADD = {"add", "__add__", "__radd__", "__iadd__"}
_SUB = {"sub", "__sub__", "__isub__", "subtract"}
_RSUB = {"__rsub__", "rsub"}
_MUL = {"mul", "__mul__", "__rmul__", "__imul__", "multiply"}
_DIV = {"div", "__truediv__", "__itruediv__", "true_divide", "divide", "__div__"}
_NEG = {"neg", "__neg__", "negative"}
_CLAMP = {"clamp", "clip", "clamp_min", "clamp_max", "relu", "relu6", "hardtanh",
          "minimum", "maximum", "fmin", "fmax"}
_FLOOR = {"floor"}
#: Ops that make a module a container (layers), not an activation.
_STRUCTURAL = {"conv1d", "conv2d", "conv3d", "conv_transpose2d", "linear", "batch_norm",
               "instance_norm", "layer_norm", "group_norm", "matmul", "__matmul__", "mm",
               "bmm", "einsum", "avg_pool2d", "adaptive_avg_pool2d", "max_pool2d", "flatten",
               "view", "reshape", "cat", "stack"}
#: Ops that mark a module as a quantizer / clip, i.e. an activation attempt.
_ACTIVATION_HINTS = _CLAMP | _FLOOR | {"round", "trunc", "ceil", "floor_divide", "__floordiv__"}


# --------------------------------------------------------------------------- the algebra


@dataclass(eq=False)
class _Input:
    """The module's input x."""


@dataclass(eq=False)
class _Floor:
    arg: _Lin


@dataclass(eq=False)
class _Clamp:
    arg: _Lin
    lo: torch.Tensor
    hi: torch.Tensor


_Atom = _Input | _Floor | _Clamp


@dataclass(eq=False)
class _Lin:
    """``sum(coef * atom) + const``; atoms are compared by identity, so the
    straight-through form ``y + (floor(y) - y).detach()`` reduces to ``floor(y)``."""

    terms: tuple[tuple[_Atom, torch.Tensor], ...]
    const: torch.Tensor

    def scaled(self, m: torch.Tensor) -> _Lin:
        return _Lin(tuple((a, c * m) for a, c in self.terms), self.const * m)

    def shifted(self, c: torch.Tensor) -> _Lin:
        return _Lin(self.terms, self.const + c)

    def plus(self, other: _Lin, sign: float) -> _Lin:
        terms: dict[int, tuple[_Atom, torch.Tensor]] = {id(a): (a, c) for a, c in self.terms}
        for a, c in other.terms:
            if id(a) in terms:
                terms[id(a)] = (a, terms[id(a)][1] + sign * c)
            else:
                terms[id(a)] = (a, sign * c)
        kept = tuple((a, c) for a, c in terms.values() if bool((c != 0).any()))
        return _Lin(kept, self.const + sign * other.const)


class _Refused(Exception):
    """The input's path leaves the clip-floor-shift chain (internal; becomes GraphError)."""


# --------------------------------------------------------------------------- the recorder


def _name(func: Any) -> str:
    name = str(getattr(func, "__name__", func))
    if name == "__get__":
        name = str(getattr(getattr(func, "__self__", None), "__name__", name))
    return name


class _Recorder(TorchFunctionMode):
    """Follows every tensor computed from the input; refuses what leaves the chain."""

    def __init__(self, x: torch.Tensor) -> None:
        super().__init__()
        self.shape = tuple(x.shape)
        self.dtype = x.dtype
        self.sym: dict[int, tuple[torch.Tensor, _Lin]] = {}
        self.ops: list[str] = []
        self.error: str | None = None
        self.tainted: dict[int, torch.Tensor] = {}  # computed from the input off the chain
        zero = torch.zeros(self.shape, dtype=torch.float64)
        self.sym[id(x)] = (x, _Lin(((_Input(), torch.ones_like(zero)),), zero))

    def lin_of(self, v: Any) -> _Lin | None:
        if isinstance(v, torch.Tensor):
            hit = self.sym.get(id(v))
            if hit is not None and hit[0] is v:
                return hit[1]
        return None

    def const(self, v: Any) -> torch.Tensor:
        """A constant broadcast to the input's shape (float64)."""
        t = torch.as_tensor(v.detach() if isinstance(v, torch.Tensor) else v,
                            dtype=torch.float64)
        try:
            shape = torch.broadcast_shapes(  # type: ignore[no-untyped-call]
                tuple(t.shape), self.shape)
        except RuntimeError:
            raise _Refused(f"a constant of shape {tuple(t.shape)} does not broadcast to the "
                           f"input {self.shape}") from None
        if tuple(shape) != self.shape:
            raise _Refused(f"a constant of shape {tuple(t.shape)} widens the input {self.shape}")
        return t.expand(self.shape).clone()

    def __torch_function__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        leaves = list(args) + list(kwargs.values())
        tracked = [v for v in leaves if self.lin_of(v) is not None]
        tainted = [v for v in leaves if isinstance(v, torch.Tensor)
                   and self.tainted.get(id(v)) is v]
        if not tracked and not tainted:
            return out
        name = _name(func)
        self.ops.append(name)
        if not isinstance(out, torch.Tensor):
            return out  # sizes, dims, dtypes: not values
        try:
            if tainted:
                raise _Refused(self.error or "")
            lin = self.apply(name, args, kwargs)
        except _Refused as exc:
            self.error = self.error or str(exc)
            self.tainted[id(out)] = out
            return out
        self.sym[id(out)] = (out, lin)
        return out

    def apply(self, name: str, args: Any, kwargs: dict[str, Any]) -> _Lin:
        base = name[:-1] if name.endswith("_") and not name.startswith("_") else name
        args = list(args)
        x = self.lin_of(args[0]) if args else None
        if base in _IDENTITY or (base in {"view_as", "reshape_as"} and x is not None):
            if x is None:
                raise _Refused(f"'{name}' is applied to the input in an unsupported position")
            return x
        if base in _ADD | _SUB | _RSUB | _MUL | _DIV:
            return self.binary(base, args, kwargs)
        if base in _NEG and x is not None:
            return x.scaled(self.const(-1.0))
        if base in _CLAMP:
            return self.clamp(base, args, kwargs)
        if base in _FLOOR and x is not None:
            return _Lin(((_Floor(x), self.const(1.0)),), self.const(0.0))
        if base == "round":
            raise _Refused("it rounds with round() (ties to even), not floor(x * L + phi)")
        raise _Refused(f"it applies '{name}' to the input")

    def binary(self, base: str, args: list[Any], kwargs: dict[str, Any]) -> _Lin:
        other_arg = args[1] if len(args) > 1 else kwargs.get("other")
        a, b = self.lin_of(args[0]), self.lin_of(other_arg)
        alpha = kwargs.get("alpha", 1)
        if base in _ADD | _SUB | _RSUB:
            sign = -1.0 if base in _SUB else 1.0
            if base in _RSUB:  # other - self
                a, b = b, a
                first, second = other_arg, args[0]
            else:
                first, second = args[0], other_arg
            if a is not None and b is not None:
                return a.plus(b.scaled(self.const(float(alpha))), sign)
            if a is not None:
                return a.shifted(self.const(second) * sign * float(alpha))
            if b is not None:
                return b.scaled(self.const(sign * float(alpha))).shifted(self.const(first))
        if a is not None and b is not None:
            raise _Refused(f"it multiplies or divides the input by itself ('{base}')")
        if base in _MUL:
            lin, c = (a, other_arg) if a is not None else (b, args[0])
            assert lin is not None  # one of them is the input: checked by the caller
            return lin.scaled(self.const(c))
        if a is None:
            raise _Refused("it divides by the input")
        divisor = self.const(other_arg)
        if not bool((divisor != 0).all()):
            raise _Refused("it divides by zero")
        return a.scaled(1.0 / divisor)

    def clamp(self, base: str, args: list[Any], kwargs: dict[str, Any]) -> _Lin:
        inf = float("inf")
        if base in {"minimum", "maximum", "fmin", "fmax"}:
            a, b = self.lin_of(args[0]), self.lin_of(args[1])
            if a is not None and b is not None:
                raise _Refused(f"it takes the {base} of the input with itself")
            x, c = (a, args[1]) if a is not None else (b, args[0])
            lo, hi = (self.const(c), None) if base in {"maximum", "fmax"} else (None, self.const(c))
        else:
            x = self.lin_of(args[0])
            rest = args[1:]
            if base in {"clamp", "clip"}:
                lo_v = rest[0] if rest else kwargs.get("min")
                hi_v = rest[1] if len(rest) > 1 else kwargs.get("max")
            elif base == "clamp_min":
                lo_v, hi_v = (rest[0] if rest else kwargs.get("min")), None
            elif base == "clamp_max":
                lo_v, hi_v = None, (rest[0] if rest else kwargs.get("max"))
            elif base == "relu":
                lo_v, hi_v = 0.0, None
            elif base == "relu6":
                lo_v, hi_v = 0.0, 6.0
            else:  # hardtanh
                lo_v = rest[0] if rest else kwargs.get("min_val", -1.0)
                hi_v = rest[1] if len(rest) > 1 else kwargs.get("max_val", 1.0)
            lo = None if lo_v is None else self.const(lo_v)
            hi = None if hi_v is None else self.const(hi_v)
        if x is None:
            raise _Refused(f"'{base}' takes the input as a bound")
        lo_t = lo if lo is not None else self.const(-inf)
        hi_t = hi if hi is not None else self.const(inf)
        return _Lin(((_Clamp(x, lo_t, hi_t), self.const(1.0)),), self.const(0.0))


# --------------------------------------------------------------------------- canonical form


@dataclass(frozen=True)
class ActivationSpec:
    """A recognised activation: per-channel ``lambda`` (C,), ``L`` levels, shift ``phi``."""

    threshold: torch.Tensor      # float64, shape (C,)
    levels: int
    phi: float


def _chain(lin: _Lin) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """The input's path as steps from x outwards: ('affine', m, c), ('clamp', lo, hi), ('floor')."""
    steps: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    while True:
        if not lin.terms:
            raise _Refused("its output does not depend on the input")
        if len(lin.terms) > 1:
            raise _Refused("it adds the input to a function of itself (not one "
                           "clip-floor-shift chain)")
        atom, coef = lin.terms[0]
        steps.append(("affine", coef, lin.const))
        if isinstance(atom, _Input):
            break
        if isinstance(atom, _Floor):
            steps.append(("floor", coef, coef))
            lin = atom.arg
        else:
            steps.append(("clamp", atom.lo, atom.hi))
            lin = atom.arg
    steps.reverse()
    return steps


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool(torch.isclose(a, b, rtol=REL_TOL, atol=REL_TOL * 1e-3).all())


def _is_integer(t: torch.Tensor) -> bool:
    finite = t[torch.isfinite(t)]
    return _close(finite, torch.round(finite)) if finite.numel() else True


def _canonical(steps: list[tuple[str, torch.Tensor, torch.Tensor]]
               ) -> tuple[torch.Tensor, ...]:
    """Rewrite the chain into ``S * clip(floor(a*x + b), q_lo, q_hi) + D``."""
    inf = torch.full_like(steps[0][1], float("inf"))
    a, b, lo, hi = torch.ones_like(inf), torch.zeros_like(inf), -inf, inf.clone()
    s, d, q_lo, q_hi = torch.ones_like(inf), torch.zeros_like(inf), -inf, inf.clone()
    floored = False
    for kind, p1, p2 in steps:
        if kind == "floor":
            if floored:
                raise _Refused("it applies floor twice")
            floored = True
            q_lo, q_hi = torch.floor(lo), torch.floor(hi)  # floor(clip(u)) = clip(floor(u))
        elif kind == "affine" and not floored:
            m, c = p1, p2
            if not bool((m != 0).all()):
                raise _Refused("it multiplies the input by zero")
            a, b = a * m, b * m + c
            lo, hi = torch.where(m > 0, lo * m + c, hi * m + c), torch.where(m > 0, hi * m + c,
                                                                              lo * m + c)
        elif kind == "affine":
            s, d = s * p1, d * p1 + p2
        elif not floored:  # clamp before the floor: compose the bounds
            lo, hi = torch.clamp(lo, p1, p2), torch.clamp(hi, p1, p2)
        else:  # clamp after the floor: move it inside S * q + D
            lo_q = torch.where(s > 0, (p1 - d) / s, (p2 - d) / s)
            hi_q = torch.where(s > 0, (p2 - d) / s, (p1 - d) / s)
            if not (_is_integer(lo_q) and _is_integer(hi_q)):
                raise _Refused("it clips after the floor at a bound that is not a whole level")
            q_lo = torch.clamp(q_lo, torch.round(lo_q), torch.round(hi_q))
            q_hi = torch.clamp(q_hi, torch.round(lo_q), torch.round(hi_q))
    if not floored:
        raise _Refused("it has no floor (a clip or ReLU is not a quantized activation)")
    k = torch.floor(b + REL_TOL)  # floor(u + k) = floor(u) + k for integer k
    return a, b - k, q_lo - k, q_hi - k, s, d + s * k


def _per_channel(t: torch.Tensor, what: str) -> torch.Tensor:
    """A constant over every dim but 1 (channels), as a (C,) vector."""
    vec = t.reshape(t.shape[0], t.shape[1], -1)[0, :, 0] if t.dim() > 1 else t[:1]
    if not bool((t == vec.view(1, -1, *([1] * (t.dim() - 2))).expand_as(t)).all()):
        raise _Refused(f"its {what} varies over the batch or over positions")
    return vec


def _spec(steps: list[tuple[str, torch.Tensor, torch.Tensor]]) -> ActivationSpec:
    a, phi, q_lo, q_hi, s, d = (_per_channel(t, w) for t, w in zip(
        _canonical(steps), ("input scale", "shift", "lower clip", "upper clip", "output scale",
                            "output offset"), strict=True))
    if not bool(torch.isfinite(q_lo).all()) or not _close(q_lo, torch.zeros_like(q_lo)):
        raise _Refused("its output is not clipped at 0 below")
    if not bool(torch.isfinite(q_hi).all()):
        raise _Refused("its output is not clipped above (no level count L)")
    levels = torch.round(q_hi)
    if not bool((levels == levels[0]).all()) or int(levels[0]) < 1:
        found = sorted(set(q_hi.tolist()))
        raise _Refused(f"its level count is not one whole number >= 1 ({found})")
    if not _close(d, torch.zeros_like(d)):
        raise _Refused("its output has an offset (h(0) is not 0)")
    if not _close(a * s, torch.ones_like(a)):
        raise _Refused("its input scale is not L / lambda for the output scale lambda / L")
    if not _close(phi, phi[:1].expand_as(phi)):
        raise _Refused("its shift phi differs between channels")
    return ActivationSpec(s * levels, int(levels[0]), float(phi[0]))


# --------------------------------------------------------------------------- entry points


@contextlib.contextmanager
def ann_mode(model: nn.Module) -> Iterator[list[str]]:
    """Set every module's integer ``T`` attribute to 0 (ANN mode) for the block;
    yields the names of the modules switched, and restores them afterwards."""
    saved: list[tuple[nn.Module, int]] = []
    names: list[str] = []
    for name, m in model.named_modules():
        t = vars(m).get("T")
        if isinstance(t, int) and not isinstance(t, bool) and t != 0:
            saved.append((m, t))
            names.append(name or type(m).__name__)
            setattr(m, "T", 0)  # noqa: B010 - a plain int attribute, not a submodule
    try:
        yield names
    finally:
        for m, t in saved:
            setattr(m, "T", t)  # noqa: B010


@dataclass(frozen=True)
class Probe:
    """What one module's forward did to its input: no activation, an activation, or why not."""

    is_activation: bool
    spec: ActivationSpec | None = None
    reason: str | None = None


def probe_module(module: nn.Module, x: torch.Tensor) -> Probe:
    """Run ``module(x)`` once under the recorder and classify it.

    ``x``: the input the module saw in the model, shape (N, C, ...). The module is
    run on a float64 copy (so thresholds come out in float64) where it allows it,
    else as it is.
    """
    for candidate in (_double(module), module):
        if candidate is None:
            continue
        inp = x.detach().to(torch.float64 if candidate is not module else x.dtype).clone()
        rec = _Recorder(inp)
        try:
            with torch.no_grad(), rec:
                out = candidate(inp)
        except Exception:  # noqa: BLE001 - the user's forward may fail in float64
            continue
        return _classify(rec, out)
    return Probe(False)


def _double(module: nn.Module) -> nn.Module | None:
    try:
        return copy.deepcopy(module).double()
    except Exception:  # noqa: BLE001 - a module that cannot be copied is probed as is
        return None


def _classify(rec: _Recorder, out: Any) -> Probe:
    if any(op in _STRUCTURAL for op in rec.ops):
        return Probe(False)
    if not any(op.rstrip("_") in _ACTIVATION_HINTS for op in rec.ops):
        return Probe(False)
    try:
        if rec.error is not None:
            raise _Refused(rec.error)
        lin = rec.lin_of(out)
        if lin is None:
            raise _Refused("its output is not computed from the input by tensor operations")
        return Probe(True, _spec(_chain(lin)))
    except _Refused as exc:
        return Probe(True, None, str(exc))


def recognise(module: nn.Module, x: torch.Tensor, where: str) -> ActivationSpec | None:
    """The module's activation spec; None when it is not an activation at all.

    Raises GraphError naming ``where`` when the module quantizes or clips its
    input but not in the clip-floor-shift form.
    """
    probe = probe_module(module, x)
    if not probe.is_activation:
        return None
    if probe.spec is None:
        raise GraphError(f"{type(module).__name__} '{where}' is not a recognised "
                         f"clip-floor-shift activation: {probe.reason}")
    return probe.spec


__all__ = ["ActivationSpec", "Probe", "ann_mode", "probe_module", "recognise"]
