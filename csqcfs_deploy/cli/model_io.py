"""Load whatever a user passes as MODEL: a checkpoint, an ``.ifg`` or a ``.nir`` file.

The kind is recognised from the file's content, not its name: an ``.ifg`` is
an npz (zip) archive with a manifest, a ``.nir`` file is HDF5, anything else
is tried as a torch checkpoint (``weights_only=True``). A checkpoint is folded
and quantized on the fly to ``profile``.

Every network folded here is first checked against itself
(:func:`~csqcfs_deploy.convert.check.check_fold`): the float IF graph must
reproduce the model on calibration inputs (:class:`FoldCheckOptions`: up to 256
samples of the training split, normalised with the model's encoding; random
pixels, with a warning, when no data is at hand), else :class:`FoldMismatch`
names the first diverging layer. Skipping the check prints a loud warning.
"""

from __future__ import annotations

import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
from torch import nn

from csqcfs_deploy.convert.check import DEFAULT_SAMPLES, FoldCheck, check_fold
from csqcfs_deploy.convert.fold import FoldResult, fold
from csqcfs_deploy.convert.quantize import QuantReport, ScaleOptions, check_profile, quantize
from csqcfs_deploy.errors import (
    DatasetError,
    FoldMismatch,
    InputFileError,
    QuantizationError,
    UnknownDataset,
    UsageError,
)
from csqcfs_deploy.files import require_file
from csqcfs_deploy.ir import IFGraph, InputEncoding, load_graph
from csqcfs_deploy.ir.nodes import CalibrationRecord
from csqcfs_deploy.ir.npz import ARCHIVE_ERRORS
from csqcfs_deploy.ir.profiles import get_profile
from csqcfs_deploy.run.calibration import Calibrated, CalibrationPlan, calibrated_quantize
from csqcfs_deploy.train.checkpoint import ModelConfig, load_checkpoint, load_user_model
from csqcfs_deploy.train.datasets import Dataset, load_dataset

if TYPE_CHECKING:
    from csqcfs_deploy.exporters.nir.float_import import NirImport

HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
ZIP_MAGIC = b"PK\x03\x04"


@dataclass(frozen=True)
class LoadedModel:
    """An integer IF graph plus, when MODEL was a network, where it came from."""

    graph: IFGraph
    source: Path | None
    kind: str                              # "checkpoint", "ifg", "nir" or "module"
    model: nn.Module | None = None
    config: ModelConfig | None = None
    fold: FoldResult | None = None
    report: QuantReport | None = None
    fold_check: FoldCheck | None = None    # None: not folded here, or --no-fold-check
    calibration: Calibrated | None = None  # None: not folded here, or --scales weights
    imported: NirImport | None = None      # a float NIR graph quantized on load

    @property
    def float_graph(self) -> IFGraph | None:
        if self.imported is not None:
            return self.imported.graph
        return None if self.fold is None else self.fold.graph

    @property
    def passes(self) -> dict[str, int]:
        """What was folded (pass or NIR rewrite -> count)."""
        if self.imported is not None:
            return dict(self.imported.folded)
        return {} if self.fold is None else self.fold.log.counts()


@dataclass(frozen=True)
class NirOptions:
    """How a float NIR graph is read: ``semantics`` (``--source-semantics``; None: nir)
    and ``encoding_of`` (a dataset name -> its encoding; None: :func:`load_dataset`'s)."""

    semantics: str | None = None
    encoding_of: Callable[[str], InputEncoding] | None = None


# --------------------------------------------------------------------------- fold check


@dataclass(frozen=True)
class Calibration:
    """Raw samples (N, *input_shape) for the fold check and where they came from."""

    raw: npt.NDArray[np.float32]
    source: str                            # "digits training split", for messages


#: The calibration samples for a network with this config; raises DatasetError
#: when its data is not at hand.
CalibrationSource = Callable[[ModelConfig], Calibration]


@dataclass(frozen=True)
class FoldCheckOptions:
    """How :func:`graph_from_network` checks the fold.

    ``inputs`` gives the calibration samples (None: the training split of the
    config's dataset); when that raises DatasetError and ``random_fallback`` is
    set, random pixels are used instead, with a warning. ``enabled=False`` skips
    the check, with a louder one.
    """

    inputs: CalibrationSource | None = None
    samples: int = DEFAULT_SAMPLES
    enabled: bool = True
    random_fallback: bool = True

    def __post_init__(self) -> None:
        if self.samples < 1:
            raise UsageError(f"--calibration-samples must be >= 1, got {self.samples}")


def warn(text: str) -> None:
    """A warning on stderr (results stay on stdout)."""
    sys.stderr.write(f"warning: {text}\n")


