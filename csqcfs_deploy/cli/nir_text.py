"""What ``export --target nir`` prints: the text of a NIR export.

The exporter (:mod:`csqcfs_deploy.exporters.nir`) returns a
:class:`~csqcfs_deploy.exporters.nir.NirExport` (data, ``to_json()`` for
``--json``); the words a user reads are written here. Strings stored *in* a NIR
file (format name, exactness notes, schedule hint) are the file format and stay
in the exporter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from csqcfs_deploy.exporters.nir import NirExport
from csqcfs_deploy.exporters.nir import export_nir as _export_nir
from csqcfs_deploy.ir import IFGraph

VERIFIED = ("verified: read back with nir.read and csqcfs-deploy's reader, it is the same IF "
            "graph")


def export_text(result: NirExport) -> str:
    """The lines printed after a NIR export: file, node counts, exactness, verification."""
    types = ", ".join(f"{k} x{v}" for k, v in sorted(result.node_types.items()))
    lines = [
        f"wrote {result.path} (NIR, {result.flavor} flavour, profile {result.profile}, "
        f"{result.nodes} nodes, {result.edges} edges, {result.value_dtype})",
        f"nodes: {types}",
        f"{result.flavor} flavour: {result.exactness}",
    ]
    if result.verified:
        lines.append(VERIFIED)
    return "\n".join(lines)


@dataclass(frozen=True)
class NirExportReport:
    """A NIR export as the CLI shows it: ``str()`` is :func:`export_text`, ``to_json()``
    the exporter's."""

    result: NirExport

    def to_json(self) -> dict[str, object]:
        return self.result.to_json()

    def __str__(self) -> str:
        return export_text(self.result)


def export_nir(graph: IFGraph, path: Path, flavor: str) -> NirExportReport:
    """The ``export --target nir`` writer: :func:`csqcfs_deploy.exporters.nir.export_nir`,
    printable."""
    return NirExportReport(_export_nir(graph, path, flavor))
