"""A case of the bad-input corpus, the real files it is made from, and the builder."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.hostile import mutate as mu

Argv = tuple[str, ...]


@dataclass(frozen=True)
class BaseFiles:
    """The real files the corpus is made from (names relative to the corpus root)."""

    root: Path
    checkpoint: str = "good.pt"
    ifg: str = "good.ifg"
    nir: str = "good.nir"
    netx: str = "good.netx"
    data: str = "good-data.npz"
    energy: str = "good-energy.json"
    cifar: str = "good-cifar"

    def path(self, name: str) -> Path:
        return self.root / name


@dataclass(frozen=True)
class Case:
    """One hostile input and the commands that read it; ``runs[quick]`` is the one the
    default test runs. The error line must name one of ``names``; none of ``markers``
    may exist afterwards. ``may_succeed``: reading it is allowed to work (a bomb that a
    lazy reader never touches), within the time and memory limits."""

    category: str
    name: str
    runs: tuple[Argv, ...]
    quick: int = 0
    names: tuple[str, ...] = ()
    markers: tuple[Path, ...] = ()
    timeout_s: float = 60.0
    may_succeed: bool = False

    @property
    def id(self) -> str:
        return f"{self.category}/{self.name}"


def model_runs(f: str) -> tuple[Argv, ...]:
    """Every command that reads a MODEL file ``f``."""
    return (("run", f, "--backend", "int", "--samples", "4"),
            ("verify", f, "--backends", "int", "--samples", "4"),
            ("report", f, "--samples", "4"),
            ("export", f, "-o", "out.nir"),
            ("sweep", f, "-T", "1", "--samples", "4"),
            ("convert", f, "-o", "out.ifg", "--samples", "4", "--min-agreement", "0"))


@dataclass
class CorpusBuilder:
    """Collects cases; the quick command rotates through ``runs`` within a category."""

    base: BaseFiles
    cases: list[Case] = field(default_factory=list)
    _per_category: dict[str, int] = field(default_factory=dict)

    @property
    def root(self) -> Path:
        return self.base.root

    def add(self, category: str, name: str, runs: Sequence[Argv], *,
            names: Sequence[str] = (), markers: Sequence[Path] = (),
            timeout_s: float = 60.0, quick: int | None = None,
            may_succeed: bool = False) -> None:
        n = self._per_category.get(category, 0)
        self._per_category[category] = n + 1
        pick = n % len(runs) if quick is None else quick
        self.cases.append(Case(category, name, tuple(runs), pick, tuple(names),
                               tuple(markers), timeout_s, may_succeed))

    def model_file(self, category: str, name: str, filename: str, **kw: Any) -> None:
        """A hostile MODEL file, read by every command; the error must name it."""
        self.add(category, name, model_runs(filename), names=(filename,), **kw)

    def write(self, filename: str, data: bytes) -> str:
        mu.write_bytes(self.root / filename, data)
        return filename


def default_selection(cases: Sequence[Case], per_category: int,
                      always: Sequence[str] = ()) -> list[Case]:
    """Up to ``per_category`` cases of each category, evenly spread, plus the cases whose
    id is in ``always``; in corpus order."""
    chosen: set[str] = set(always)
    categories: dict[str, list[Case]] = {}
    for case in cases:
        categories.setdefault(case.category, []).append(case)
    for items in categories.values():
        step = max(1.0, len(items) / per_category)
        chosen.update(items[int(i * step)].id for i in range(min(per_category, len(items))))
    return [case for case in cases if case.id in chosen]