def calibration_from(ds: Dataset, samples: int = DEFAULT_SAMPLES) -> Calibration:
    """Up to ``samples`` training samples of ``ds``, a fixed (seed 0) random subset."""
    n = len(ds.x_train)
    if n == 0:
        raise DatasetError(f"{ds.name} has no training samples to calibrate on")
    pick = np.sort(np.random.default_rng(0).choice(n, size=min(samples, n), replace=False))
    return Calibration(ds.x_train[pick], f"{ds.name} training split")


def random_calibration(config: ModelConfig, samples: int, reason: str) -> Calibration:
    """Uniform random raw pixels in [0, raw_max] (seed 0), when there is no data."""
    rng = np.random.default_rng(0)
    raw_max = config.encoding.raw_max
    raw = rng.uniform(0.0, raw_max, size=(samples, *config.input_shape))
    if float(raw_max).is_integer():
        raw = np.rint(raw)
    return Calibration(raw.astype(np.float32), f"random inputs; no data: {reason}")


def _dataset_calibration(opts: FoldCheckOptions) -> CalibrationSource:
    def inputs(config: ModelConfig) -> Calibration:
        return calibration_from(load_dataset(config.dataset), opts.samples)
    return inputs


def calibration_samples(config: ModelConfig, opts: FoldCheckOptions) -> Calibration:
    """The calibration samples (the fold check's and the scales'): ``opts.inputs`` or
    the config's training split; random pixels, with a warning, when there is no data
    and ``random_fallback`` allows it."""
    source = opts.inputs or _dataset_calibration(opts)
    try:
        cal = source(config)
    except DatasetError as exc:
        if not opts.random_fallback or isinstance(exc, UnknownDataset):
            raise
        reason = str(exc).strip().splitlines()[0][:100] if str(exc).strip() else "none"
        warn(f"no calibration data ({reason}); the fold check and the calibrated scales use "
             "random inputs")
        cal = random_calibration(config, opts.samples, reason)
    shape = tuple(int(d) for d in cal.raw.shape[1:])
    if shape != tuple(config.input_shape):
        raise UsageError(f"the calibration data ({cal.source}) has inputs of shape {shape}, "
                         f"the model takes {tuple(config.input_shape)}; pick the dataset "
                         "with --dataset or --data")
    return Calibration(cal.raw[: opts.samples], cal.source)


def run_fold_check(model: nn.Module, folded: FoldResult, config: ModelConfig,
                   opts: FoldCheckOptions, cal: Calibration | None = None) -> FoldCheck | None:
    """The fold check on the calibration samples (None, with a warning, when disabled)."""
    if not opts.enabled:
        warn("--no-fold-check: the folded graph is NOT checked against the model; a "
             "misconverted network (an activation read wrongly) goes unnoticed")
        return None
    cal = cal or calibration_samples(config, opts)
    x = config.encoding.normalize(cal.raw)
    try:
        return check_fold(model, folded, x, source=cal.source)
    except FoldMismatch as exc:
        again = FoldMismatch(f"{exc}; --no-fold-check skips this check")
        again.check = exc.check
        raise again from None


def file_kind(path: Path) -> str:
    """'ifg', 'nir' or 'checkpoint' from the first bytes of the file; a ``.ifg`` or
    ``.nir`` name on other content (empty, random) is refused as not that kind."""
    with path.open("rb") as fh:
        head = fh.read(8)
    if head.startswith(HDF5_MAGIC):
        return "nir"
    if head.startswith(ZIP_MAGIC):
        try:
            with zipfile.ZipFile(path) as zf:
                if "__manifest__.npy" in zf.namelist():
                    return "ifg"
        except ARCHIVE_ERRORS:
            raise InputFileError(f"{path} is a truncated or corrupt archive") from None
    content = ("it is empty" if not head else "a zip archive without a graph manifest"
               if head.startswith(ZIP_MAGIC) else "unrecognised content")
    if path.suffix.lower() == ".ifg":
        raise InputFileError(f"{path} is not a .ifg graph file ({content})")
    if path.suffix.lower() == ".nir":
        raise InputFileError(f"{path} is not an HDF5/NIR file (no HDF5 signature: {content})")
    if not head:
        raise InputFileError(f"{path} is empty (expected a checkpoint, .ifg or .nir file)")
    return "checkpoint"


def graph_from_network(model: nn.Module, config: ModelConfig, profile: str,
                       per_channel: bool | None, source: Path | None, kind: str,
                       check: FoldCheckOptions | None = None,
                       plan: CalibrationPlan | None = None) -> LoadedModel:
    """Fold ``model``, check the fold against it (``check``; default: on the config's
    dataset) and quantize it to ``profile`` with scales calibrated on the same samples
    for ``plan`` (default: T = 1, P = 0; ``plan.enabled`` False: weight-only scales)."""
    opts = check or FoldCheckOptions()
    plan = plan or CalibrationPlan()
    folded = fold(model, config.input_shape, config.encoding, arch=config.arch,
                  num_classes=config.num_classes)
    cal = calibration_samples(config, opts) if (opts.enabled or plan.enabled) else None
    fold_check = run_fold_check(model, folded, config, opts, cal)
    graph, report, calibrated = quantize_float(folded.graph, profile, per_channel, plan, cal)
    return LoadedModel(graph, source, kind, model, config, folded, report, fold_check,
                       calibrated)


