"""benchmarks/fidelity.py reads ``run --json``'s "fidelity" object and prints issue 12's
table. The CLI output here is a hand-written sample of that JSON contract."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from benchmarks import fidelity as bench

SAMPLE = {
    "backend": "int", "schedule": "synchronous", "accuracy": 0.9, "samples": 200,
    "timesteps": 16, "presim": 0,
    "readout": {"name": "p14", "neurons": 10, "wrapped": 0, "saturated": 3},
    "fidelity": {
        "samples": 200, "timesteps": 16, "presim": 0, "schedule": "synchronous",
        "source_accuracy": 0.985, "float_if_accuracy": 0.97, "snn_accuracy": 0.965,
        "quantization_fidelity": 0.9875, "source_agreement": 0.9625,
        "quantized_ann": None, "not_measured": None,
        "wrapped": {"p0": 5, "p3": 2, "p14": 0}, "saturated": {"p0": 1, "p14": 3},
        "readout_saturated": 3,
        "gates": {"min_agreement": 99.0, "min_source_agreement": None, "passed": False,
                  "failures": ["fidelity 98.75 % < 99 %"]},
    },
}


def _job(label: str = "vgg16_L8", profile: str = "loihi2", t: int = 16,
         variant: str = "after") -> bench.Job:
    spec = bench.ModelSpec(label, (f"/tmp/models12/{label}.pt",))
    return bench.Job(spec, profile, t, 0, variant, 200, "digits32")


def _doc(**fid: object) -> str:
    doc = copy.deepcopy(SAMPLE)
    doc["fidelity"].update(fid)  # type: ignore[attr-defined]
    return json.dumps(doc)


def test_parse_reads_every_figure_and_counts_the_readout_once() -> None:
    f = bench.parse_run_json(json.dumps(SAMPLE))
    assert f.samples == 200
    assert f.source_agreement == 0.9625 and f.quantization_fidelity == 0.9875
    assert (f.source_accuracy, f.float_if_accuracy, f.snn_accuracy) == (0.985, 0.97, 0.965)
    assert f.wrapped == 7
    assert f.saturated == 4  # the map names the readout p14: its 3 are not added again
    assert f.readout_saturated == 3
    assert f.gate_passed is False


def test_parse_adds_the_readout_when_the_map_does_not_name_it() -> None:
    f = bench.parse_run_json(_doc(saturated={"p0": 1}, wrapped=None, source_accuracy=None,
                                  source_agreement=None))
    assert f.saturated == 4
    assert f.wrapped is None and f.source_agreement is None and f.source_accuracy is None


@pytest.mark.parametrize("text, message", [
    ("error: nope", "no JSON"),
    (json.dumps({"accuracy": 0.5}), "no \"fidelity\" object"),
    (_doc(snn_accuracy=97.0), "fidelity.snn_accuracy must be a fraction"),
    (_doc(wrapped={"p0": "many"}), "fidelity.wrapped must map"),
])
def test_parse_refuses_what_is_not_the_contract(text: str, message: str) -> None:
    with pytest.raises(bench.BenchError, match=message):
        bench.parse_run_json(text)


def test_a_failed_gate_still_gives_a_row_and_a_crash_gives_the_error_line() -> None:
    gated = bench.row_of(_job(), 9, json.dumps(SAMPLE), "error: fidelity gate failed\n", 1.0)
    assert gated.exit_code == 9 and gated.figures is not None
    assert gated.figures.quantization_fidelity == 0.9875
    crashed = bench.row_of(_job(), 4, "", "progress\nerror: layer p0: bias beyond 13 bits\n",
                           1.0)
    assert crashed.figures is None and crashed.error == "error: layer p0: bias beyond 13 bits"


def test_commands_of_before_and_after() -> None:
    before, after = _job(variant="before").command(), _job(variant="after").command()
    assert before[:3] == [bench.CLI, "run", "/tmp/models12/vgg16_L8.pt"]
    assert before[-6:] == ["--scales", "weights", "--min-agreement", "0", "--samples", "200"]
    assert "--scales" not in after and "--min-agreement" not in after
    assert after[after.index("-T") + 1] == "16" and after[after.index("--profile") + 1] == "loihi2"


def test_table_prints_figures_exit_code_and_the_command() -> None:
    rows = [bench.row_of(_job(variant="before"), 0, json.dumps(SAMPLE), "", 2.0),
            bench.row_of(_job(variant="after"), 4, "", "error: does not fit\n", 2.0)]
    lines = bench.table(rows).splitlines()
    assert len(lines) == 4
    assert lines[2].startswith("| vgg16_L8 | loihi2 | 16 | 0 | before | 96.25 | 98.75 | "
                               "98.50 | 97.00 | 96.50 | 4 | 3 | 7 | 0 |")
    assert "--scales weights --min-agreement 0" in lines[2]
    assert "error: does not fit" in lines[3] and "| 4 |" in lines[3]


def test_done_when_compares_loihi2_with_int16() -> None:
    int16 = bench.row_of(_job(profile="int16", t=1), 0,
                         _doc(source_agreement=0.99, quantization_fidelity=1.0), "", 1.0)
    close = bench.row_of(_job(t=1), 0, _doc(source_agreement=0.9875, quantization_fidelity=0.995,
                                            readout_saturated=0), "", 1.0)
    text = bench.done_when([int16, close])
    assert "| vgg16_L8 | 1 | 0 | 99.00 | 98.75 | 0.25 (<= 0.5) | 99.50 | 0 | yes |" in text
    far = bench.row_of(_job(t=1), 0, _doc(source_agreement=0.98, quantization_fidelity=0.995),
                       "", 1.0)
    assert bench.done_when([int16, far]).rstrip().endswith("| NO |")
    hi16 = bench.row_of(_job(profile="int16"), 0, json.dumps(SAMPLE), "", 1.0)
    sat = bench.row_of(_job(), 0, _doc(quantization_fidelity=0.995), "", 1.0)  # readout 3
    assert bench.done_when([hi16, sat]).rstrip().endswith("| NO |")
    assert bench.done_when([hi16]) == ""


def test_discover_models(tmp_path: Path) -> None:
    (tmp_path / "resnet20_L8.pt").write_bytes(b"")
    (tmp_path / "refvgg.pth").write_bytes(b"")
    args = {"arch": "vgg", "convention": "thresh-if", "in_channels": 3, "spatial": 32}
    (tmp_path / "refvgg.json").write_text(json.dumps(
        {"model": "tests.refnets:build", "model_args": args, "weights": "refvgg.pth"}))
    specs = bench.discover_models(tmp_path)
    assert [s.label for s in specs] == ["resnet20_L8", "refvgg"]
    assert specs[1].args == ("--model", "tests.refnets:build", "--model-args",
                             json.dumps(args), "--weights", str(tmp_path / "refvgg.pth"))
    (tmp_path / "refvgg.pth").unlink()
    with pytest.raises(bench.BenchError, match="weights .* do not exist"):
        bench.discover_models(tmp_path)
    with pytest.raises(bench.BenchError, match="does not exist"):
        bench.discover_models(tmp_path / "absent")


def test_options_and_jobs() -> None:
    args = bench.parse_args(["--presim", "0,4", "--samples", "50"])
    assert args.timesteps == [1, 4, 16] and args.profiles == ["int16", "loihi2"]
    jobs = bench.jobs_for(args, [bench.ModelSpec("m", ("m.pt",))])
    assert len(jobs) == 2 * 3 * 2 * 2
    assert [j.variant for j in jobs[:2]] == ["before", "after"]
    assert {j.presim for j in jobs} == {0, 4} and all(j.samples == 50 for j in jobs)
    with pytest.raises(SystemExit):
        bench.parse_args(["--timesteps", "1,x"])
    assert "torch" in bench.machine_header() and "lava-nc" in bench.machine_header()
