"""Import lava-nc 0.10 on Python 3.11+ without editing site-packages.

lava-nc 0.10 declares Python < 3.11 and fails to import on 3.11 for two
reasons, both fixed here by an import hook (a :data:`sys.meta_path` finder)
that touches exactly two Lava modules, only while each one executes:

1. ``lava/magma/compiler/var_model.py`` declares ``@dataclass class
   ByteEncoder`` and uses an instance as the default of other dataclass fields
   (``x: ByteEncoder = ByteEncoder()``). Python 3.11 rejects unhashable
   defaults ("mutable default ... is not allowed"). While that module runs,
   ``dataclasses.dataclass`` adds ``unsafe_hash=True`` for the class named
   ``ByteEncoder`` only, which keeps the 3.10 behaviour (one shared default
   instance). Applied only when the module's source has the offending
   pattern, so a fixed Lava is left alone.
2. ``lava/magma/runtime/message_infrastructure/multiprocessing.py`` calls
   ``multiprocessing.set_start_method('fork')`` at import, which raises
   "context has already been set" once anything used multiprocessing (one
   tqdm bar is enough). While that module runs, the call is a no-op if the
   start method already is ``fork``; any other start method is refused with
   :class:`~csqcfs_deploy.errors.BackendUnavailable` (Lava's runtime needs fork).

Child processes: Lava starts its processes with ``fork`` (the module above
forces it on POSIX), so they inherit the patched, already imported modules and
need no hook of their own. A script that runs Lava should still guard its
entry point (``if __name__ == "__main__":``), as Lava recommends.

Call :func:`import_lava` (or :func:`ensure_lava_compat`) before any ``import
lava`` in this package. Both are no-ops on Python < 3.11 and once Lava's
modules are imported.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.abc
import importlib.machinery
import io
import logging
import multiprocessing
import re
import sys
import threading
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

from csqcfs_deploy.errors import BackendUnavailable

VAR_MODEL = "lava.magma.compiler.var_model"
MP_INFRA = "lava.magma.runtime.message_infrastructure.multiprocessing"
INSTALL_HINT = ("install the 'lava' extra (make setup does: pip install "
                "--ignore-requires-python lava-nc==0.10.0; lava-dl==0.6.0 --no-deps for netx)")

_BYTE_ENCODER_DEFAULT = re.compile(r":\s*ByteEncoder\s*=\s*ByteEncoder\(\)")
_PATCH_LOCK = threading.Lock()


def _needs_hook() -> bool:
    return sys.version_info >= (3, 11)


def _byte_encoder_dataclass(original: Callable[..., Any]) -> Callable[..., Any]:
    """``dataclasses.dataclass`` that makes the class named ByteEncoder hashable."""

    def dataclass(cls: type | None = None, /, **kwargs: Any) -> Any:
        def wrap(c: type) -> type:
            extra = {"unsafe_hash": True} if c.__name__ == "ByteEncoder" else {}
            made: type = original(c, **{**kwargs, **extra})
            return made

        return wrap if cls is None else wrap(cls)

    return dataclass


def _fork_tolerant(original: Callable[..., None]) -> Callable[..., None]:
    """``multiprocessing.set_start_method`` that accepts an already chosen 'fork'."""

    def set_start_method(method: str | None, force: bool = False) -> None:
        current = multiprocessing.get_start_method(allow_none=True)
        if current is None or force:
            original(method, force=force)
        elif current != method:
            raise BackendUnavailable(
                f"Lava needs the {method!r} multiprocessing start method, but this program "
                f"already uses {current!r}; start Lava before choosing another start method")

    return set_start_method


class _PatchingLoader(importlib.abc.Loader):
    """Runs the real loader's ``exec_module`` with one attribute replaced."""

    def __init__(self, real: importlib.abc.Loader, owner: Any, attr: str,
                 make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
        self.real = real
        self.owner = owner
        self.attr = attr
        self.make = make

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self.real.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        with _PATCH_LOCK:
            original = getattr(self.owner, self.attr)
            setattr(self.owner, self.attr, self.make(original))
            try:
                self.real.exec_module(module)
            finally:
                setattr(self.owner, self.attr, original)


class LavaCompatFinder(importlib.abc.MetaPathFinder):
    """Finds the two Lava modules above through the normal path finder and wraps
    their loader; every other import is left to the rest of ``sys.meta_path``."""

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname not in (VAR_MODEL, MP_INFRA):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        if fullname == VAR_MODEL:
            get_source = getattr(spec.loader, "get_source", None)
            source = get_source(fullname) if get_source is not None else None
            if source is None or not _BYTE_ENCODER_DEFAULT.search(source):
                return None  # a Lava that no longer needs the fix
            spec.loader = _PatchingLoader(spec.loader, dataclasses, "dataclass",
                                          _byte_encoder_dataclass)
        else:
            spec.loader = _PatchingLoader(spec.loader, multiprocessing, "set_start_method",
                                          _fork_tolerant)
        return spec


def ensure_lava_compat() -> bool:
    """Install the import hook if this Python needs it; True when it is active.

    Idempotent; a no-op on Python < 3.11 and when Lava's modules are already imported.
    """
    if not _needs_hook():
        return False
    if VAR_MODEL in sys.modules and MP_INFRA in sys.modules:
        return any(isinstance(f, LavaCompatFinder) for f in sys.meta_path)
    if not any(isinstance(f, LavaCompatFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, LavaCompatFinder())
    return True


#: what lava-dl 0.6 prints on stdout while importing: a notice that an optional dataset
#: toolbox is missing (three lines, each naming it)
LAVA_DL_NOTICE = "rophesee"


def import_lava_dl(module: str = "lava.lib.dl.netx") -> ModuleType:
    """Import a lava-dl module through :func:`import_lava`, quietly: lava-dl's
    dataset-toolbox notice and torch's "No CUDA runtime is found" log line (from
    ``torch.utils.cpp_extension``, which lava-dl imports) are dropped, so that stdout
    stays ours (``--json``) and an error stays one line; anything else lava-dl prints
    goes to stderr."""
    printed = io.StringIO()
    cpp_log = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_log.level
    cpp_log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(printed):
            return import_lava(module)
    finally:
        cpp_log.setLevel(level)
        other = [line for line in printed.getvalue().splitlines()
                 if line.strip() and LAVA_DL_NOTICE not in line]
        if other:
            sys.stderr.write("\n".join(other) + "\n")


def import_lava(module: str = "lava.magma.core.run_configs") -> ModuleType:
    """Import a Lava module through the compatibility hook.

    A missing Lava becomes :class:`BackendUnavailable` naming the extra to install;
    a Lava that fails while importing becomes one naming the failure.
    """
    ensure_lava_compat()
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise BackendUnavailable(f"Lava is not available ({exc}): {INSTALL_HINT}") from None
    except (ValueError, TypeError, RuntimeError) as exc:
        raise BackendUnavailable(f"Lava failed to import ({type(exc).__name__}: {exc}): "
                                 f"{INSTALL_HINT}") from None