def quantize_float(float_graph: IFGraph, profile: str, per_channel: bool | None,
                   plan: CalibrationPlan, cal: Calibration | None
                   ) -> tuple[IFGraph, QuantReport, Calibrated | None]:
    """Quantize a float IF graph to ``profile``: scales calibrated on ``cal`` for ``plan``
    (recorded in the graph's metadata), or from the weights alone (``cal`` None or
    ``plan.enabled`` False)."""
    prof = get_profile(profile)
    if not plan.enabled or cal is None:
        graph, report = quantize(float_graph, prof, per_channel=per_channel,
                                 options=ScaleOptions(netx=plan.netx))
        return graph, report, None
    graph, report, calibrated = calibrated_quantize(float_graph, prof, per_channel,
                                                    cal.raw, cal.source, plan)
    graph = graph.replace(meta=replace(graph.meta, calibration=CalibrationRecord(
        plan.timesteps, plan.presim, calibrated.ranges.samples, cal.source,
        calibrated.fidelity)))
    return graph, report, calibrated


def load_model(path: str | Path | None, profile: str | None = None,
               per_channel: bool | None = None, user_model: str | None = None,
               user_weights: str | Path | None = None, dataset: str = "digits",
               input_shape: tuple[int, ...] | None = None,
               encoding: InputEncoding | None = None,
               model_args: str | None = None,
               encoding_override: Callable[[InputEncoding], InputEncoding] | None = None,
               check: FoldCheckOptions | None = None,
               plan: CalibrationPlan | None = None,
               nir_import: NirOptions | None = None) -> LoadedModel:
    """Resolve MODEL (or ``--model/--weights``) into an integer IF graph.

    ``encoding_override`` maps a checkpoint's recorded encoding to the one to
    fold with (``--mean/--std``...); ``encoding`` is the one for ``--model``.
    ``check``: how a network is checked after folding (:class:`FoldCheckOptions`);
    ``plan``: what its scales are calibrated for (:class:`CalibrationPlan`);
    ``nir_import``: how a float NIR graph is read (:mod:`csqcfs_deploy.cli.nir_import`).
    """
    if model_args is not None and user_model is None:
        raise UsageError("--model-args needs --model MODULE:FACTORY")
    if user_model is not None:
        if path is not None:
            raise UsageError("give either MODEL or --model/--weights, not both")
        if input_shape is None or encoding is None:
            raise UsageError("--model needs the dataset's input shape and encoding")
        model = load_user_model(user_model, user_weights, model_args)
        config = ModelConfig(arch=user_model, levels=0, phi=0.5, num_classes=0,
                             input_shape=input_shape, encoding=encoding, dataset=dataset)
        return graph_from_network(model, config, profile or "loihi2", per_channel, None,
                                  "module", check, plan)
    if path is None:
        raise UsageError("MODEL is required (a checkpoint, .ifg or .nir file)")
    p = require_file(path, "model file")
    kind = file_kind(p)
    nir_opts = nir_import or NirOptions()
    if kind != "nir" and nir_opts.semantics is not None:
        raise UsageError("--source-semantics applies to a float NIR graph (MODEL.nir)")
    if kind in ("ifg", "nir"):
        try:
            if kind == "ifg":
                graph = load_graph(p)
            else:
                from csqcfs_deploy.cli.nir_import import load_nir_model

                read = load_nir_model(p, profile, per_channel, dataset, encoding_override,
                                      check, plan, nir_opts)
                if isinstance(read, LoadedModel):
                    return read
                graph = read
            check_profile(graph)
        except QuantizationError as exc:
            message = str(exc)
            raise QuantizationError(message if str(p) in message else f"{p}: {message}") from None
        _check_profile_arg(graph, profile, p)
        return LoadedModel(graph, p, kind)
    model, config = load_checkpoint(p)
    if encoding_override is not None:
        config = replace(config, encoding=encoding_override(config.encoding))
    try:
        return graph_from_network(model, config, profile or "loihi2", per_channel, p, kind,
                                  check, plan)
    except UnknownDataset as exc:
        if repr(config.dataset) not in str(exc):
            raise
        raise UnknownDataset(f"{p} names dataset {config.dataset!r}, which no loader knows "
                             f"({exc}); give its data with --data FILE.npz or pick one with "
                             "--dataset") from None


def _check_profile_arg(graph: IFGraph, profile: str | None, path: Path) -> None:
    if not graph.is_integer:
        raise InputFileError(f"{path} holds a float graph; quantize it with convert first")
    if profile is not None and profile != graph.meta.profile:
        raise UsageError(f"{path} is quantized for profile {graph.meta.profile}, not "
                         f"{profile}; convert the checkpoint again with --profile {profile}")
