"""Pieces every command shares: model arguments, tables, JSON output."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TypeGuard

from rich.console import Console
from rich.table import Table

from csqcfs_deploy.cli.model_io import LoadedModel, load_model
from csqcfs_deploy.errors import UsageError
from csqcfs_deploy.ir.profiles import PROFILES
from csqcfs_deploy.ir.schedule import SCHEDULES, Schedule
from csqcfs_deploy.train.datasets import DATASETS, Dataset, load_dataset
from csqcfs_deploy.train.zoo import arch_spec


def add_model_args(parser: argparse.ArgumentParser, default_profile: str | None = "loihi2"
                   ) -> None:
    """MODEL (checkpoint / .ifg / .nir) or --model/--weights, and the profile to use."""
    parser.add_argument("model", nargs="?", metavar="MODEL",
                        help="a checkpoint (.pt), IF graph (.ifg) or NIR file (.nir)")
    parser.add_argument("--model", dest="user_model", metavar="MODULE:FACTORY",
                        help="build your own network with this factory (instead of MODEL)")
    parser.add_argument("--weights", metavar="FILE",
                        help="state dict for --model (loaded with weights_only=True)")
    parser.add_argument("--profile", choices=sorted(PROFILES), default=None,
                        help=f"hardware profile for a checkpoint (default {default_profile})")
    parser.add_argument("--per-layer-thresholds", action="store_true",
                        help="one threshold per layer even where the profile allows per-channel")


def add_dataset_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", choices=DATASETS, default=None,
                        help="dataset (default: the model's, else digits)")
    parser.add_argument("--data-dir", metavar="DIR",
                        help="local copy of the dataset (cifar10); nothing is downloaded")


def add_json_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def resolve_model(args: argparse.Namespace) -> LoadedModel:
    """Load MODEL / --model from parsed arguments."""
    per_channel = False if getattr(args, "per_layer_thresholds", False) else None
    dataset = getattr(args, "dataset", None) or "digits"
    shape = enc = None
    if args.user_model is not None:
        ds = load_dataset(dataset, getattr(args, "data_dir", None))
        shape, enc = ds.input_shape, ds.encoding
    return load_model(args.model, profile=args.profile, per_channel=per_channel,
                      user_model=args.user_model, user_weights=args.weights, dataset=dataset,
                      input_shape=shape, encoding=enc)


def resolve_dataset(args: argparse.Namespace, loaded: LoadedModel | None = None) -> Dataset:
    """The dataset named by --dataset, else the one the model was trained on, else digits."""
    name = getattr(args, "dataset", None)
    if name is None and loaded is not None and loaded.config is not None:
        name = loaded.config.dataset
    return load_dataset(name or "digits", getattr(args, "data_dir", None))


def check_arch(name: str) -> None:
    arch_spec(name)


def _is_schedule(name: str) -> TypeGuard[Schedule]:
    return name in SCHEDULES


def as_schedule(name: str) -> Schedule:
    """A ``--schedule`` value (a str from argparse) as a checked :data:`Schedule`."""
    if not _is_schedule(name):
        raise UsageError(f"schedule must be one of {', '.join(SCHEDULES)}, got {name!r}")
    return name


def print_json(data: object) -> None:
    """``data`` (a ``to_json()`` value: dicts, lists, numbers, strings) on stdout."""
    json.dump(data, sys.stdout, indent=2, sort_keys=False, default=_json_default)
    sys.stdout.write("\n")


def _json_default(value: object) -> object:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def console() -> Console:
    """Console for results on stdout; wide enough for the tables when piped."""
    probe = Console()
    width = probe.width if probe.is_terminal else 140
    return Console(highlight=False, width=width)


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[object]],
          justify_numbers: bool = True) -> Table:
    t = Table(title=title, title_justify="left")
    for col in columns:
        t.add_column(col, justify="right" if justify_numbers and col not in ("layer", "kind",
                                                                             "name", "notes",
                                                                             "backend")
                     else "left")
    for row in rows:
        t.add_row(*(fmt(v) for v in row))
    return t


def fmt(value: object) -> str:
    if isinstance(value, float):
        if value == 0:
            return "0"
        if abs(value) >= 1e5 or abs(value) < 1e-3:
            return f"{value:.3e}"
        return f"{value:.4g}"
    if isinstance(value, (tuple, list)):
        return "x".join(str(v) for v in value)
    return str(value)
