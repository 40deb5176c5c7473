"""Sharded runs (``--workers N``, ``--ray local``): the merged output equals one process's.

Real workers throughout: local forkserver processes, a real local Ray cluster of 2 CPUs
(``--ray local``), the real Lava back end. The merge itself is checked on in-process
shards with a fault that makes the first mismatch fall in a later shard.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from csqcfs_deploy.cli import main
from csqcfs_deploy.cli.sharded import GraphRef, VerifyJob, verify_task
from csqcfs_deploy.cli.workers import KILL_SHARD_ENV, LocalPool, Parallel, open_pool
from csqcfs_deploy.convert.fold import fold
from csqcfs_deploy.convert.quantize import quantize
from csqcfs_deploy.errors import InputFileError, UsageError
from csqcfs_deploy.ir import IFGraph
from csqcfs_deploy.ir.ifg import save_graph
from csqcfs_deploy.ir.schedule import RunConfig
from csqcfs_deploy.run.backends import BackendOptions
from csqcfs_deploy.run.reference import input_units
from csqcfs_deploy.run.shards import Shard, merge_verifications, plan_shards
from csqcfs_deploy.run.verify import verify
from csqcfs_deploy.simulators.integer import simulate
from csqcfs_deploy.train.datasets import Dataset
from csqcfs_deploy.train.training import TrainOptions, train


@pytest.fixture(scope="module")
def graph(digits: Dataset) -> IFGraph:
    """digits-cnn trained for 1 epoch (seed 0), folded, quantized to loihi2: a real
    network, and this file does not wait for the session's 40-epoch one."""
    result = train(digits, TrainOptions(epochs=1, progress=False))
    cfg = result.config
    folded = fold(result.model, cfg.input_shape, cfg.encoding, arch=cfg.arch,
                  num_classes=cfg.num_classes)
    return quantize(folded.graph, "loihi2")[0]


@pytest.fixture(scope="module")
def ifg(graph: IFGraph, tmp_path_factory: pytest.TempPathFactory) -> str:
    """:func:`graph` as an .ifg file."""
    path = tmp_path_factory.mktemp("shards") / "digits.ifg"
    save_graph(graph, path)
    return str(path)


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


# --------------------------------------------------------------------------- shards, merge


def test_shards_are_whole_batches_in_order() -> None:
    shards = plan_shards(10, 3, 2)   # 4 batches: 0-2 3-5 | 6-8 9
    assert [(s.start, s.stop) for s in shards] == [(0, 6), (6, 10)]
    assert plan_shards(5, 8, 4) == [Shard(0, 1, 0, 5)]          # one batch: one shard
    assert [(s.start, s.stop) for s in plan_shards(7, 1, 3)] == [(0, 3), (3, 5), (5, 7)]
    assert plan_shards(10, 3, 2)[1].describe() == "shard 2 of 2 (samples 6..9)"
    with pytest.raises(UsageError):
        plan_shards(0, 3, 2)


def test_merged_verification_equals_one_process_with_a_late_first_mismatch(
        graph: IFGraph, digits: Dataset) -> None:
    """norse runs a graph with one act14 neuron's weights raised; the first samples show
    no fault, so the first mismatch is found in shard 2 and must keep its sample index."""
    x = input_units(graph, digits.x_test[:60])
    cfg = RunConfig(2, record=True)
    base = simulate(graph, x, cfg).spikes
    assert base is not None
    proj = next(p for p in graph.projections if p.dst == "act14")
    found = None
    for neuron, delta in ((n, d) for d in (2, 6, 20) for n in range(proj.weight.shape[0])):
        w = proj.weight.copy()
        w[neuron] = np.clip(w[neuron] + delta, -256, 254)
        faulty = graph.replace(projections=tuple(
            dataclasses.replace(p, weight=w) if p is proj else p for p in graph.projections))
        alt = simulate(faulty, x, cfg).spikes
        assert alt is not None
        differs = (base["act14"] != alt["act14"]).flatten(2).any(2).any(0)
        clean, hit = torch.nonzero(~differs).flatten()[:4], torch.nonzero(differs).flatten()[:2]
        if len(clean) == 4 and len(hit) == 2:
            found = faulty
            break
    assert found is not None, "no weight fault changes some samples and not others"
    xs = x[torch.cat([clean, hit])]
    one = verify(graph, xs, 2, 0, ["int", "norse"], batch_size=2, progress=False,
                 graphs={"norse": found})
    shards = plan_shards(len(xs), 2, 2)
    assert [(s.start, s.stop) for s in shards] == [(0, 4), (4, 6)]
    parts = [(s, verify(graph, xs[s.start:s.stop], 2, 0, ["int", "norse"], batch_size=2,
                        progress=False, graphs={"norse": found})) for s in shards]
    merged = merge_verifications(parts, len(xs))
    assert merged == one and merged.to_json() == one.to_json()
    first = merged.first_mismatch
    assert first is not None and first.sample >= 4 and parts[0][1].first_mismatch is None
    assert parts[1][1].first_mismatch == dataclasses.replace(first, sample=first.sample - 4)
    with pytest.raises(UsageError, match="cover"):
        merge_verifications(parts[:1], len(xs))


