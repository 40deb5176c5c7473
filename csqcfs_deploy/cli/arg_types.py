"""``type=`` validators for numeric command-line options.

argparse calls these on the option's text; each returns the value or raises
:class:`argparse.ArgumentTypeError`, which argparse prints as its one usage
error naming the option (``argument --batch-size: must be an integer >= 1,
got '0'``). Non-finite floats (``nan``, ``inf``) are refused everywhere.

Limits, and why:

* :data:`MAX_STEPS` (4096) bounds ``--timesteps`` and ``--presim``: every back
  end holds all steps of a batch at once (the integer simulator keeps a
  float32 (steps x batch, neurons) tensor per layer), so 10**6 steps would ask
  for terabytes before anything runs. CS-QCFS networks reach their accuracy
  in a handful of steps (QCFS papers report T <= 64); 4096 leaves ample room.
* :data:`MAX_LEVELS` (1024, :mod:`csqcfs_deploy.train.model_config`) bounds
  ``--levels``: QCFS uses L = 1..16.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from csqcfs_deploy.train.model_config import MAX_LEVELS

#: most counted or pre-simulation steps an option accepts (see the module doc)
MAX_STEPS = 4096
#: largest seed (numpy's and torch's generators take seeds in 0 .. 2**32 - 1 and up)
MAX_SEED = 2**32 - 1


def _integer(text: str) -> int:
    try:
        return int(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _number(text: str) -> float:
    try:
        value = float(str(text).strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def int_in(minimum: int, maximum: int | None = None, why: str = ""
           ) -> Callable[[str], int]:
    """A validator of integers in ``minimum..maximum`` (no upper bound when None);
    ``why`` is appended to the message about the upper bound."""

    def parse(text: str) -> int:
        value = _integer(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(
                f"must be an integer <= {maximum}{why}, got {text!r}")
        return value

    return parse


def float_in(minimum: float, maximum: float | None = None, *, open_min: bool = False
             ) -> Callable[[str], float]:
    """A validator of finite floats ``>= minimum`` (``> minimum`` with ``open_min``) and
    ``<= maximum``."""

    def parse(text: str) -> float:
        value = _number(text)
        if (value <= minimum) if open_min else (value < minimum):
            relation = ">" if open_min else ">="
            raise argparse.ArgumentTypeError(f"must be a number {relation} {minimum:g}, "
                                             f"got {text!r}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be a number <= {maximum:g}, got {text!r}")
        return value

    return parse


_STEPS_WHY = " (all steps of a batch are held at once; see csqcfs_deploy.cli.arg_types)"

#: an integer >= 1 (batch sizes, sample counts, epochs, classes)
positive_int = int_in(1)
#: counted steps T: 1 .. MAX_STEPS
timesteps = int_in(1, MAX_STEPS, _STEPS_WHY)
#: pre-simulation steps P: 0 .. MAX_STEPS
presim_steps = int_in(0, MAX_STEPS, _STEPS_WHY)
#: quantization levels L: 1 .. MAX_LEVELS
levels = int_in(1, MAX_LEVELS, " (QCFS uses 1..16)")
#: a random seed: 0 .. MAX_SEED
seed = int_in(0, MAX_SEED)
#: a finite number > 0 (learning rates, margins)
positive_float = float_in(0.0, open_min=True)
#: a percentage: 0 .. 100
percent = float_in(0.0, 100.0)


def phi(text: str) -> float:
    """The QCFS shift phi: a finite number in [0, 1)."""
    value = _number(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}")
    return value


def step_list(minimum: int) -> Callable[[str], tuple[int, ...]]:
    """A validator of comma-separated steps, each in ``minimum..MAX_STEPS``, duplicates
    dropped in order (``--timesteps 1,2,4`` of sweep)."""
    one = int_in(minimum, MAX_STEPS, _STEPS_WHY)

    def parse(text: str) -> tuple[int, ...]:
        items = [item.strip() for item in str(text).split(",")]
        if not all(items):
            raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {text!r}")
        values: list[int] = []
        for item in items:
            try:
                value = one(item)
            except argparse.ArgumentTypeError as exc:
                raise argparse.ArgumentTypeError(f"{exc} (in {text!r})") from None
            if value not in values:
                values.append(value)
        return tuple(values)

    return parse
