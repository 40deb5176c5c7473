"""The integer simulator's kernel choice by measurement (``kernel="auto"``).

Every candidate kernel of a projection computes the same exact integers (the
float kernels below their dtype's exact-integer range, :mod:`.arithmetic`; the
int8 kernel where :meth:`.synapses.Synapses.int8_exact` proves it exact), so the
choice changes speed only, never a result. What is measured, and when:

* **when**: the first time one :class:`~.simulator.Simulator` computes the sums
  of a projection for a given :data:`ChoiceKey` (projection, rows, sum dtype and
  the candidates that are exact for this source): once per projection for a
  run's batch size and steps, again for a short last batch or another T. The
  choice is kept by the simulator's :class:`KernelChooser` for the simulator's
  lifetime (the ``int`` back end keeps one simulator across batches); there is
  no module-level cache. With one candidate nothing is measured.
* **what**: the wall time (``timer``, default :func:`time.perf_counter`) of
  calls of each candidate on the run's actual source values and weights (the
  weights and source conversions are prepared before the clock starts). First
  on slices of the rows (:func:`probe_rows`: 1/64, then 1/8 of them; one call,
  and a second one -- the first may include set-up -- unless it is already more
  than :data:`SLOWER_CAP` times the best on that slice): a candidate more than
  :data:`SLOWER_CAP` times slower than the best one on a slice is dropped there,
  so a kernel 50 times slower than float32 (``_int_mm`` without int8
  dot-product instructions) costs about 1/64 of one call. The first candidate
  (the float kernel in the layer's own sum dtype, what ``kernel="float"`` runs)
  is never dropped on a slice, so a noisy slice cannot make the choice worse
  than it: it is always compared on all rows. The candidates left
  are then timed on all rows: one warm-up call and the min of
  :data:`REPEATS` calls (only the warm-up when one candidate is left, or when
  the warm-up is already :data:`SLOWER_CAP` times the best). The fastest wins
  (ties: the earlier in :data:`CANDIDATE_ORDER`), and the result of one of its
  calls is the sums the run goes on with.
* **reported**: :class:`KernelChoice` -- the chosen kernel and, per candidate
  timed, the milliseconds of one call on all rows (for one dropped on a slice:
  its time on the slice times rows / slice rows, an estimate) and the rows it
  was last timed on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

#: the candidate kernels, in the order they are timed (and ties are broken)
CANDIDATE_ORDER: tuple[str, ...] = ("float32", "float64", "int8")
#: a candidate more than this many times slower than the best so far is dropped
SLOWER_CAP = 2.0
#: timed calls on all rows after the warm-up (the min counts)
REPEATS = 3
#: the probe slices: rows / each of these (rounded up), when fewer than all rows
PROBE_DIVISORS: tuple[int, ...] = (64, 8)

Timer = Callable[[], float]
#: (projection name, rows, sum dtype, names of the exact candidates)
ChoiceKey = tuple[str, int, torch.dtype, tuple[str, ...]]


def _any_rows(rows: int) -> bool:
    return True


@dataclass(frozen=True)
class Candidate:
    """One exact kernel of one projection: ``sums(rows)`` computes the projection's
    sums of the first ``rows`` source rows (in the layer's sum dtype);
    ``accepts(rows)``: the kernel runs on that many rows (``torch._int_mm``'s shape
    rule on CUDA; a candidate passes a probe slice it does not accept untimed)."""

    name: str
    sums: Callable[[int], torch.Tensor]
    accepts: Callable[[int], bool] = _any_rows


@dataclass(frozen=True)
class KernelChoice:
    """The kernel chosen for one projection (``"float32"``, ``"float64"`` or
    ``"int8"``) with, per candidate timed, ``ms``: milliseconds of one call on all
    rows (an estimate from a slice for a candidate dropped there) and ``rows``: the
    rows it was last timed on. Both empty when there was one candidate."""

    chosen: str
    ms: dict[str, float] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)

    @property
    def measured(self) -> bool:
        """The choice was made by measurement (more than one candidate)."""
        return len(self.ms) > 1

    def to_json(self) -> dict[str, object]:
        """``{"chosen": ..., "ms": {candidate: ms}, "rows": {candidate: rows}}``."""
        return {"chosen": self.chosen, "ms": {k: round(v, 3) for k, v in self.ms.items()},
                "rows": dict(self.rows)}


def probe_rows(rows: int) -> list[int]:
    """The probe slices for ``rows`` rows: ``ceil(rows / d)`` for each of
    :data:`PROBE_DIVISORS`, ascending, distinct and fewer than ``rows``."""
    return sorted({-(-rows // d) for d in PROBE_DIVISORS if -(-rows // d) < rows})


class KernelChooser:
    """Chooses and remembers, per :data:`ChoiceKey`, the fastest candidate kernel
    (module docstring: what is measured and when). ``timer``: the clock, seconds as
    a float (default :func:`time.perf_counter`)."""

    def __init__(self, timer: Timer = time.perf_counter) -> None:
        self.timer = timer
        self.choices: dict[ChoiceKey, KernelChoice] = {}

    def sums(self, key: ChoiceKey, rows: int, names: Sequence[str],
             make: Callable[[str], Candidate]) -> tuple[torch.Tensor, KernelChoice]:
        """The sums of all ``rows`` rows by the kernel chosen for ``key``, and the choice.

        ``names``: the exact candidates (at least one, in :data:`CANDIDATE_ORDER`, the
        first being the reference kept to the end of a measurement);
        ``make(name)`` prepares one (weights, converted source values). When ``key``
        is new and there is more than one candidate, all are made and measured now
        (module docstring); otherwise only the chosen one is made and called.
        """
        known = self.choices.get(key)
        if known is None and len(names) == 1:
            known = self.choices[key] = KernelChoice(names[0])
        if known is not None:
            return make(known.chosen).sums(rows), known
        out, choice = self._measure(rows, [make(name) for name in names])
        self.choices[key] = choice
        return out, choice

    def _call(self, candidate: Candidate, rows: int) -> tuple[float, torch.Tensor]:
        """(seconds, sums) of one call of ``candidate`` on ``rows`` rows."""
        start = self.timer()
        out = candidate.sums(rows)
        if out.is_cuda:
            torch.cuda.synchronize(out.device)
        return self.timer() - start, out

    def _probe(self, size: int, alive: list[Candidate]) -> dict[str, float]:
        """Seconds per candidate (that accepts ``size``) on a slice of ``size`` rows."""
        timed: dict[str, float] = {}
        for c in alive:
            if not c.accepts(size):
                continue
            seconds, _ = self._call(c, size)
            if seconds <= SLOWER_CAP * min(timed.values(), default=math.inf):
                seconds = min(seconds, self._call(c, size)[0])
            timed[c.name] = seconds
        return timed

    def _measure(self, rows: int, candidates: Sequence[Candidate]
                 ) -> tuple[torch.Tensor, KernelChoice]:
        """Probe slices, then all rows (module docstring); the winner's sums and the
        choice."""
        alive = list(candidates)
        ms: dict[str, float] = {}
        at: dict[str, int] = {}
        for size in probe_rows(rows):
            if len(alive) == 1:
                break
            timed = self._probe(size, alive)
            if not timed:
                continue
            fastest = min(timed, key=timed.__getitem__)
            for name, seconds in timed.items():
                ms[name], at[name] = 1e3 * seconds * rows / size, size
            alive = [c for c in alive if c is candidates[0] or c.name not in timed
                     or c.name == fastest or timed[c.name] <= SLOWER_CAP * timed[fastest]]
        best: tuple[str, float, torch.Tensor] | None = None
        for c in alive:
            seconds, out = self._call(c, rows)
            if len(alive) > 1 and (best is None or seconds <= SLOWER_CAP * best[1]):
                seconds = min(self._call(c, rows)[0] for _ in range(REPEATS))
            ms[c.name], at[c.name] = 1e3 * seconds, rows
            if best is None or seconds < best[1]:
                best = (c.name, seconds, out)
            del out
        if best is None:  # pragma: no cover - the fastest on a slice stays alive
            raise RuntimeError("no candidate kernel was left to time")
        order = {name: i for i, name in enumerate(CANDIDATE_ORDER)}
        ms = dict(sorted(ms.items(), key=lambda kv: order.get(kv[0], len(order))))
        return best[2], KernelChoice(best[0], ms, {k: at[k] for k in ms})
