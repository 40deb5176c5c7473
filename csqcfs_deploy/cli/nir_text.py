"""What ``export --target nir`` prints: the text of a NIR export.

The exporter (:mod:`csqcfs_deploy.exporters.nir`) returns a
:class:`~csqcfs_deploy.exporters.nir.NirExport` (data, ``to_json()`` for
``--json``); the words a user reads are written here: the file, its flavour and
exactness, the verification, and which readers were measured exact on such a file
(:mod:`csqcfs_deploy.exporters.nir.readers`). Strings stored *in* a NIR file (format
name, exactness notes, schedule hint) are the file format and stay in the exporter.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from csqcfs_deploy.exporters.nir import NirExport
from csqcfs_deploy.exporters.nir import export_nir as _export_nir
from csqcfs_deploy.exporters.nir.flavors import NATIVE_IF_TYPE, PORTABLE_FLAVORS
from csqcfs_deploy.exporters.nir.readers import AFTER_STEP_1, CURRENT_NIR, ReaderFact
from csqcfs_deploy.ir import IFGraph

VERIFIED = ("verified: read back with nir.read and csqcfs-deploy's reader, it is the same IF "
            "graph")
VERIFIED_NATIVE = ("verified: read back with csqcfs-deploy's reader, it is the same IF graph "
                   f"(nir.read refuses it: its IF nodes are stored as type {NATIVE_IF_TYPE})")
VERDICTS = {"yes": "exact", "no": "not exact", "refuses": "refuses"}


def fallback_warning(result: NirExport) -> str | None:
    """The warning when the default flavour fell back to native, else None."""
    if not result.fallback:
        return None
    return (f"the default portable NIR flavour cannot express this graph ({result.fallback}); "
            f"wrote the native flavour, which plain NIR readers refuse (only csqcfs-deploy "
            "reads it)")


def fact_line(fact: ReaderFact) -> str:
    """One reader fact: verdict, reader and settings, at which T and P, batched, source."""
    if fact.exact == "refuses":
        when = ""
    elif fact.steps is None:
        when = "at every T and P"
    else:
        when = f"at T = {fact.steps}, P = {fact.presim}"
    batch = {"yes": "batched and unbatched", "no": "unbatched only",
             "not measured": "batched not measured"}[fact.batched]
    extras = "; ".join(x for x in (batch if fact.exact == "yes" else "", fact.note,
                                   fact.source) if x)
    return f"  {VERDICTS[fact.exact]:<9} {fact.label()} {when}".rstrip() + f" [{extras}]"


def readers_text(result: NirExport) -> list[str]:
    """The reader lines: measured facts for this flavour and NIR version, and step 2 on."""
    lines = [f"readers measured on {result.flavor} files (NIR {result.nir_version}):"]
    order = {"yes": 0, "no": 1, "refuses": 2}
    lines += [fact_line(f) for f in sorted(result.readers, key=lambda f: order[f.exact])]
    if len(lines) == 1:
        lines.append("  (none measured)")
    if result.flavor in PORTABLE_FLAVORS:
        lines.append(AFTER_STEP_1)
    return lines


def export_text(result: NirExport) -> str:
    """The lines printed after a NIR export: file, node counts, exactness, verification,
    readers."""
    types = ", ".join(f"{k} x{v}" for k, v in sorted(result.node_types.items()))
    lines = [
        f"wrote {result.path} (NIR, {result.flavor} flavour, profile {result.profile}, "
        f"{result.nodes} nodes, {result.edges} edges, {result.value_dtype})",
        f"nodes: {types}",
        f"{result.flavor} flavour: {result.exactness}",
    ]
    if result.verified:
        lines.append(VERIFIED if result.flavor in PORTABLE_FLAVORS else VERIFIED_NATIVE)
    lines += readers_text(result)
    return "\n".join(lines)


@dataclass(frozen=True)
class NirExportReport:
    """A NIR export as the CLI shows it: ``str()`` is :func:`export_text`, ``to_json()``
    the exporter's (with the fallback warning), ``warnings()`` the ``warning:`` lines."""

    result: NirExport

    def warnings(self) -> list[str]:
        text = fallback_warning(self.result)
        return [] if text is None else [text]

    def to_json(self) -> dict[str, object]:
        data = self.result.to_json()
        data["warnings"] = self.warnings()
        return data

    def __str__(self) -> str:
        return export_text(self.result)


def export_nir(graph: IFGraph, path: Path, flavor: str | None,
               nir_version: str = CURRENT_NIR) -> NirExportReport:
    """The ``export --target nir`` writer: :func:`csqcfs_deploy.exporters.nir.export_nir`
    (``flavor`` None: the default, portable falling back to native), printable."""
    return NirExportReport(_export_nir(graph, path, flavor, nir_version))
