"""The two fidelity figures every command prints first, and the gates on them (SPEC 4b).

On ``samples`` inputs, at the run's ``T``, ``P``:

* **quantization fidelity**: the share of samples on which the integer IF graph
  (the simulator, synchronous schedule, which the pipelined one equals shifted
  by each layer's depth) predicts the same class as the float IF graph
  (:func:`csqcfs_deploy.convert.calibrate.float_run`: float weights and
  thresholds, same ``T``, ``P`` and the same integer input, ``x_int * scale``): the
  loss the integer scales add (where the encoding re-quantizes a normalised input,
  what that rounding alone changes is reported next to it);
* **agreement with the source model**: the integer SNN against the user's
  float ANN (its own forward, ANN mode): the end-to-end figure, which also holds
  the conversion error that ``T`` and ``L`` imply.

:class:`Gates`: ``--min-agreement`` (percent, on the quantization fidelity;
default 99) and ``--min-source-agreement`` (off by default). A failed gate is
:class:`~csqcfs_deploy.errors.FidelityGateFailed` (exit 9). With the simulator's
counters (``wrapped``/``saturated`` neuron-steps per layer) comes the readout's
saturation, which a calibrated graph does not reach on its data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from csqcfs_deploy.convert.activation import ann_mode
from csqcfs_deploy.convert.calibrate import float_run, integer_input, real_input
from csqcfs_deploy.errors import FidelityGateFailed, UsageError
from csqcfs_deploy.ir import IFGraph, InputEncoding
from csqcfs_deploy.ir.profiles import get_profile
from csqcfs_deploy.ir.schedule import RunConfig
from csqcfs_deploy.run.evaluation import EvalSummary, evaluate
from csqcfs_deploy.run.reference import ann_forward, input_units

DEFAULT_MIN_AGREEMENT = 99.0


@dataclass(frozen=True)
class Gates:
    """Minimum quantization fidelity and source agreement, in percent (None: no gate)."""

    min_agreement: float | None = DEFAULT_MIN_AGREEMENT
    min_source_agreement: float | None = None

    def __post_init__(self) -> None:
        for name, v in (("--min-agreement", self.min_agreement),
                        ("--min-source-agreement", self.min_source_agreement)):
            if v is not None and not 0.0 <= v <= 100.0:
                raise UsageError(f"{name} must be a percentage in 0..100, got {v}")

    def to_json(self) -> dict[str, object]:
        return {"min_agreement": self.min_agreement,
                "min_source_agreement": self.min_source_agreement}


@dataclass(frozen=True)
class Fidelity:
    """The figures of one measurement (fractions in 0..1; None: not measurable).

    ``snn_predictions`` (N,) are the integer simulator's; ``wrapped``/``saturated``:
    neuron-steps per layer (IF layers and the readout) over the whole run.
    ``quantized_ann``: the L-step quantized ANN's agreement with the float graph's
    ANN, given only where it means the same as the SNN (``L = 1``, or a profile
    without a current stage, where nothing wraps). ``input_fidelity``: where the
    encoding is not exact (a normalised input re-quantized to the profile's input
    bits), the float IF graph on the integer input against it on the real input:
    what the input's rounding alone changes (part of the source agreement).
    """

    samples: int
    timesteps: int
    presim: int
    schedule: str
    readout: str
    source_accuracy: float | None
    float_if_accuracy: float | None
    snn_accuracy: float
    quantization_fidelity: float | None
    source_agreement: float | None
    wrapped: dict[str, int] | None
    saturated: dict[str, int] | None
    gates: Gates = field(default_factory=Gates)
    not_measured: str | None = None
    quantized_ann: float | None = None
    input_fidelity: float | None = None
    snn_predictions: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64),
                                                   repr=False)

    @property
    def readout_saturated(self) -> int | None:
        return None if self.saturated is None else int(self.saturated.get(self.readout, 0))

    def failures(self) -> list[str]:
        """One phrase per gate that does not hold."""
        out: list[str] = []
        g = self.gates
        if g.min_agreement is not None and self.quantization_fidelity is not None \
                and 100 * self.quantization_fidelity < g.min_agreement:
            out.append(f"quantization fidelity {100 * self.quantization_fidelity:.2f} % is "
                       f"below --min-agreement {g.min_agreement:g} %")
        if g.min_source_agreement is not None:
            if self.source_agreement is None:
                out.append("agreement with the source model cannot be measured (no source "
                           "model), but --min-source-agreement asks for it")
            elif 100 * self.source_agreement < g.min_source_agreement:
                out.append(f"agreement with the source model {100 * self.source_agreement:.2f}"
                           f" % is below --min-source-agreement {g.min_source_agreement:g} %")
        return out

    @property
    def passed(self) -> bool:
        return not self.failures()

    def check(self) -> None:
        """Raise FidelityGateFailed (exit 9) with a one-line reason when a gate fails."""
        fails = self.failures()
        if fails:
            raise FidelityGateFailed(
                "; ".join(fails) + f" (T = {self.timesteps}, P = {self.presim}, "
                f"{self.samples} samples); see the fidelity lines above")

    def lines(self) -> list[str]:
        """What a command prints first."""
        pct = _pct
        head = f"fidelity on {self.samples} samples at T = {self.timesteps}, P = {self.presim}:"
        q = (f"quantization fidelity {pct(self.quantization_fidelity)} (integer SNN vs float "
             "IF graph)" if self.quantization_fidelity is not None
             else f"quantization fidelity not measured ({self.not_measured})")
        s = (f"agreement with the source model {pct(self.source_agreement)} (integer SNN vs "
             "your float ANN)" if self.source_agreement is not None
             else "agreement with the source model not measured (no source model)")
        acc = (f"accuracy: source ANN {pct(self.source_accuracy)}, float IF graph "
               f"{pct(self.float_if_accuracy)}, integer SNN {pct(self.snn_accuracy)}")
        out = [head, "  " + q, "  " + s, "  " + acc]
        if self.input_fidelity is not None:
            out.append(f"  input rounding alone (float IF graph on the integer input vs the "
                       f"real input): {pct(self.input_fidelity)} agree")
        if self.quantized_ann is not None:
            out.append(f"  quantized ANN (L-step, ANN mode) agrees with the float ANN on "
                       f"{pct(self.quantized_ann)}")
        if self.wrapped is not None and self.saturated is not None:
            w = {k: v for k, v in self.wrapped.items() if v}
            s_ = {k: v for k, v in self.saturated.items() if v}
            if not w and not s_:
                out.append("  overflow: no current wrapped, no membrane saturated")
            else:
                parts = [f"{k} {v}" for k, v in w.items()]
                out.append("  overflow: current wrapped in "
                           + (", ".join(parts) if parts else "no layer")
                           + "; saturated in "
                           + (", ".join(f"{k} {v}" for k, v in s_.items()) if s_
                              else "no layer") + " (neuron-steps)")
        fails = self.failures()
        out.append("  gates: " + ("; ".join(fails) if fails else _gate_text(self.gates)
                                  + " hold"))
        return out

    def to_json(self) -> dict[str, object]:
        return {
            "samples": self.samples, "timesteps": self.timesteps, "presim": self.presim,
            "schedule": self.schedule, "source_accuracy": self.source_accuracy,
            "float_if_accuracy": self.float_if_accuracy, "snn_accuracy": self.snn_accuracy,
            "quantization_fidelity": self.quantization_fidelity,
            "source_agreement": self.source_agreement, "quantized_ann": self.quantized_ann,
            "input_fidelity": self.input_fidelity,
            "not_measured": self.not_measured,
            "wrapped": self.wrapped, "saturated": self.saturated,
            "readout_saturated": self.readout_saturated,
            "gates": {**self.gates.to_json(), "passed": self.passed,
                      "failures": self.failures()},
        }


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f} %"


def _gate_text(g: Gates) -> str:
    parts = []
    if g.min_agreement is not None:
        parts.append(f"fidelity >= {g.min_agreement:g} %")
    if g.min_source_agreement is not None:
        parts.append(f"source agreement >= {g.min_source_agreement:g} %")
    return ", ".join(parts) if parts else "no gates set;"


@torch.no_grad()
def source_predictions(model: nn.Module, encoding: InputEncoding, raw: npt.NDArray[Any],
                       batch: int = 256) -> npt.NDArray[np.int64]:
    """The user's float ANN (eval, ANN mode) on raw samples (N, *shape) -> classes (N,)."""
    was_training = model.training
    model.eval()
    preds: list[npt.NDArray[np.int64]] = []
    try:
        with ann_mode(model):
            for i in range(0, len(raw), batch):
                x = torch.from_numpy(encoding.normalize(raw[i:i + batch]))
                preds.append(model(x).argmax(1).cpu().numpy().astype(np.int64))
    finally:
        model.train(was_training)
    return np.concatenate(preds) if preds else np.zeros(0, dtype=np.int64)


