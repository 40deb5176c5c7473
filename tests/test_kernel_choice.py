"""The integer simulator's kernel choice by measurement (``kernel="auto"``, issue 15 item 2).

Every kernel is exact, so ``auto``, ``float`` and ``int8`` must agree bit for bit
whatever the clock says; the clock (the simulator's ``timer`` argument) only
decides which one runs. Deterministic clocks force a choice: one whose every
interval is shorter than the one before makes the last candidate timed the
fastest (int8 where it is exact), one whose intervals grow makes the first (the
layer's own float kernel) the fastest.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from csqcfs_deploy.cli import main
from csqcfs_deploy.ir import IdentityProjection, IFGraph
from csqcfs_deploy.ir.ifg import save_graph
from csqcfs_deploy.ir.schedule import RunConfig
from csqcfs_deploy.run.evaluation import evaluate
from csqcfs_deploy.run.shards import Shard, merge_evaluations
from csqcfs_deploy.simulators.integer import Simulator
from csqcfs_deploy.simulators.integer.kernels import (
    CANDIDATE_ORDER,
    Candidate,
    KernelChooser,
    probe_rows,
)
from csqcfs_deploy.train.datasets import Dataset

from .conftest import random_integer_input
from .test_simulator import assert_same, random_graph, random_input


def shrinking_clock() -> Callable[[], float]:
    """A clock whose every interval is shorter than the one before (1, 1/2, 1/3, ...)."""
    state = {"t": 0.0, "k": 0}

    def now() -> float:
        state["k"] += 1
        state["t"] += 1.0 / state["k"]
        return state["t"]
    return now


def growing_clock() -> Callable[[], float]:
    """A clock whose every interval is longer than the one before (1, 3, 5, ...)."""
    state = {"k": 0}

    def now() -> float:
        state["k"] += 1
        return float(state["k"] ** 2)
    return now


def counting(clock: Callable[[], float]) -> tuple[Callable[[], float], list[int]]:
    """``clock`` and a one-element list counting its calls."""
    calls = [0]

    def now() -> float:
        calls[0] += 1
        return clock()
    return now, calls


def graphs(digits_graphs: dict[str, IFGraph]) -> list[tuple[str, IFGraph, torch.Tensor]]:
    """The trained digits-cnn (loihi2, int8) and random conv / dense graphs with pooling
    and a residual identity shortcut (small and big weights: int8 exact or not)."""
    out = [(f"digits-{p}", digits_graphs[p], random_integer_input(digits_graphs[p], 6, 0))
           for p in ("loihi2", "int8")]
    for seed, profile, big, conv in ((1, "loihi2", False, True), (2, "int8", False, True),
                                     (3, "int8", True, True), (4, "int16", False, False),
                                     (5, "loihi2", False, False)):
        g = random_graph(seed, profile, True, big, conv)
        out.append((f"random-{seed}", g, random_input(g, 4, seed, big)))
    return out


def test_auto_float_and_int8_agree_bit_for_bit_whatever_is_chosen(
        digits_graphs: dict[str, IFGraph]) -> None:
    for label, g, x in graphs(digits_graphs):
        for cfg in (RunConfig(1), RunConfig(2, 1, record=True)):
            want = Simulator(g, kernel="float").run(x, cfg)
            for kernel, timer in (("int8", None), ("auto", None), ("auto", shrinking_clock()),
                                  ("auto", growing_clock())):
                sim = (Simulator(g, kernel=kernel) if timer is None  # type: ignore[arg-type]
                       else Simulator(g, timer=timer))
                got = sim.run(x, cfg)
                assert_same(got, want)
                assert got.wrapped == want.wrapped and got.saturated == want.saturated, label


def test_the_clock_forces_each_candidate_and_int8_only_where_exact(
        digits_graphs: dict[str, IFGraph]) -> None:
    chosen_anywhere: set[str] = set()
    for label, g, x in graphs(digits_graphs):
        cfg = RunConfig(2)
        late, early = Simulator(g, timer=shrinking_clock()), Simulator(g, timer=growing_clock())
        late.run(x, cfg)
        early.run(x, cfg)
        x_abs = float(x.abs().max())
        for p in g.projections:
            last, first = late.kernel_choice[p.name], early.kernel_choice[p.name]
            assert last.chosen in CANDIDATE_ORDER and first.chosen in CANDIDATE_ORDER
            src_max = x_abs if p.src == g.input.name else 1.0
            exact8 = late.synapses.int8_exact(p, src_max)
            if isinstance(p, IdentityProjection):  # elementwise: one candidate, not timed
                assert last.ms == {} and last.chosen == first.chosen
                continue
            # the native kernel (what kernel="float" runs) wins on the growing clock
            assert first.chosen in ("float32", "float64")
            floats = {"float32", "float64"} if first.chosen == "float32" else {"float64"}
            candidates = floats | ({"int8"} if exact8 else set())
            timed = candidates if len(candidates) > 1 else set()  # one: not measured
            assert set(last.ms) == timed, (label, p.name, last)
            if exact8:
                assert last.chosen == "int8", (label, p.name, last)
            else:
                assert last.chosen == "float64", (label, p.name, last)
            chosen_anywhere |= {last.chosen, first.chosen}
    assert chosen_anywhere == {"float32", "float64", "int8"}


def test_a_choice_is_measured_once_per_projection_rows_and_dtype(
        digits_graphs: dict[str, IFGraph]) -> None:
    g = digits_graphs["loihi2"]
    x = random_integer_input(g, 8, 1)
    timer, calls = counting(shrinking_clock())
    sim = Simulator(g, timer=timer)
    first = sim.run(x, RunConfig(1))
    after_first = calls[0]
    assert after_first > 0
    again = sim.run(x, RunConfig(1))  # the same shapes: nothing timed
    assert calls[0] == after_first
    assert torch.equal(first.readout, again.readout)
    assert first.kernels == again.kernels
    assert first.kernels is not None and set(first.kernels) == {p.name for p in g.projections}
    sim.run(x[:5], RunConfig(1))  # a short batch: new rows, measured again
    assert calls[0] > after_first
    # the losers' weight layouts are dropped after a measurement
    for p in g.projections:
        chosen = {c.chosen for k, c in sim.synapses.chooser.choices.items() if k[0] == p.name}
        held = {str(dt).removeprefix("torch.") for name, dt in sim.synapses._weights
                if name == p.name}
        assert held <= chosen, (p.name, held, chosen)


def test_a_slow_candidate_costs_one_call_on_a_small_slice() -> None:
    """Candidates that cost 1, 3 and 50 time units per row on a virtual clock: the
    50x one is called once, on 1/64 of the rows; the reference (first) is timed on
    all rows; the estimates scale the slice's time to all rows."""
    clock = {"t": 0.0}
    calls: dict[str, list[int]] = {"float32": [], "float64": [], "int8": []}

    def make(name: str) -> Candidate:
        cost = {"float32": 1.0, "float64": 3.0, "int8": 50.0}[name]

        def sums(rows: int) -> torch.Tensor:
            calls[name].append(rows)
            clock["t"] += cost * rows
            return torch.full((rows, 2), 7.0)
        return Candidate(name, sums)

    chooser = KernelChooser(lambda: clock["t"])
    rows = 256
    assert probe_rows(rows) == [4, 32]
    out, choice = chooser.sums(("p", rows, torch.float32, CANDIDATE_ORDER), rows,
                               CANDIDATE_ORDER, make)
    assert choice.chosen == "float32" and torch.equal(out, torch.full((rows, 2), 7.0))
    assert calls["int8"] == [4]
    assert calls["float64"] == [4]
    assert calls["float32"] == [4, 4, rows]  # the only one left after 4 rows: one call
    assert choice.ms == {"float32": 1e3 * rows, "float64": 3e3 * rows, "int8": 50e3 * rows}
    assert choice.rows == {"float32": rows, "float64": 4, "int8": 4}
    # known key: only the chosen kernel is made and called
    chooser.sums(("p", rows, torch.float32, CANDIDATE_ORDER), rows, CANDIDATE_ORDER, make)
    assert calls["float32"][-1] == rows and calls["int8"] == [4]