# --------------------------------------------------------------------------- CLI, Lava


LAVA_ARGS = ("--backends", "int,lava", "--samples", "4", "--batch-size", "2", "--json")


def test_verify_workers_and_ray_equal_one_process_with_lava(
        ifg: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, one, _ = _cli(capsys, "verify", ifg, *LAVA_ARGS)
    data = json.loads(one)
    assert code == 0 and data["identical"] and data["samples"] == 4
    assert data["compared"]["lava"]["samples"] == 4 and data["compared"]["lava"]["compared"] > 0
    code2, two, _ = _cli(capsys, "verify", ifg, *LAVA_ARGS, "--workers", "2")
    assert code2 == 0 and two == one
    code3, on_ray, _ = _cli(capsys, "verify", ifg, *LAVA_ARGS, "--ray", "local")
    assert code3 == 0 and on_ray == one


def test_a_killed_worker_names_its_shard(ifg: str, capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KILL_SHARD_ENV, "1")
    code, out, err = _cli(capsys, "verify", ifg, *LAVA_ARGS, "--workers", "2")
    assert code == 10 and out == ""
    assert err.strip().splitlines()[-1] == (
        "error: the worker for shard 2 of 2 (samples 2..3) died (killed or crashed: out of "
        "memory, a signal, or a fault in a native library)")


def test_a_worker_error_names_its_shard(graph: IFGraph, ifg: str, tmp_path: Path) -> None:
    """The worker of shard 2 cannot read its graph file: the parent raises the same error
    naming shard 2, with local workers and with Ray tasks (a real local cluster, 2 CPUs)."""
    x = input_units(graph, np.zeros((2, 1, 8, 8), dtype=np.float32)).numpy()
    refs = [GraphRef(path=ifg), GraphRef(path=str(tmp_path / "gone.ifg"))]
    jobs = [VerifyJob(s, ref, x[s.start:s.stop], 1, 0, ("int",), 1, BackendOptions())
            for s, ref in zip(plan_shards(2, 1, 2), refs, strict=True)]
    pattern = r"^shard 2 of 2 \(samples 1..1\): IF graph file not found: .*gone\.ifg$"
    with pytest.raises(InputFileError, match=pattern):
        LocalPool(2).map(verify_task, jobs, 2, "verify", False)
    with open_pool(Parallel(2, "local")) as pool, pytest.raises(InputFileError, match=pattern):
        pool.map(verify_task, jobs, 2, "verify", False)


# --------------------------------------------------------------------------- run, sweep, report


def _without_times(text: str) -> dict[str, object]:
    data = json.loads(text)
    rows = data.get("rows", [data])
    for row in rows:
        row.pop("seconds"), row.pop("throughput", None), row.pop("kernels", None)  # measured
    return data


def test_run_sweep_and_report_workers_equal_one_process(
        ifg: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ("--samples", "90", "--batch-size", "16")
    for cmd in (["run", ifg, "-T", "2", "-P", "1", *base, "--json"],
                ["sweep", ifg, "-T", "1,2", *base, "--json"]):
        code, one, _ = _cli(capsys, *cmd)
        code2, two, _ = _cli(capsys, *cmd, "--workers", "2")
        assert code == code2 == 0
        assert _without_times(two) == _without_times(one)
    assert json.loads(one)["samples"] == 90
    paths = [tmp_path / "one.json", tmp_path / "two.json"]
    for path, extra in zip(paths, ([], ["--workers", "3"]), strict=True):
        assert _cli(capsys, "report", ifg, *base, "-T", "2", "--json", str(path), *extra)[0] == 0
    assert paths[0].read_text() == paths[1].read_text()
    assert json.loads(paths[0].read_text())["samples"] == 90


def test_ray_missing_is_one_line(ifg: str, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed: import raises
    code, _, err = _cli(capsys, "run", ifg, "--samples", "4", "--ray", "local", "--json")
    assert code == 5
    assert err.strip().splitlines()[-1].startswith("error: --ray needs Ray, which is not "
                                                   "installed: install the 'ray' extra")
