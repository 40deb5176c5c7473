"""Which NIR readers were measured exact on which of our files: the facts, as data.

One :class:`ReaderFact` per (reader, settings, file flavours, file NIR version), as
``benchmarks/nir_readers.py`` measured it on the digits network (or, for the rows
checked in ``make test``, as ``tests/test_nir_export.py`` checks it). ``export
--target nir`` prints the rows that apply to the file it wrote
(:func:`facts_for`); ``--json`` lists them. To update a row after measuring,
edit :data:`READER_FACTS` (one entry per line of the benchmark's table).

Every portable row is measured at ``T = 1`` without pre-simulation (``P = 0``):
that is what the portable flavours promise. From step 2 on, plain readers differ
from the IF graph (hard reset to ``v_reset`` instead of our soft reset), see
:data:`AFTER_STEP_1`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

#: The NIR version whose file layout the current writer produces (``nir.write``'s).
CURRENT_NIR = "1.0.8"
#: measured on the digits test set (360 samples), profiles loihi2, int8 and int16
MEASURED = "benchmarks/nir_readers.py, 2026-12-02"
IN_MAKE_TEST = "tests/test_nir_export.py (make test), 2026-12"
AFTER_STEP_1 = ("after step 1 plain NIR readers differ from the IF graph: they reset hard "
                "(v <- v_reset = 0) where the IF graph subtracts the threshold, so only T = 1, "
                "P = 0 is exact for them")

Exact = Literal["yes", "no", "refuses"]
Batched = Literal["yes", "no", "not measured"]


@dataclass(frozen=True)
class ReaderFact:
    """One measured reader: on files of ``flavors`` written for a NIR version in
    ``nir_versions``,
    run with ``settings`` for ``steps`` steps after ``presim`` steps, it was exact
    ("yes": same predictions and readout as our integer simulator), not exact ("no",
    ``note`` says how far off), or refused the file ("refuses"). ``batched``: whether it
    was exact with a batch dimension too."""

    reader: str
    version: str
    flavors: tuple[str, ...]
    settings: str
    exact: Exact
    batched: Batched
    source: str
    nir_versions: tuple[str, ...] = (CURRENT_NIR,)
    steps: int | None = 1     # None: every T
    presim: int | None = 0    # None: every P
    note: str = ""

    def label(self) -> str:
        """``reader version (settings)``, as the CLI prints it."""
        return " ".join(x for x in (self.reader, self.version, f"({self.settings})") if x)

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        data["flavors"] = list(self.flavors)
        data["nir_versions"] = list(self.nir_versions)
        return data


_PORTABLE = ("portable", "portable-uniform")
_ALL = ("portable", "portable-uniform", "native")

READER_FACTS: tuple[ReaderFact, ...] = (
    ReaderFact("csqcfs-deploy", "", _ALL, "read_nir_graph", "yes", "yes", IN_MAKE_TEST,
               nir_versions=(CURRENT_NIR, "1.0.4"), steps=None, presim=None,
               note="restores the IF graph exactly (every schedule too)"),
    ReaderFact("plain NIR simulator", "", _PORTABLE,
               "tests/nir_plain.py: v += r*I, spike when v > v_threshold, v <- v_reset", "yes",
               "yes", IN_MAKE_TEST),
    ReaderFact("plain NIR simulator", "", ("native",), "tests/nir_plain.py, via nir.read",
               "refuses", "yes", IN_MAKE_TEST),
    ReaderFact("norse", "1.1", _PORTABLE, "from_nir, dt=1.0, unbatched", "yes", "no",
               IN_MAKE_TEST, note="batched it flattens the batch (Flatten(start_dim=0))"),
    ReaderFact("norse", "1.1", ("native",), "from_nir", "refuses", "yes", IN_MAKE_TEST),
    ReaderFact("spikingjelly", "2.0.0", ("portable-uniform",), "from_nir, dt=1.0",
               "yes", "yes", MEASURED, nir_versions=(CURRENT_NIR, "1.0.4"),
               note="needs dt=1.0 (it requires r = 1/dt); 96.7-97.2 % at T = 4"),
    ReaderFact("spikingjelly", "2.0.0", ("portable",), "from_nir, dt=1.0", "refuses",
               "yes", MEASURED, nir_versions=(CURRENT_NIR, "1.0.4"),
               note="asserts one threshold per layer: use --flavor portable-uniform"),
    ReaderFact("spikingjelly", "2.0.0", ("native",), "from_nir", "refuses", "yes", MEASURED,
               note="nir.read refuses the file"),
    ReaderFact("snnTorch", "1.0.0", ("portable",), "import_from_nir", "refuses", "yes",
               MEASURED, note="v_threshold must be the same for all neurons"),
    ReaderFact("snnTorch", "1.0.0", ("portable-uniform",), "import_from_nir", "no", "no",
               MEASURED, note="loads, then every run fails in conv2d (TypeError), also with "
               "groups cast to int"),
    ReaderFact("snnTorch", "1.0.0", ("native",), "import_from_nir", "refuses", "yes",
               MEASURED, note="nir.read refuses the file"),
    ReaderFact("sinabs", "3.1.3", _ALL, "from_nir", "refuses", "yes", MEASURED,
               note="pins nir <= 1.0.4 (no IF v_reset): write with --nir-version 1.0.4"),
    ReaderFact("sinabs", "3.1.3", _PORTABLE, "from_nir, SingleSpike, min_v_mem=None", "yes",
               "yes", MEASURED, nir_versions=("1.0.4",),
               note="96.9-98.1 % at T = 4"),
    ReaderFact("sinabs", "3.1.3", _PORTABLE, "from_nir, defaults (MultiSpike, min_v_mem=-θ)",
               "no", "no", MEASURED, nir_versions=("1.0.4",),
               note="82.8-84.4 % agreement at T = 1: pass SingleSpike and min_v_mem=None"),
    ReaderFact("sinabs", "3.1.3", ("native",), "from_nir", "refuses", "yes", MEASURED,
               nir_versions=("1.0.4",), note="nir.read refuses the file"),
    ReaderFact("rockpool", "3.1.0", _ALL, "from_nir", "refuses", "yes", MEASURED,
               nir_versions=(CURRENT_NIR, "1.0.4"),
               note="1.0.8 files: no IF v_reset in its nir 1.0.4; 1.0.4 files: cannot convert "
               "nir.IF"),
)


def facts_for(flavor: str, nir_version: str = CURRENT_NIR) -> tuple[ReaderFact, ...]:
    """The rows of :data:`READER_FACTS` that apply to a ``flavor`` file written for NIR
    ``nir_version``."""
    return tuple(f for f in READER_FACTS
                 if flavor in f.flavors and nir_version in f.nir_versions)