@pytest.fixture(scope="module")
def digits_ifg(digits_graphs: dict[str, IFGraph], tmp_path_factory: pytest.TempPathFactory
               ) -> Path:
    path = tmp_path_factory.mktemp("kernels") / "digits.ifg"
    save_graph(digits_graphs["loihi2"], path)
    return path


def test_run_reports_the_kernels_in_json_and_one_line(
        digits_ifg: Path, digits_graphs: dict[str, IFGraph],
        capsys: pytest.CaptureFixture[str]) -> None:
    names = {p.name for p in digits_graphs["loihi2"].projections}
    assert main(["run", str(digits_ifg), "--samples", "40", "--batch-size", "16",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    kernels = data["kernels"]
    assert set(kernels) == names
    for k in kernels.values():
        assert k["chosen"] in CANDIDATE_ORDER and k["chosen"] in k["ms"]
        assert set(k["ms"]) == set(k["rows"]) and set(k["ms"]) <= set(CANDIDATE_ORDER)
        assert all(v >= 0 for v in k["ms"].values())
    assert main(["run", str(digits_ifg), "--samples", "16"]) == 0
    line = next(s for s in capsys.readouterr().out.splitlines() if s.startswith("kernels:"))
    counts = dict(part.strip().split(" x") for part in
                  line.removeprefix("kernels:").split("(")[0].split(","))
    assert sum(int(v) for v in counts.values()) == len(names)
    assert "(measured)" in line


def test_a_sharded_summary_keeps_the_first_shards_kernels(
        digits_graphs: dict[str, IFGraph], digits: Dataset) -> None:
    g = digits_graphs["loihi2"]
    raw, labels = digits.x_test[:24], digits.y_test[:24]
    cfg = RunConfig(1)
    a = evaluate("int", g, raw[:16], labels[:16], cfg, 16, progress=False)
    b = evaluate("int", g, raw[16:], labels[16:], cfg, 16, progress=False)
    assert a.kernels is not None and b.kernels is not None
    merged = merge_evaluations(g, cfg, [(Shard(0, 2, 0, 16), a), (Shard(1, 2, 16, 24), b)],
                               labels, 1.0)
    assert merged.kernels == a.kernels
    assert np.array_equal(merged.predictions, np.concatenate([a.predictions, b.predictions]))
