"""Hardware profiles (SPEC section 5): bit widths and arithmetic rules.

A profile fixes how one neuron group's integer state advances by one step
(SPEC section 4). With ``acc`` the summed integer synaptic input of the step
(each projection's sum ``sum(w * s)`` already shifted by its ``weight_exp``),
everything in membrane units::

    u <- current(acc)          = wrap_current(acc << act_shift)   # loihi2: 24-bit wrap
    v <- saturate(v + u + bias)                                 # loihi2: +-(2**23 - 1)
    s <- v > v_th  (strict)   or   v >= v_th
    v <- v - s * v_th  (subtract)   or   v <- 0 where s  (zero)

``loihi2`` follows lava-nc 0.10's fixed-point models (read from
``lava/proc/lif/models.py`` ``AbstractPyLifModelFixed`` and
``lava/proc/dense/models.py`` ``PyDenseModelBitAcc``): weights are Lava's
mixed-sign 8-bit values (an 8-bit signed mantissa ``m`` stored as ``2 * m``,
range -256..254, which Lava's ``clip_weights``/``truncate_weights`` keep
unchanged), synaptic input is shifted left by 6, the current wraps once at
24 bits (``u > 2**23 -> u - 2**24``, ``u <= -2**23 -> u + 2**24``), the
voltage saturates at +-(2**23 - 1), the threshold is a 17-bit unsigned mantissa
shifted left by 6 and the bias a 13-bit signed mantissa shifted left by a 3-bit
exponent (0..7). The quantizer only emits ``weight_exp = 0`` because Lava's
fixed-point ``Conv`` model ignores the weight exponent; a graph read from a file may
carry one within the profile's ``weight_exp_min..weight_exp_max`` (loihi2: -8..7,
Loihi's 4-bit signed weight exponent; Lava's Python model would take any int, the
chip does not).

``int8`` / ``int16`` are ideal integer IF neurons: that many weight bits, no
current stage, a 32-bit saturating membrane and a ``>=`` comparison.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from csqcfs_deploy.errors import UsageError


@dataclass(frozen=True)
class Profile:
    """Bit widths and rules of one target. All limits are inclusive."""

    name: str
    description: str
    weight_bits: int          # signed mantissa bits of a stored weight
    weight_step: int          # a stored weight is weight_step * mantissa
    act_shift: int            # synaptic input is shifted left by this into the current
    current_bits: int | None  # wrapping current register width (None: no current stage)
    voltage_bits: int         # saturating membrane width
    threshold_mant_bits: int  # unsigned threshold mantissa bits (threshold = mant << act_shift)
    bias_mant_bits: int       # signed bias mantissa bits
    bias_exp_max: int         # bias = mant << exp, 0 <= exp <= bias_exp_max
    strict: bool              # True: spike when v > v_th; False: v >= v_th
    per_channel_threshold: bool
    input_bits: int           # width of the integer input (graded spikes)
    weight_exp_min: int       # a projection's weight_exp range (inclusive)
    weight_exp_max: int

    # ---- ranges -----------------------------------------------------------
    @property
    def weight_max(self) -> int:
        """Largest stored weight magnitude (positive side)."""
        return (int(2 ** (self.weight_bits - 1)) - 1) * self.weight_step

    @property
    def weight_min(self) -> int:
        return -int(2 ** (self.weight_bits - 1)) * self.weight_step

    @property
    def threshold_unit(self) -> int:
        """Membrane units per threshold mantissa unit (and per synaptic unit)."""
        return 1 << self.act_shift

    @property
    def threshold_mant_max(self) -> int:
        return int(2**self.threshold_mant_bits) - 1

    @property
    def voltage_max(self) -> int:
        return int(2 ** (self.voltage_bits - 1)) - 1

    @property
    def voltage_min(self) -> int:
        # lava saturates symmetrically at +-(2**23 - 1); the ideal profiles use the
        # full two's-complement range of their membrane register.
        if self.current_bits is not None:
            return -self.voltage_max
        return -int(2 ** (self.voltage_bits - 1))

    @property
    def bias_mant_max(self) -> int:
        return int(2 ** (self.bias_mant_bits - 1)) - 1

    @property
    def bias_max(self) -> int:
        return self.bias_mant_max << self.bias_exp_max

    def bias_representable(self, bias: int) -> bool:
        """True when ``bias`` equals ``mant << exp`` for an allowed mantissa and exponent."""
        if abs(bias) > self.bias_max:
            return False
        for exp in range(self.bias_exp_max + 1):
            if bias % (1 << exp) == 0 and abs(bias >> exp) <= self.bias_mant_max:
                return True
        return False

    def encode_bias(self, bias: int) -> tuple[int, int]:
        """(mantissa, exponent) with the smallest exponent that represents ``bias``."""
        for exp in range(self.bias_exp_max + 1):
            if bias % (1 << exp) == 0 and abs(bias >> exp) <= self.bias_mant_max:
                return bias >> exp, exp
        raise ValueError(f"bias {bias} is not representable in profile {self.name}")

    def round_bias(self, bias: float) -> int:
        """Nearest representable bias to a real value (no range check)."""
        for exp in range(self.bias_exp_max + 1):
            mant = round(bias / (1 << exp))
            if abs(mant) <= self.bias_mant_max:
                return mant << exp
        return round(bias / (1 << self.bias_exp_max)) << self.bias_exp_max

    # ---- arithmetic (torch, int64 tensors) ---------------------------------
    def current(self, acc: torch.Tensor) -> torch.Tensor:
        """Synaptic input of one step -> current in membrane units (wraps once)."""
        u = acc * (1 << self.act_shift) if self.act_shift else acc
        if self.current_bits is None:
            return u
        half = 1 << (self.current_bits - 1)
        u = torch.where(u > half, u - 2 * half, u)
        return torch.where(u <= -half, u + 2 * half, u)

    def saturate(self, v: torch.Tensor) -> torch.Tensor:
        """Clamp a membrane to the profile's voltage range."""
        return torch.clamp(v, self.voltage_min, self.voltage_max)

    def fires(self, v: torch.Tensor, v_th: torch.Tensor) -> torch.Tensor:
        """Spike condition as a bool tensor."""
        return v > v_th if self.strict else v >= v_th


