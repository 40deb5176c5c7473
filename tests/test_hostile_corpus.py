"""Bad input gets one line ``error: ...`` and a non-zero exit: never a traceback, a crash,
a hang, a file left behind or a payload that runs (issue 13).

The corpus (:mod:`tests.hostile.corpus`) is made from a trained digits-cnn and its
exports; each input is read by the commands that read it, each command in a
forked child of a worker that imported the CLI once (:class:`ForkServer`). The
default run gives a selection of the inputs one command each (rotating through
them); the slow run gives every input every command and prints the counts, and
runs a few cases in fresh interpreters too (``CSQCFS_CORPUS_SUBPROCESS=1``: all).
A child imports lava-dl and Norse afresh, so their import-time noise shows there
as well.
"""

from __future__ import annotations

import io
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from tqdm import tqdm

from csqcfs_deploy.cli.main import DEBUG_ENV, main, print_error, print_internal_error
from csqcfs_deploy.convert.fold import FoldResult
from csqcfs_deploy.convert.quantize import quantize
from csqcfs_deploy.ir import load_graph

from .hostile.cases import default_selection
from .hostile.corpus import BaseFiles, Case, build_corpus, make_base_files
from .hostile.runner import (
    Expectation,
    ForkServer,
    Outcome,
    problems,
    run_subprocess,
    snapshot,
)


@pytest.fixture(scope="module")
def base_files(tmp_path_factory: pytest.TempPathFactory, digits_checkpoint: Path,
               digits_fold: FoldResult) -> BaseFiles:
    from csqcfs_deploy.exporters.netx import write_netx
    from csqcfs_deploy.exporters.nir import write_nir_graph

    def convert(path: Path) -> None:  # calibrated, as users have them: no warnings
        argv = ["convert", str(digits_checkpoint), "-o", str(path), "--samples", "8",
                "--min-agreement", "0"]
        assert main(argv) == 0

    per_layer = quantize(digits_fold.graph, "loihi2", per_channel=False)[0]
    return make_base_files(tmp_path_factory.mktemp("corpus"), digits_checkpoint, convert,
                           lambda p: write_nir_graph(load_graph(p.parent / BaseFiles.ifg), p),
                           lambda p: write_netx(per_layer, p))


@pytest.fixture(scope="module")
def corpus(base_files: BaseFiles) -> list[Case]:
    return build_corpus(base_files)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ForkServer]:
    with ForkServer(tmp_path_factory.mktemp("forkserver") / "log.txt") as fs:
        yield fs


def judge(case: Case, argv: tuple[str, ...], root: Path, run: ForkServer | None) -> list[str]:
    """Run ``argv`` on ``case`` in ``root`` and list what went wrong."""
    before = snapshot(root)
    outcome: Outcome = (run.main(argv, root, timeout_s=case.timeout_s) if run is not None
                        else run_subprocess(argv, root, timeout_s=case.timeout_s + 120))
    left = snapshot(root) - before
    found = problems(outcome, left, Expectation(case.names, case.markers, case.may_succeed))
    remove(root, left)  # the next case starts from the same folder
    return found


def remove(root: Path, relative: set[str]) -> None:
    """Delete what a command left in ``root`` (deepest first)."""
    for name in sorted(relative, key=len, reverse=True):
        path = root / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def run_corpus(cases: list[Case], root: Path, run: ForkServer | None, every: bool
               ) -> tuple[int, list[str]]:
    """(runs, failures as 'category/name: command: problems')."""
    runs, failures = 0, []
    for case in cases:
        for argv in case.runs if every else (case.runs[case.quick],):
            runs += 1
            found = judge(case, argv, root, run)
            if found:
                failures.append(f"{case.id}: {' '.join(argv)}: {'; '.join(found)}")
    return runs, failures


# --------------------------------------------------------------------------- controls


CONTROL = (("run", "good.ifg", "--backend", "int", "--samples", "4"),
           ("verify", "good.nir", "--backends", "int", "--samples", "4"),
           ("report", "good.ifg", "--samples", "4", "--energy", "good-energy.json"),
           ("run", "good.ifg", "--backend", "int", "--data", "good-data.npz", "--samples", "4"),
           ("export", "good.ifg", "-o", "control.nir"),
           ("sweep", "good.nir", "-T", "1", "--samples", "4"))


def test_the_real_files_are_accepted(base_files: BaseFiles, server: ForkServer) -> None:
    """The corpus's commands work on the files it was made from: what fails below fails
    because of the corruption, not because of the command line."""
    for argv in CONTROL:
        outcome = server.main(argv, base_files.root)
        assert outcome.returncode == 0, (argv, outcome.stderr[-2000:])
    assert (base_files.root / "control.nir").is_file()
    (base_files.root / "control.nir").unlink()


