"""Pieces every command shares: model arguments, tables, JSON output."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import TypeGuard

from rich.console import Console
from rich.table import Table

from csqcfs_deploy.cli.arg_types import positive_int
from csqcfs_deploy.cli.dataset_args import (
    PICK,
    DatasetMismatch,
    _load,
    add_dataset_args,
    check_model_encoding,
    dataset_name,
    encoding_override,
    resolve_dataset,
)
from csqcfs_deploy.cli.fidelity_args import plan_from_args
from csqcfs_deploy.cli.model_io import (
    Calibration,
    FoldCheckOptions,
    LoadedModel,
    NirOptions,
    calibration_from,
    load_model,
)
from csqcfs_deploy.convert.check import DEFAULT_SAMPLES
from csqcfs_deploy.errors import UsageError
from csqcfs_deploy.exporters.nir.float_import import SOURCE_CHOICES
from csqcfs_deploy.ir.profiles import PROFILES
from csqcfs_deploy.ir.schedule import SCHEDULES, Schedule
from csqcfs_deploy.train.checkpoint import ModelConfig
from csqcfs_deploy.train.datasets import Dataset
from csqcfs_deploy.train.zoo import arch_spec

__all__ = ["add_dataset_args", "resolve_dataset"]  # re-exported from cli.dataset_args


def add_model_args(parser: argparse.ArgumentParser, default_profile: str | None = "loihi2"
                   ) -> None:
    """MODEL (checkpoint / .ifg / .nir) or --model/--weights, and the profile to use."""
    parser.add_argument("model", nargs="?", metavar="MODEL",
                        help="a checkpoint (.pt), IF graph (.ifg) or NIR file (.nir)")
    parser.add_argument("--model", dest="user_model", metavar="MODULE:FACTORY",
                        help="build your own network with this factory (instead of MODEL)")
    parser.add_argument("--weights", metavar="FILE",
                        help="state dict for --model (loaded with weights_only=True)")
    parser.add_argument("--model-args", dest="model_args", metavar="JSON", default=None,
                        help="keyword arguments for the --model factory as a JSON object, "
                        """e.g. '{"num_classes": 100, "L": 8}' (or inline: """
                        "--model 'mynets:vgg16(num_classes=100)', literals only)")
    parser.add_argument("--profile", choices=sorted(PROFILES), default=None,
                        help=f"hardware profile for a checkpoint or a float NIR graph (default "
                        f"{default_profile})")
    parser.add_argument("--per-layer-thresholds", action="store_true",
                        help="one threshold per layer even where the profile allows per-channel")
    parser.add_argument("--source-semantics", choices=SOURCE_CHOICES, default=None,
                        help="a float NIR MODEL from another tool: whose IF neuron rule its "
                        "nir.IF nodes mean (reset, comparison; default nir). sinabs is its "
                        "SingleSpike, min_v_mem=None form; sinabs-multispike is refused")


def add_json_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")


def add_fold_check_args(parser: argparse.ArgumentParser) -> None:
    """--calibration-samples and --no-fold-check (for every command that folds a network)."""
    parser.add_argument("--calibration-samples", type=positive_int, default=DEFAULT_SAMPLES,
                        metavar="N", help="training samples the folded graph is checked "
                        f"against the model on (default {DEFAULT_SAMPLES})")
    parser.add_argument("--no-fold-check", action="store_true",
                        help="do not check the folded graph against the model (not advised: "
                        "a misconverted network then goes unnoticed)")


def resolve_model(args: argparse.Namespace) -> LoadedModel:
    """Load MODEL / --model from parsed arguments; a network is fold-checked on the
    training split of its data (:func:`fold_check_options`)."""
    per_channel = False if getattr(args, "per_layer_thresholds", False) else None
    override = encoding_override(args)
    dataset = dataset_name(args)
    shape = enc = None
    user_ds: Dataset | None = None
    if args.user_model is not None:
        user_ds = resolve_dataset(args)
        dataset, shape, enc = user_ds.name, user_ds.input_shape, user_ds.encoding
    loaded = load_model(args.model, profile=args.profile, per_channel=per_channel,
                        user_model=args.user_model, user_weights=args.weights,
                        dataset=dataset, input_shape=shape, encoding=enc,
                        model_args=getattr(args, "model_args", None),
                        encoding_override=None if override.empty else override.apply,
                        check=fold_check_options(args, user_ds),
                        plan=plan_from_args(args),
                        nir_import=NirOptions(getattr(args, "source_semantics", None),
                                              lambda name: _load(args, name).encoding))
    check_model_encoding(loaded, override)
    return loaded


def _names_data(args: argparse.Namespace) -> bool:
    return getattr(args, "data", None) is not None or getattr(args, "dataset", None) is not None


def resolve_dataset_for(args: argparse.Namespace, config: ModelConfig) -> Dataset:
    """The data for a network with ``config`` before its graph exists: ``--data`` /
    ``--dataset``, else the dataset the config names (its raw samples; the encoding
    in use is the config's). DatasetMismatch when its input shape is not the model's."""
    name = dataset_name(args) if _names_data(args) else config.dataset
    ds = _load(args, name)
    want = tuple(int(d) for d in config.input_shape)
    if ds.input_shape != want:
        raise DatasetMismatch(f"the model takes inputs of shape {want} but {ds.name} has "
                              f"{ds.input_shape}; {PICK}")
    return ds


def fold_check_options(args: argparse.Namespace, ds: Dataset | None = None
                       ) -> FoldCheckOptions:
    """The fold check of parsed arguments: on ``ds`` (``--model``'s data) or the network's
    data (:func:`resolve_dataset_for`), up to ``--calibration-samples``; random inputs
    only when no data was named and the network's own is not at hand."""
    samples = int(getattr(args, "calibration_samples", DEFAULT_SAMPLES))
    if samples < 1:
        raise UsageError(f"--calibration-samples must be >= 1, got {samples}")

    def inputs(config: ModelConfig) -> Calibration:
        return calibration_from(ds if ds is not None else resolve_dataset_for(args, config),
                                samples)

    return FoldCheckOptions(inputs, samples, enabled=not getattr(args, "no_fold_check", False),
                            random_fallback=ds is None and not _names_data(args))


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
