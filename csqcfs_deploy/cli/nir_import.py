"""MODEL.nir: read as an integer graph, or, a float (third-party) graph, quantized on load.

A csqcfs-deploy file, and a plain NIR graph of integer values and IF neurons only, are
read as they are (:func:`~csqcfs_deploy.exporters.nir.read_nir_graph`'s rules). A plain
graph with float values, LIF/CubaLIF neurons, AvgPool2d, Scale or ``r != 1`` (or any
plain graph when ``--profile`` or ``--source-semantics`` is given) is a *float network*:
:func:`~csqcfs_deploy.exporters.nir.float_import.import_float_nir` makes its float IF graph
with the ``--source-semantics`` neuron rule, and it is quantized to the profile with
scales calibrated on the data, exactly as a folded checkpoint is
(:func:`~csqcfs_deploy.cli.model_io.quantize_float`). NIR carries no input encoding, so
the data's (``--dataset``/``--data``, with ``--mean/--std``...) applies; the command says
so, and which semantics it read, on stderr (``note:`` lines).
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import nir
import numpy as np

from csqcfs_deploy.cli.model_io import (
    FoldCheckOptions,
    LoadedModel,
    NirOptions,
    calibration_samples,
    quantize_float,
)
from csqcfs_deploy.errors import UsageError
from csqcfs_deploy.exporters.nir.float_import import SourceNetwork, import_float_nir
from csqcfs_deploy.exporters.nir.reader import load_nir, named_errors, nir_to_graph
from csqcfs_deploy.exporters.nir.semantics import graph_metadata
from csqcfs_deploy.ir import IFGraph, InputEncoding
from csqcfs_deploy.run.calibration import CalibrationPlan
from csqcfs_deploy.train.datasets import describe_encoding, load_dataset
from csqcfs_deploy.train.model_config import ModelConfig

#: NIR node types only the float import reads.
FLOAT_NODE_TYPES = (nir.LIF, nir.CubaLIF, nir.AvgPool2d, nir.Scale)


def note(text: str) -> None:
    """A note on stderr (results stay on stdout)."""
    sys.stderr.write(f"note: {text}\n")


def _fractional(value: object) -> bool:
    arr = np.asarray(value) if value is not None else np.zeros(0)
    return arr.dtype.kind == "f" and bool(np.any(arr != np.round(arr)))


def is_float_network(ng: nir.NIRGraph) -> bool:
    """A plain graph the integer reader cannot take as is: float weights or biases, r != 1,
    or node types only the float import reads."""
    for node in ng.nodes.values():
        if isinstance(node, FLOAT_NODE_TYPES):
            return True
        if isinstance(node, nir.IF) and np.any(np.asarray(node.r) != 1):
            return True
        if _fractional(getattr(node, "weight", None)) or _fractional(getattr(node, "bias",
                                                                             None)):
            return True
    return False


def load_nir_model(p: Path, profile: str | None, per_channel: bool | None, dataset: str,
                   encoding_override: Callable[[InputEncoding], InputEncoding] | None,
                   check: FoldCheckOptions | None, plan: CalibrationPlan | None,
                   opts: NirOptions) -> LoadedModel | IFGraph:
    """The integer graph of an integer NIR file, or the loaded, quantized float network."""
    path, ng = load_nir(p, foreign=True)
    ours = graph_metadata(ng).get("format") is not None
    if ours and opts.semantics is not None:
        raise UsageError(f"{path} is a csqcfs-deploy NIR file; --source-semantics applies to "
                         "a float NIR graph from another tool")
    if ours or (profile is None and opts.semantics is None and not is_float_network(ng)):
        with named_errors(path):
            return nir_to_graph(ng)
    enc = (opts.encoding_of or (lambda name: load_dataset(name).encoding))(dataset)
    if encoding_override is not None:
        enc = encoding_override(enc)
    with named_errors(path):
        imported = import_float_nir(ng, opts.semantics or "nir", enc, arch=f"nir:{path.name}")
    fg = imported.graph
    config = ModelConfig(arch=fg.meta.arch, levels=1, phi=0.0,
                         num_classes=fg.readout.channels, input_shape=fg.input.shape,
                         encoding=fg.input.encoding, dataset=dataset)
    plan = plan or CalibrationPlan()
    cal = calibration_samples(config, check or FoldCheckOptions()) if plan.enabled else None
    graph, report, calibrated = quantize_float(fg, profile or "loihi2", per_channel, plan, cal)
    for line in imported.notes():
        note(f"{path.name}: {line}")
    note(f"{path.name}: NIR carries no input encoding; the data's applies: {dataset} "
         f"({describe_encoding(fg.input.encoding)})")
    return LoadedModel(graph, path, "nir", SourceNetwork(fg, plan.timesteps), config, None,
                       report, None, calibrated, imported)
