"""benchmarks/bench_scale.py: the CPU-flag parsing on this machine's real /proc/cpuinfo,
one tiny real measurement (digits-cnn, batch 8, 2 reps), and the table and JSON built
from it."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import bench_scale as bench
from benchmarks import sj_peer
from benchmarks.bench_simulator import build_case

CPUINFO = Path("/proc/cpuinfo")


@pytest.fixture(scope="module")
def digits_case() -> bench.Case:
    torch.manual_seed(0)
    return build_case("digits-cnn", ["loihi2"], 8, 0.9)


@pytest.mark.skipif(not CPUINFO.is_file(), reason="needs Linux /proc/cpuinfo")
def test_cpu_flags_from_the_real_cpuinfo() -> None:
    text = CPUINFO.read_text()
    info = bench.parse_cpuinfo(text)
    first_flags = next(line for line in text.splitlines()
                       if line.startswith(("flags", "Features"))).split(":", 1)[1].split()
    assert info["flags"] == [f for f in bench.RELEVANT_FLAGS if f in first_flags]
    assert info["processors"] == sum(1 for line in text.splitlines()
                                     if line.split(":")[0].strip() == "processor")
    assert info["int8_dot_product"] == any(f in first_flags for f in
                                           ("avx512_vnni", "avx_vnni", "amx_int8"))
    model = next(line for line in text.splitlines() if line.startswith("model name"))
    assert info["cpu"] == model.split(":", 1)[1].strip()
    # a later processor's flags do not count; a flag's prefix is not the flag
    second = "\n\nprocessor\t: 99\nflags\t\t: avx512f avx512_vnni amx_int8\n"
    assert bench.parse_cpuinfo(text + second)["flags"] == info["flags"]
    assert bench.parse_cpuinfo("flags : avx512 avx512_vnnix avx2\n")["flags"] == ["avx2"]
    assert bench.parse_cpuinfo("") == {"cpu": "unknown", "processors": 0, "flags": [],
                                       "int8_dot_product": False}


def test_header_has_what_the_numbers_depend_on() -> None:
    head = bench.machine_header()
    assert head["cores"] == os.cpu_count()
    assert head["torch"] == torch.__version__
    assert len(head["load_average"]) == 3
    assert head["date"][:4].isdigit()


def test_kernel_choice_is_described_per_kernel() -> None:
    assert bench.describe_kernel_choice(None).startswith("n/a")
    assert bench.describe_kernel_choice({"a": "float32", "b": "int8", "c": "float32"}
                                        ) == "float32 x2, int8 x1"
    assert bench.describe_kernel_choice("float") == "float"


def test_tiny_measurement_renders_as_table_and_json(digits_case: bench.Case,
                                                    tmp_path: Path) -> None:
    row = bench.simulator_row(digits_case, "loihi2", reps=2)
    assert row.arch == "digits-cnn" and row.batch == 8
    assert row.ann_ms > 0 and row.sim_t1_ms > 0 and row.sim_t4_ms > 0
    assert row.ratio_t1 > 0 and row.ratio_t4 > 0
    assert 0 < row.rate_t1 <= 1
    missing, why = sj_peer.load_spikingjelly(str(tmp_path / "no-sj"))
    lava = bench.LavaRow("digits-cnn", "2 workers", 2, 16, 4, 8.0, 0.5, 2.0, True)
    report = bench.Report({**bench.machine_header(), "load_average_end": [1.0, 2.0, 3.0]},
                          {"batch": 8, "reps": 2}, [row], [sj_peer.SJRow("digits-cnn", why)],
                          [lava], [], [bench.gpu_note() or "GPU measured"])
    text = bench.render(report)
    assert f"{row.ratio_t1:.2f}" in text and f"{row.ratio_t4:.2f}" in text
    assert "digits-cnn" in text and "2 workers" in text and "0.5" in text
    assert row.kernel_choice in text
    if hasattr(bench.Simulator(digits_case.graphs["loihi2"]), "kernel_choice"):
        # the automatic choice, per projection: e.g. "float32 x3, int8 x2"
        counts = [int(part.rsplit(" x", 1)[1]) for part in row.kernel_choice.split(", ")]
        assert 1 <= sum(counts) <= len(digits_case.graphs["loihi2"].projections)
    assert "-> [1.0, 2.0, 3.0] at the end" in text
    if missing is None:
        assert "not installed" in text and sj_peer.SJ_HINT in why
    if not torch.cuda.is_available():
        assert "no GPU: not measured" in text
    path = tmp_path / "scale.json"
    bench.write_text_atomic(path, report.to_json())
    data = json.loads(path.read_text())
    assert data["simulator"][0]["ratio_t1"] == row.ratio_t1
    assert data["lava"][0]["samples_per_s"] == 2.0
    assert data["machine"]["flags"] == report.machine["flags"]


@pytest.mark.skipif(not sj_peer.SJ_DEFAULT.is_dir(),
                    reason=f"SpikingJelly scratch env absent ({sj_peer.SJ_HINT})")
def test_spikingjelly_network_is_the_same_network(digits_case: bench.Case) -> None:
    sj, version = sj_peer.load_spikingjelly(str(sj_peer.SJ_DEFAULT))
    assert sj is not None, version
    r = sj_peer.sj_row(digits_case, "loihi2", sj, version, reps=1)
    assert r.status == "measured" and r.ratio is not None and r.ratio > 0
    assert r.agree_with_float_if is not None and r.agree_with_float_if >= 0.75
    assert r.rate_sj is not None and r.rate_ours is not None
    assert np.isclose(r.rate_sj, r.rate_ours, rtol=0.25)
