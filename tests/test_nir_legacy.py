"""``--nir-version 1.0.4``: files nir 1.0.4's ``nir.read`` loads (sinabs 3.1, rockpool 3.1),
that our reader still restores exactly.

nir 1.0.4 itself cannot share the project's environment (norse needs nir >= 1.0.6), so
whether sinabs reads these files is measured by ``benchmarks/nir_readers.py`` in a scratch
environment (``benchmarks/nir_envs.sh``); here the file's layout is checked against the
fields nir 1.0.4's node classes have (read from its source, listed independently below).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest

from csqcfs_deploy.cli import main
from csqcfs_deploy.errors import GraphError, InputFileError
from csqcfs_deploy.exporters.nir import graph_to_nir, read_nir_graph, write_nir_graph
from csqcfs_deploy.exporters.nir.legacy import LEGACY_FIELDS_KEY, legacy_record
from csqcfs_deploy.ir import IFGraph, save_graph

from .test_nir import one_line_error, toy_graph

#: What nir 1.0.4 (nir/ir/*.py, dataclass fields) lacks against nir 1.0.8, per stored type.
MISSING_IN_1_0_4 = {"IF": {"v_reset"}, "Conv2d": {"metadata"}, "Input": {"metadata"},
                    "Output": {"metadata"}}
#: What nir 1.0.4 accepts in a file, per stored type (besides "type").
ACCEPTED_BY_1_0_4 = {
    "Input": {"shape"}, "Output": {"shape"}, "IF": {"r", "v_threshold", "metadata"},
    "Conv2d": {"input_shape", "weight", "stride", "padding", "dilation", "groups", "bias"},
    "Affine": {"weight", "bias", "metadata"},
    "SumPool2d": {"kernel_size", "stride", "padding", "metadata"},
    "Flatten": {"input_type", "start_dim", "end_dim", "metadata"},
}
CASES = [("loihi2", "portable"), ("int8", "portable-uniform"), ("int16", "portable"),
         ("int8", "native")]


def _graph(profile: str) -> IFGraph:
    """The toy graph of test_nir (every node type, grouped conv, residuals), portable-able."""
    return toy_graph(profile, per_layer=True, weight_exp=0)


def _stored_fields(path: Path) -> dict[str, tuple[str, set[str]]]:
    with h5py.File(path, "r") as f:
        nodes = f["node"]["nodes"]
        return {name: (nodes[name]["type"][()].decode(), set(nodes[name]) - {"type"})
                for name in nodes}


@pytest.mark.parametrize(("profile", "flavor"), CASES)
def test_a_1_0_4_file_round_trips_exactly(tmp_path: Path, profile: str, flavor: str) -> None:
    graph = _graph(profile)
    path = write_nir_graph(graph, tmp_path / "g.nir", flavor, nir_version="1.0.4")
    assert read_nir_graph(path).equals(graph)


@pytest.mark.parametrize(("profile", "flavor"), CASES)
def test_a_1_0_4_file_has_only_fields_nir_1_0_4_knows(tmp_path: Path, profile: str,
                                                      flavor: str) -> None:
    path = write_nir_graph(_graph(profile), tmp_path / "g.nir", flavor, nir_version="1.0.4")
    stored = _stored_fields(path)
    ng = graph_to_nir(_graph(profile), flavor)
    assert set(stored) == set(ng.nodes)
    for name, (kind, fields) in stored.items():
        base = "IF" if kind == "CsqcfsIF" else kind
        assert base == type(ng.nodes[name]).__name__
        assert not fields & MISSING_IN_1_0_4.get(base, set()), (name, fields)
        assert fields <= ACCEPTED_BY_1_0_4[base], (name, fields)
    with h5py.File(path, "r") as f:
        assert f["version"][()].decode() == "1.0.4"
        moved = f["node"]["metadata"][LEGACY_FIELDS_KEY]
        # every Conv2d, Input and Output node's metadata moved to the graph's metadata
        assert set(moved) == {n for n, (k, _) in stored.items()
                              if k in ("Conv2d", "Input", "Output") and ng.nodes[n].metadata}
        assert {"c1", "input", "out"} <= set(moved)
        assert int(moved["c2"]["metadata"]["groups"][()]) == 3


def test_the_default_layout_is_unchanged(tmp_path: Path) -> None:
    path = write_nir_graph(_graph("loihi2"), tmp_path / "g.nir", "portable")
    stored = _stored_fields(path)
    assert "v_reset" in stored["a"][1] and "metadata" in stored["c1"][1]
    with h5py.File(path, "r") as f:
        assert LEGACY_FIELDS_KEY not in f["node"]["metadata"]
        assert f["version"][()].decode() == "1.0.8"


def _rewrite(path: Path, edit: Any) -> None:
    with h5py.File(path, "r+") as f:
        edit(f["node"])


def test_a_tampered_1_0_4_file_is_refused_naming_the_node(tmp_path: Path) -> None:
    good = write_nir_graph(_graph("int8"), tmp_path / "good.nir", "portable",
                           nir_version="1.0.4")
    path = Path(shutil.copy(good, tmp_path / "g.nir"))

    def misname(node: h5py.Group) -> None:
        node.move(f"metadata/{LEGACY_FIELDS_KEY}/c1", f"metadata/{LEGACY_FIELDS_KEY}/ghost")

    _rewrite(path, misname)
    with pytest.raises(InputFileError, match=r"g\.nir.*ghost"):
        read_nir_graph(path)

    path = Path(shutil.copy(good, tmp_path / "h.nir"))
    _rewrite(path, lambda node: node.copy(f"metadata/{LEGACY_FIELDS_KEY}/c1/metadata",
                                          "nodes/c1/metadata"))
    with pytest.raises(InputFileError, match=r"h\.nir.*node c1 has metadata both"):
        read_nir_graph(path)

    path = Path(shutil.copy(good, tmp_path / "i.nir"))
    _rewrite(path, lambda node: node.create_dataset(f"metadata/{LEGACY_FIELDS_KEY}/a/x",
                                                    data=1))
    with pytest.raises(InputFileError, match=r"i\.nir.*/a must hold exactly a metadata"):
        read_nir_graph(path)


def test_what_1_0_4_cannot_say_is_refused() -> None:
    record = graph_to_nir(_graph("int16"), "portable").to_dict()
    record["nodes"]["a"]["v_reset"] = np.ones_like(record["nodes"]["a"]["v_reset"])
    with pytest.raises(GraphError, match="node a: nir 1.0.4 has no IF v_reset"):
        legacy_record(record)
    record = graph_to_nir(_graph("int16"), "portable").to_dict()
    record["nodes"]["c1"]["type"] = "AvgPool2d"
    with pytest.raises(GraphError, match="node c1: nir 1.0.4 files cannot hold a AvgPool2d"):
        legacy_record(record)


def test_export_nir_version_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                   ) -> None:
    ifg = tmp_path / "g.ifg"
    graph = _graph("loihi2")
    save_graph(graph, ifg)
    out = tmp_path / "g.nir"
    assert main(["export", str(ifg), "--nir-version", "1.0.4", "-o", str(out), "--json"]) == 0
    assert '"nir_version": "1.0.4"' in capsys.readouterr().out
    assert read_nir_graph(out).equals(graph)
    assert "v_reset" not in _stored_fields(out)["a"][1]
    assert main(["export", str(ifg), "--target", "lava-netx", "--nir-version", "1.0.4",
                 "-o", str(tmp_path / "g.net")]) == 8
    assert "--nir-version is for --target nir" in one_line_error(capsys)
