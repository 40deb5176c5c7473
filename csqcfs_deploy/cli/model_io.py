"""Load whatever a user passes as MODEL: a checkpoint, an ``.ifg`` or a ``.nir`` file.

The kind is recognised from the file's content, not its name: an ``.ifg`` is
an npz (zip) archive with a manifest, a ``.nir`` file is HDF5, anything else
is tried as a torch checkpoint (``weights_only=True``). A checkpoint is folded
and quantized on the fly to ``profile``.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from csqcfs_deploy.convert.fold import FoldResult, fold
from csqcfs_deploy.convert.quantize import QuantReport, check_profile, quantize
from csqcfs_deploy.errors import InputFileError, UsageError
from csqcfs_deploy.files import require_file
from csqcfs_deploy.ir import IFGraph, InputEncoding, load_graph
from csqcfs_deploy.ir.profiles import get_profile
from csqcfs_deploy.train.checkpoint import ModelConfig, load_checkpoint, load_user_model

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

    @property
    def float_graph(self) -> IFGraph | None:
        return None if self.fold is None else self.fold.graph


def file_kind(path: Path) -> str:
    """'ifg', 'nir' or 'checkpoint' from the first bytes of the file."""
    with path.open("rb") as fh:
        head = fh.read(8)
    if head.startswith(HDF5_MAGIC):
        return "nir"
    if head.startswith(ZIP_MAGIC):
        try:
            with zipfile.ZipFile(path) as zf:
                if "__manifest__.npy" in zf.namelist():
                    return "ifg"
        except zipfile.BadZipFile:
            raise InputFileError(f"{path} is a truncated or corrupt archive") from None
    return "checkpoint"


def graph_from_network(model: nn.Module, config: ModelConfig, profile: str,
                       per_channel: bool | None, source: Path | None, kind: str
                       ) -> LoadedModel:
    folded = fold(model, config.input_shape, config.encoding, arch=config.arch,
                  num_classes=config.num_classes)
    graph, report = quantize(folded.graph, get_profile(profile), per_channel=per_channel)
    return LoadedModel(graph, source, kind, model, config, folded, report)


def load_model(path: str | Path | None, profile: str | None = None,
               per_channel: bool | None = None, user_model: str | None = None,
               user_weights: str | Path | None = None, dataset: str = "digits",
               input_shape: tuple[int, ...] | None = None,
               encoding: InputEncoding | None = None) -> LoadedModel:
    """Resolve MODEL (or ``--model/--weights``) into an integer IF graph."""
    if user_model is not None:
        if path is not None:
            raise UsageError("give either MODEL or --model/--weights, not both")
        if input_shape is None or encoding is None:
            raise UsageError("--model needs the dataset's input shape and encoding")
        model = load_user_model(user_model, user_weights)
        config = ModelConfig(arch=user_model, levels=0, phi=0.5, num_classes=0,
                             input_shape=input_shape, encoding=encoding, dataset=dataset)
        return graph_from_network(model, config, profile or "loihi2", per_channel, None,
                                  "module")
    if path is None:
        raise UsageError("MODEL is required (a checkpoint, .ifg or .nir file)")
    p = require_file(path, "model file")
    kind = file_kind(p)
    if kind == "ifg":
        graph = load_graph(p)
        _check_profile_arg(graph, profile, p)
        check_profile(graph)
        return LoadedModel(graph, p, kind)
    if kind == "nir":
        from csqcfs_deploy.exporters.nir import read_nir_graph

        graph = read_nir_graph(p)
        _check_profile_arg(graph, profile, p)
        return LoadedModel(graph, p, kind)
    model, config = load_checkpoint(p)
    return graph_from_network(model, config, profile or "loihi2", per_channel, p, kind)


def _check_profile_arg(graph: IFGraph, profile: str | None, path: Path) -> None:
    if not graph.is_integer:
        raise InputFileError(f"{path} holds a float graph; quantize it with convert first")
    if profile is not None and profile != graph.meta.profile:
        raise UsageError(f"{path} is quantized for profile {graph.meta.profile}, not "
                         f"{profile}; convert the checkpoint again with --profile {profile}")
