"""The dataset options every command shares, and which data and encoding they pick.

* ``--dataset NAME`` (a registered dataset) or ``--data FILE.npz`` (the user's
  own, named ``data:FILE``; ``--classes N``); default: the dataset the
  checkpoint was trained on, else digits.
* ``--mean/--std`` (one value or one per channel), ``--raw-max``,
  ``--input-bits``: replace fields of the encoding.

The encoding in use: without a model, the dataset's own with the options
applied. With a model, the model's: a checkpoint's recorded encoding (the
options were applied to it when it was loaded, see
:func:`~csqcfs_deploy.cli.commands.common.resolve_model`), or the fixed one of an
``.ifg``/``.nir`` graph, which the options may not change. The dataset must
then fit the model: same input shape, and as many classes as the model has
outputs.
"""

from __future__ import annotations

import argparse

import numpy as np

from csqcfs_deploy.cli.arg_types import positive_int
from csqcfs_deploy.cli.model_io import LoadedModel
from csqcfs_deploy.errors import DatasetError, UsageError
from csqcfs_deploy.ir import InputEncoding
from csqcfs_deploy.train.datasets import (
    DATA_PREFIX,
    DATASETS,
    Dataset,
    EncodingOverride,
    check_fits_encoding,
    describe_encoding,
    load_dataset,
)

ENCODING_OPTIONS = "--mean/--std/--raw-max/--input-bits"
PICK = "pick the dataset with --dataset or --data"


class DatasetMismatch(DatasetError):
    """The dataset does not fit the model (input shape or number of classes)."""


def add_dataset_args(parser: argparse.ArgumentParser, default_help: str | None = None
                     ) -> None:
    """--dataset / --data-dir / --data / --classes and the encoding options."""
    parser.add_argument("--dataset", choices=DATASETS, default=None,
                        help=default_help or "dataset (default: the model's, else digits)")
    parser.add_argument("--data-dir", metavar="DIR",
                        help="local copy of the dataset (cifar10: cifar-10-batches-py, "
                        "cifar100: cifar-100-python); nothing is downloaded")
    parser.add_argument("--data", metavar="FILE.npz",
                        help="your own data: arrays x (N, C, H, W or N, H, W; raw values) and "
                        "y (N,) integer labels, optionally x_train/y_train (instead of "
                        "--dataset)")
    parser.add_argument("--classes", type=positive_int, default=None, metavar="N",
                        help="number of classes of --data (default: largest label + 1)")
    parser.add_argument("--mean", metavar="M[,M,...]",
                        help="normalisation mean of raw/raw_max, one value or one per channel "
                        "(default: the model's, else the dataset's)")
    parser.add_argument("--std", metavar="S[,S,...]",
                        help="normalisation std, one value or one per channel (default: the "
                        "model's, else the dataset's)")
    parser.add_argument("--raw-max", metavar="R",
                        help="largest raw input value (default: the model's, else the "
                        "dataset's; --data: its largest value rounded up to 1, 255 or an "
                        "integer)")
    parser.add_argument("--input-bits", metavar="B",
                        help="bits of the integer input (default: the model's, else 8)")


def encoding_override(args: argparse.Namespace) -> EncodingOverride:
    """The encoding options given (checked; UsageError naming the option)."""
    return EncodingOverride.parse(getattr(args, "mean", None), getattr(args, "std", None),
                                  getattr(args, "raw_max", None),
                                  getattr(args, "input_bits", None))


def dataset_name(args: argparse.Namespace, loaded: LoadedModel | None = None) -> str:
    """``--data`` (as ``data:FILE``), else ``--dataset``, else the model's, else digits."""
    data, name = getattr(args, "data", None), getattr(args, "dataset", None)
    if data is not None and name is not None:
        raise UsageError("give either --dataset or --data, not both")
    classes = getattr(args, "classes", None)
    if classes is not None:
        if data is None:
            raise UsageError("--classes applies to --data (a named dataset has its own classes)")
        if classes < 1:
            raise UsageError(f"--classes must be >= 1, got {classes}")
    if data is not None:
        return f"{DATA_PREFIX}{data}"
    if name is not None:
        return str(name)
    if loaded is not None and loaded.config is not None:
        return loaded.config.dataset
    return "digits"


def load_named(args: argparse.Namespace, name: str) -> Dataset:
    """Dataset ``name`` (with ``--data-dir``/``--classes``) as stored: its own encoding, no
    options applied, no fit checks. Loaded once per parsed command line (the fold check,
    resolve_model and resolve_dataset share it)."""
    data_dir = getattr(args, "data_dir", None)
    classes = getattr(args, "classes", None)
    cache: dict[tuple[str, str | None, int | None], Dataset] = vars(args).setdefault(
        "_datasets", {})
    key = (name, data_dir, classes)
    if key not in cache:
        cache[key] = load_dataset(name, data_dir, classes)
    return cache[key]


_load = load_named  # the name common.py first used


def check_model_encoding(loaded: LoadedModel, override: EncodingOverride) -> None:
    """UsageError when the options would change the encoding a graph was built with."""
    if override.empty:
        return
    enc = loaded.graph.input.encoding
    if override.apply(enc) != enc:
        what = loaded.source if loaded.source is not None else "the model"
        hint = ("convert the checkpoint again with them" if loaded.kind in ("ifg", "nir")
                else "they apply when the network is loaded")
        raise UsageError(f"{what} was built for input {describe_encoding(enc)}; "
                         f"{ENCODING_OPTIONS} cannot change that ({hint})")


def fit_to_model(ds: Dataset, loaded: LoadedModel) -> Dataset:
    """``ds`` if it fits the model's input shape and outputs, else DatasetMismatch."""
    graph = loaded.graph
    want = tuple(int(d) for d in graph.input.shape)
    if ds.input_shape != want:
        raise DatasetMismatch(f"the model takes inputs of shape {want} but {ds.name} has "
                              f"{ds.input_shape}; {PICK}")
    outputs = int(graph.readout.shape[0])
    largest = int(max(np.max(ds.y_test, initial=0), np.max(ds.y_train, initial=0)))
    if ds.classes_inferred:
        if largest >= outputs:
            raise DatasetMismatch(f"the model has {outputs} outputs but {ds.name} has labels "
                                  f"up to {largest}; {PICK}")
        return Dataset(ds.name, ds.x_train, ds.y_train, ds.x_test, ds.y_test, ds.encoding,
                       outputs)
    if ds.classes != outputs:
        raise DatasetMismatch(f"the model has {outputs} outputs but {ds.name} has "
                              f"{ds.classes} classes; {PICK}")
    if largest >= outputs:
        raise DatasetMismatch(f"{ds.name} has labels up to {largest} but the model has "
                              f"{outputs} outputs")
    return ds


def resolve_dataset(args: argparse.Namespace, loaded: LoadedModel | None = None) -> Dataset:
    """The data a command runs on, with the encoding in use (see the module docstring)."""
    override = encoding_override(args)
    ds = load_named(args, dataset_name(args, loaded))
    if loaded is None:
        encoding: InputEncoding = override.apply(ds.encoding)
    else:
        ds = fit_to_model(ds, loaded)
        check_model_encoding(loaded, override)
        encoding = loaded.graph.input.encoding
    ds = ds.with_encoding(encoding)
    check_fits_encoding(ds)
    return ds

