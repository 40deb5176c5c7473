"""What ``csqcfs-deploy export --target lava-netx`` prints about the file it wrote.

The lava-netx entry of :data:`csqcfs_deploy.cli.commands.export.TARGETS` calls
:func:`export_netx`: it writes the file with
:func:`csqcfs_deploy.exporters.netx.write_netx` and returns a
:class:`NetxExportText`, whose ``str()`` is the sentence printed (where the
file is exact, how to load it, what to add to the readout) and whose
``to_json()`` is the export's own description (``--json``). The texts stored
inside the file belong to the format (:mod:`csqcfs_deploy.exporters.netx`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from csqcfs_deploy.exporters.netx import NetxExport, write_netx
from csqcfs_deploy.ir import IFGraph


def export_summary(export: NetxExport) -> str:
    """One paragraph: what was written, where it is exact and how to load and read it."""
    plan = export.plan
    kwargs = ", ".join(f"{k}={v}" for k, v in plan.load_kwargs().items())
    return (f"wrote {export.path} (lava-dl netx HDF5, {len(plan.layers)} CUBA layers). "
            "netx neurons reset to zero and start at 0: the file is exact at T = 1 "
            "without pre-simulation only (every layer's counted step and the readout "
            "equal the integer simulator's, hard reset, pipelined); load it with "
            f"lava.lib.dl.netx.hdf5.Network('{export.path}', {kwargs}) and add "
            f"readout_offset {plan.readout_offset.tolist()} to the last layer's "
            "membrane to get the readout.")


@dataclass(frozen=True)
class NetxExportText:
    """A written netx file as the ``export`` command reports it."""

    export: NetxExport

    def __str__(self) -> str:
        return export_summary(self.export)

    def to_json(self) -> dict[str, Any]:
        return self.export.to_json()


def export_netx(graph: IFGraph, path: str | Path) -> NetxExportText:
    """The ``export --target lava-netx`` writer: :func:`write_netx`, reported in words."""
    return NetxExportText(write_netx(graph, path))