PROFILES: dict[str, Profile] = {
    "loihi2": Profile(
        name="loihi2",
        description="lava-nc fixed point: 8-bit weights (x2), <<6, 24-bit wrap/sat, v > th",
        weight_bits=8, weight_step=2, act_shift=6, current_bits=24, voltage_bits=24,
        threshold_mant_bits=17, bias_mant_bits=13, bias_exp_max=7, strict=True,
        per_channel_threshold=True, input_bits=8, weight_exp_min=-8, weight_exp_max=7,
    ),
    "int8": Profile(
        name="int8",
        description="ideal integer IF: 8-bit weights, 32-bit membrane, v >= th",
        weight_bits=8, weight_step=1, act_shift=0, current_bits=None, voltage_bits=32,
        threshold_mant_bits=31, bias_mant_bits=32, bias_exp_max=0, strict=False,
        per_channel_threshold=True, input_bits=8, weight_exp_min=-31, weight_exp_max=31,
    ),
    "int16": Profile(
        name="int16",
        description="ideal integer IF: 16-bit weights, 32-bit membrane, v >= th",
        weight_bits=16, weight_step=1, act_shift=0, current_bits=None, voltage_bits=32,
        threshold_mant_bits=31, bias_mant_bits=32, bias_exp_max=0, strict=False,
        per_channel_threshold=True, input_bits=16, weight_exp_min=-31, weight_exp_max=31,
    ),
}


def get_profile(name: str) -> Profile:
    """Look up a profile by name; UsageError lists the known ones."""
    try:
        return PROFILES[name]
    except KeyError:
        raise UsageError(
            f"unknown profile {name!r} (known: {', '.join(sorted(PROFILES))})"
        ) from None
