"""Memory a run needs and the system has: the check made before recording every spike."""

from __future__ import annotations

from csqcfs_deploy.errors import UsageError
from csqcfs_deploy.ir import IFGraph
from csqcfs_deploy.ir.schedule import RunConfig, recording_bytes, total_steps


def available_memory_bytes() -> int | None:
    """Memory the system can still give (MemAvailable on Linux), or None if unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def format_bytes(n: float) -> str:
    """``n`` bytes for people: ``512 B``, ``4.0 MiB``, ``2.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def check_recording_memory(graph: IFGraph, cfg: RunConfig, batch: int) -> int:
    """Bytes a recorded batch of ``batch`` samples needs (one byte per neuron and step,
    :func:`~csqcfs_deploy.ir.schedule.recording_bytes`); UsageError when that exceeds
    half the available memory."""
    need = recording_bytes(graph, cfg, batch)
    avail = available_memory_bytes()
    if avail is not None and need > avail // 2:
        raise UsageError(
            f"recording every spike of a batch of {batch} for {total_steps(graph, cfg)} steps "
            f"needs {format_bytes(need)}, more than half of the {format_bytes(avail)} "
            "available; use a smaller batch or fewer steps")
    return need