def measure(graph: IFGraph, raw: npt.NDArray[Any], labels: npt.NDArray[np.integer[Any]],
            cfg: RunConfig, *, float_graph: IFGraph | None = None,
            model: nn.Module | None = None, encoding: InputEncoding | None = None,
            gates: Gates | None = None, snn: EvalSummary | None = None,
            not_measured: str = "MODEL is an IF graph: its float graph is not at hand",
            batch_size: int = 128, progress: bool = False) -> Fidelity:
    """The fidelity of integer ``graph`` on raw samples (N, *shape) with labels (N,).

    ``snn``: the integer simulator's summary of the same samples and config, reused
    when given (it must carry the overflow counters); else the simulator runs here.
    """
    sync = RunConfig(cfg.timesteps, cfg.presim, "synchronous")
    if snn is None or snn.backend != "int" or snn.layer_wrapped is None:
        snn = evaluate("int", graph, raw, labels, sync, batch_size, progress=progress)
    q = snn.predictions
    y = np.asarray(labels)[: len(q)]
    raw = raw[: len(q)]
    f_pred = m_pred = input_fid = None
    if float_graph is not None:
        f_pred = float_run(float_graph, integer_input(float_graph, raw), sync).predictions
        if not float_graph.input.encoding.exact:
            real = float_run(float_graph, real_input(float_graph, raw), sync).predictions
            input_fid = float((real == f_pred).mean()) if len(q) else None
    if model is not None and encoding is not None:
        m_pred = source_predictions(model, encoding, raw)
    qann = None
    levels = graph.meta.levels
    if float_graph is not None and (levels == 1 or get_profile(
            str(graph.meta.profile)).current_bits is None):
        fa = ann_forward(float_graph, input_units(float_graph, raw)).predictions
        qa = ann_forward(graph, input_units(graph, raw)).predictions
        qann = float((fa == qa).mean()) if len(q) else None
    return Fidelity(
        samples=len(q), timesteps=cfg.timesteps, presim=cfg.presim, schedule=cfg.schedule,
        readout=graph.readout.name,
        source_accuracy=None if m_pred is None else float((m_pred == y).mean()),
        float_if_accuracy=None if f_pred is None else float((f_pred == y).mean()),
        snn_accuracy=float((q == y).mean()) if len(q) else 0.0,
        quantization_fidelity=None if f_pred is None else float((q == f_pred).mean()),
        source_agreement=None if m_pred is None else float((q == m_pred).mean()),
        wrapped=snn.layer_wrapped, saturated=snn.layer_saturated,
        gates=gates or Gates(), not_measured=None if f_pred is not None else not_measured,
        quantized_ann=qann, input_fidelity=input_fid, snn_predictions=q)
