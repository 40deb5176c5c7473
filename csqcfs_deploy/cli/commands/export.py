"""``csqcfs-deploy export``: write a deployed network in an exchange or hardware format.

Targets are dispatched through :data:`TARGETS`: one :class:`ExportTarget` per
``--target`` value names the module and the writer function. A writer is
called as ``writer(graph, path)`` or, for a target with flavours,
``writer(graph, path, flavor)`` (``flavor`` None: the target's default, which the
writer chooses); whatever it returns is printed with ``str()`` (and, with
``--json``, its ``to_json()`` when it has one), and each of its ``warnings()``, if
it has them, as a ``warning:`` line on stderr. Adding a target is adding one entry.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from csqcfs_deploy.cli.commands.common import (
    add_dataset_args,
    add_fold_check_args,
    add_json_arg,
    add_model_args,
    console,
    print_json,
    resolve_model,
)
from csqcfs_deploy.cli.commands.run import fold_check_json
from csqcfs_deploy.cli.fidelity_args import add_scale_args
from csqcfs_deploy.errors import BackendUnavailable, UsageError
from csqcfs_deploy.files import check_output
from csqcfs_deploy.ir import IFGraph


@dataclass(frozen=True)
class ExportTarget:
    """One ``--target``: ``module.function(graph, path[, flavor]) -> printable``."""

    name: str
    module: str
    function: str
    description: str
    flavors: tuple[str, ...] = ()   # empty: the writer takes no flavour
    install_hint: str = "it is part of csqcfs-deploy"

    def __post_init__(self) -> None:
        if not self.name or not self.module or not self.function:
            raise ValueError(f"export target {self.name!r} needs a module and a function")

    def writer(self) -> Any:
        try:
            module = importlib.import_module(self.module)
        except ImportError as exc:
            raise BackendUnavailable(f"export target {self.name} is unavailable "
                                     f"({exc.name or exc}): {self.install_hint}") from None
        return getattr(module, self.function)


TARGETS: dict[str, ExportTarget] = {
    "nir": ExportTarget(
        "nir", "csqcfs_deploy.cli.nir_text", "export_nir",
        "NIR graph (HDF5); portable (default): exact at T = 1 for plain NIR readers, "
        "per-channel thresholds; portable-uniform: one threshold per layer (snnTorch, "
        "spikingjelly); native: exact at every T via metadata, refused by plain readers",
        flavors=("portable", "portable-uniform", "native")),
    "lava-netx": ExportTarget(
        "lava-netx", "csqcfs_deploy.cli.netx_text", "export_netx",
        "lava-dl netx HDF5 for Loihi 2 (CUBA, reset to zero: exact at T = 1 without "
        "pre-simulation; feed-forward chains, loihi2 profile)",
        install_hint="install the 'lava' extra (make setup does: lava-nc 0.10 with "
        "--ignore-requires-python, lava-dl 0.6 with --no-deps, h5py)"),
}


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    targets = "; ".join(f"{t.name}: {t.description}" for t in TARGETS.values())
    p = sub.add_parser("export", help="write the deployed network as NIR (or another target)",
                       description="Export MODEL (a checkpoint, folded and quantized first, an "
                       f"IF graph .ifg or a .nir file) to a target format. Targets: {targets}.")
    add_model_args(p)
    add_dataset_args(p)
    add_fold_check_args(p)
    p.add_argument("--target", choices=sorted(TARGETS), default="nir",
                   help="output format (default nir)")
    p.add_argument("--flavor", default=None,
                   help="target flavour (nir: portable (default; falls back to native with a "
                   "warning where the graph cannot be said portably), portable-uniform (needs "
                   "--per-layer-thresholds) or native; the portable flavours are exact only "
                   "at T = 1 without pre-simulation)")
    p.add_argument("--nir-version", choices=("1.0.8", "1.0.4"), default=None,
                   help="nir: file layout (default 1.0.8; 1.0.4 for sinabs 3.1 and rockpool "
                   "3.1, which pin nir <= 1.0.4; see exporters/nir/legacy.py)")
    p.add_argument("-o", "--output", required=True, help="file to write")
    add_scale_args(p)
    add_json_arg(p)
    p.set_defaults(func=run)


def _flavor(target: ExportTarget, requested: str | None) -> str | None:
    if not target.flavors:
        if requested is not None:
            raise UsageError(f"target {target.name} has no flavours (--flavor {requested})")
        return None
    if requested is None:
        return None  # the writer's default
    if requested not in target.flavors:
        raise UsageError(f"target {target.name} has flavours {', '.join(target.flavors)}, "
                         f"not {requested!r}")
    return requested


def _per_layer(graph: IFGraph) -> bool:
    return all(np.all(la.v_th == la.v_th[0]) for la in graph.if_layers)


def run(args: argparse.Namespace) -> int:
    check_output(args.output)  # before the work, not after it
    target = TARGETS[args.target]
    flavor = _flavor(target, args.flavor)
    extra = {} if args.nir_version is None else {"nir_version": args.nir_version}
    if extra and target.name != "nir":
        raise UsageError(f"--nir-version is for --target nir, not {target.name}")
    writer = target.writer()
    loaded = resolve_model(args)
    if args.per_layer_thresholds and loaded.report is None and not _per_layer(loaded.graph):
        raise UsageError(f"{args.model} is already quantized with per-channel thresholds; "
                         "--per-layer-thresholds needs a checkpoint to convert")
    out = Path(args.output)
    result = writer(loaded.graph, out, **extra) if not target.flavors else writer(
        loaded.graph, out, flavor, **extra)
    for text in (result.warnings() if hasattr(result, "warnings") else []):
        sys.stderr.write(f"warning: {text}\n")
    if args.json:
        data = result.to_json() if hasattr(result, "to_json") else {"result": str(result)}
        data.setdefault("target", target.name)
        data.setdefault("output", str(out))
        data["model"] = str(args.model) if args.model else args.user_model
        data["fold_check"] = fold_check_json(loaded.fold_check)
        print_json(data)
    else:
        if loaded.fold_check is not None:
            console().print(loaded.fold_check.summary())
        print(str(result))
    return 0
