"""Energy estimates from activity counts (SPEC section 7).

Under a named constant set (each with its source), per sample::

    E_SNN = e_mac * MAC_first + e_sop * SOPs + e_active * active + e_inactive * inactive
    E_ANN = e_mac * MACs(all layers)           (only for sets with a MAC energy)

where ``active`` counts neuron-steps in which the neuron spiked and
``inactive`` the other neuron-steps (an assumption: Loihi's table does not
define activity further). A set without a MAC energy (Loihi) sends the
analog input as graded spikes: those count as SOPs (non-zero inputs x fan-out
per step). The counts come from :mod:`csqcfs_deploy.report.sops`.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from csqcfs_deploy.errors import InputFileError, UsageError
from csqcfs_deploy.files import require_file
from csqcfs_deploy.report.sops import Activity

# --------------------------------------------------------------------------- energy


@dataclass(frozen=True)
class EnergyConstants:
    """Energy per operation in picojoules, with the source it comes from."""

    name: str
    source: str
    sop_pj: float
    mac_pj: float | None = None
    neuron_active_pj: float = 0.0
    neuron_inactive_pj: float = 0.0

    def __post_init__(self) -> None:
        problem = constants_problem(self.__dict__)
        if problem is not None:
            raise UsageError(f"energy set {self.name!r}: {problem}")


#: energies per operation a set gives (pJ); mac_pj may be null (no MAC energy known)
ENERGY_FIELDS = ("sop_pj", "mac_pj", "neuron_active_pj", "neuron_inactive_pj")
#: largest energy file read (a constant set is a few hundred bytes)
MAX_ENERGY_FILE_BYTES = 1 << 20


def _is_energy(value: object) -> bool:
    """A finite number >= 0: an int or a float, not a bool (``True`` is an int)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value)) and value >= 0
    except OverflowError:  # an int beyond float's range
        return False


def constants_problem(fields: dict[str, object]) -> str | None:
    """What is wrong with a constant set's fields (types and ranges), or None."""
    for key in ("name", "source"):
        value = fields.get(key)
        if not isinstance(value, str) or not value.strip():
            return f"{key} must be a non-empty string, got {_shown(value)}"
    for key in ENERGY_FIELDS:
        value = fields.get(key)
        if key == "mac_pj" and value is None:
            continue
        if not _is_energy(value):
            return f"{key} must be a finite number >= 0 (pJ), got {_shown(value)}"
    return None


def _shown(value: object) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        text = type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


BUILTIN_ENERGY: dict[str, EnergyConstants] = {
    "cmos45": EnergyConstants(
        "cmos45", "Horowitz, 'Computing's energy problem', ISSCC 2014 (45 nm, 0.9 V): "
        "32-bit float MAC 4.6 pJ, add (AC) 0.9 pJ", sop_pj=0.9, mac_pj=4.6),
    "loihi": EnergyConstants(
        "loihi", "Davies et al., 'Loihi', IEEE Micro 38(1), 2018, Table 2: synaptic spike op "
        "23.6 pJ, neuron update 81 pJ active / 52 pJ inactive (pre-silicon)",
        sop_pj=23.6, mac_pj=None, neuron_active_pj=81.0, neuron_inactive_pj=52.0),
}


def _read_json(p: Path) -> object:
    """The JSON value in ``p``; InputFileError naming ``p`` for anything unreadable."""
    if p.stat().st_size > MAX_ENERGY_FILE_BYTES:
        raise InputFileError(f"{p}: {p.stat().st_size} bytes is too large for an energy "
                             f"constants file (at most {MAX_ENERGY_FILE_BYTES})")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputFileError(f"{p} is not valid JSON ({exc.msg} at line {exc.lineno} "
                             f"column {exc.colno})") from None
    except UnicodeDecodeError:
        raise InputFileError(f"{p} is not valid JSON (not UTF-8 text)") from None
    except RecursionError:
        raise InputFileError(f"{p}: JSON nested too deeply to be an energy constants "
                             "file") from None
    except OSError as exc:
        raise InputFileError(f"{p} cannot be read ({exc.strerror})") from None


def load_energy_json(path: str | Path) -> EnergyConstants:
    """A user-supplied constant set: a JSON object with name, source (non-empty
    strings), sop_pj and optionally mac_pj (or null), neuron_active_pj,
    neuron_inactive_pj (finite numbers >= 0, not booleans)."""
    p = require_file(path, "energy constants file")
    data = _read_json(p)
    if not isinstance(data, dict):
        raise InputFileError(f"{p}: expected a JSON object with name, source, sop_pj, got a "
                             f"JSON {type(data).__name__}")
    allowed = {"name", "source", *ENERGY_FIELDS}
    unknown = set(data) - allowed
    if unknown:
        raise InputFileError(f"{p}: unknown keys {sorted(unknown)} (allowed: {sorted(allowed)})")
    missing = {"name", "source", "sop_pj"} - set(data)
    if missing:
        raise InputFileError(f"{p}: missing keys {sorted(missing)}")
    fields: dict[str, Any] = {"mac_pj": None, "neuron_active_pj": 0.0,
                              "neuron_inactive_pj": 0.0, **data}
    problem = constants_problem(fields)
    if problem is not None:
        raise InputFileError(f"{p}: {problem}")
    mac = fields["mac_pj"]
    return EnergyConstants(fields["name"], fields["source"], float(fields["sop_pj"]),
                           None if mac is None else float(mac),
                           float(fields["neuron_active_pj"]),
                           float(fields["neuron_inactive_pj"]))


def resolve_energy(names: str) -> list[EnergyConstants]:
    """Comma-separated built-in names and/or paths to JSON files."""
    sets: list[EnergyConstants] = []
    for item in (s.strip() for s in names.split(",") if s.strip()):
        if item in BUILTIN_ENERGY:
            sets.append(BUILTIN_ENERGY[item])
        elif item.endswith(".json") or Path(item).exists():
            sets.append(load_energy_json(item))
        else:
            raise UsageError(f"unknown energy set {item!r} (built in: "
                             f"{', '.join(BUILTIN_ENERGY)}; or a JSON file)")
    return sets


@dataclass(frozen=True)
class EnergyEstimate:
    constants: EnergyConstants
    snn_pj: float
    ann_pj: float | None

    @property
    def ratio(self) -> float | None:
        """E_ANN / E_SNN (how many times less energy the SNN needs)."""
        if self.ann_pj is None or self.snn_pj == 0:
            return None
        return self.ann_pj / self.snn_pj

    def to_json(self) -> dict[str, object]:
        return {"name": self.constants.name, "source": self.constants.source,
                "constants": {k: v for k, v in self.constants.__dict__.items()
                              if k not in ("name", "source")},
                "snn_pj_per_sample": self.snn_pj, "ann_pj_per_sample": self.ann_pj,
                "ann_over_snn": self.ratio}


def estimate(activity: Activity, constants: EnergyConstants) -> EnergyEstimate:
    """Energy per sample (pJ) of the SNN and, where a MAC energy is known, the ANN."""
    n = max(activity.samples, 1)
    active = activity.spikes
    inactive = activity.neuron_steps - active
    if constants.mac_pj is not None:
        first = constants.mac_pj * activity.input_macs
    else:
        first = constants.sop_pj * activity.input_graded_sops
    snn = (first + constants.sop_pj * activity.sops + constants.neuron_active_pj * active
           + constants.neuron_inactive_pj * inactive) / n
    ann = None if constants.mac_pj is None else constants.mac_pj * activity.ann_macs / n
    return EnergyEstimate(constants, snn, ann)