# --------------------------------------------------------------------------- the corpus


#: cases the default run always includes (what issue 13 found, and the payloads)
ALWAYS = ("generic/signature-nir-SNOD", "ifg/unreferenced-12GiB-member", "ifg/pickled-array",
          "ifg/corrupt-deflate-manifest", "ifg/weight-exp-1e20", "ifg/weights-complex",
          "ifg/padding-20000", "ifg/shape-strings", "nir/chunk-bomb", "nir/groups-array",
          "nir/stride-0", "checkpoint/pickle-payload", "checkpoint/levels-0",
          "checkpoint/dataset-unknown", "data/pickled", "cifar/pickled-code",
          "cifar/empty-test-batch", "energy/deep-list", "energy/source-int",
          "output/read-only", "output/proc", "option/timesteps-1000000",
          "option/report-batch-size-0", "target/netx-int16-profile")
#: cases per category in the default run besides those (the slow run takes all)
PER_CATEGORY = 6


def test_every_bad_input_gets_one_error_line(corpus: list[Case], base_files: BaseFiles,
                                             server: ForkServer) -> None:
    """One command on a selection of the inputs (each category, and :data:`ALWAYS`)."""
    assert len(corpus) > 200 and len({c.category for c in corpus}) == 11
    assert set(ALWAYS) <= {c.id for c in corpus}
    chosen = default_selection(corpus, PER_CATEGORY, ALWAYS)
    runs, failures = run_corpus(chosen, base_files.root, server, every=False)
    print(f"\ncorpus: {len(chosen)} of {len(corpus)} inputs, {runs} runs, "
          f"{len(failures)} failures")
    assert not failures, "\n".join(failures)


@pytest.mark.slow
def test_every_command_on_every_bad_input(corpus: list[Case], base_files: BaseFiles,
                                          server: ForkServer) -> None:
    """Every command that reads each input (``CSQCFS_CORPUS_SUBPROCESS=1``: each in a
    fresh interpreter, which takes about 5 s a run)."""
    fresh = os.environ.get("CSQCFS_CORPUS_SUBPROCESS", "") not in ("", "0")
    runs, failures = run_corpus(corpus, base_files.root, None if fresh else server,
                                every=True)
    print(f"\ncorpus: {len(corpus)} inputs, {runs} runs, {len(failures)} failures")
    for line in failures:
        print("  " + line)
    assert not failures, "\n".join(failures)


@pytest.mark.slow
@pytest.mark.parametrize("case_id", ["target/netx-int16-profile", "target/norse-on-cuda",
                                     "nir/chunk-bomb", "ifg/unreferenced-12GiB-member",
                                     "option/model-os-system"])
def test_fresh_interpreter_cases(corpus: list[Case], base_files: BaseFiles,
                                 case_id: str) -> None:
    """In a fresh interpreter, where importing lava-dl or Norse would print notices,
    warnings and log lines (a forked child imports them afresh too: the default run's
    ``target/netx-int16-profile`` sees lava-dl's)."""
    case = next(c for c in corpus if c.id == case_id)
    found = judge(case, case.runs[case.quick], base_files.root, None)
    assert not found, found


# --------------------------------------------------------------------------- main()


def test_internal_error_is_one_line_and_the_traceback_needs_debug(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    empty: dict[str, int] = {}
    try:
        empty["missing"]  # noqa: B018
    except KeyError as exc:
        assert print_internal_error(exc) == 1
    err = capsys.readouterr().err
    assert err == (f"error: internal error: KeyError: 'missing' (please report; rerun with "
                   f"{DEBUG_ENV}=1 for the traceback)\n")
    monkeypatch.setenv(DEBUG_ENV, "1")
    try:
        raise ZeroDivisionError("x" * 1000)
    except ZeroDivisionError as exc:
        assert print_internal_error(exc) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback (most recent call last)")
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: internal error: ZeroDivisionError: xxx") and len(last) < 500


def test_an_error_clears_a_live_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    stream = io.StringIO()
    bar = tqdm(total=10, file=stream, leave=True, mininterval=0, desc="work")
    bar.update(3)
    assert "work" in stream.getvalue().rsplit("\r", 1)[-1]
    assert print_error("it broke\n  badly", 7) == 7
    assert stream.getvalue().rsplit("\r", 1)[-1].strip() == ""   # the bar's line is blank
    assert capsys.readouterr().err == "error: it broke badly\n"


def test_a_bad_option_value_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main(["run", "m.ifg", "--backend", "tpu"])
    assert stop.value.code == 8
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: csqcfs-deploy run: argument")
    assert "tpu" in err and "--help" in err
