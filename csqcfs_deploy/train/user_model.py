"""``--model MODULE:FACTORY``: find a user's factory and call it, safely.

Accepted forms of the spec::

    mynets:vgg16                       # a module importable from the cwd or sys.path
    path/to/mynets.py:vgg16            # a Python file
    mynets:vgg16(num_classes=100, L=8) # arguments inline: literals only
    mynets:vgg16(100)

plus ``--model-args '{"num_classes": 100}'`` (a JSON object of keyword
arguments). Inline arguments are parsed with :func:`ast.parse` and every
argument with :func:`ast.literal_eval`; nothing in the spec is evaluated.
Both forms may be combined: the inline positional and keyword arguments and
the JSON keywords are merged, and a keyword given in both is an error.

What may be called (checked before anything is called, :func:`check_factory`):
the module may not be one of the Python standard library (``os:system``,
``subprocess:run``, ``shutil:rmtree`` are refused before the import), and the
factory must be a class derived from ``torch.nn.Module`` or a function written
in Python (``def``; a bound method of one counts) that is not itself from the
standard library (``from os import system`` in your module does not make
``mynets:system`` callable). Built-in functions, other classes and other
callable objects are refused. Whatever the factory returns must be a
``torch.nn.Module`` (:func:`~csqcfs_deploy.train.checkpoint.load_user_model`).
Arguments are literals only, so nothing from the command line is evaluated.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.util
import inspect
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from torch import nn

from csqcfs_deploy.errors import UsageError


@dataclass(frozen=True)
class FactorySpec:
    """A parsed ``--model`` value: where the factory lives and what to pass it."""

    target: str                 # module name or path of a .py file
    factory: str
    args: tuple[object, ...] = ()
    kwargs: dict[str, object] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.target}:{self.factory}"

    def call_text(self) -> str:
        parts = [repr(a) for a in self.args] + [f"{k}={v!r}" for k, v in self.kwargs.items()]
        return f"{self.name}({', '.join(parts)})"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else ""


def _describe(exc: BaseException) -> str:
    line = _first_line(exc)
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def parse_model_args(text: str | None) -> dict[str, object]:
    """``--model-args``: a JSON object of keyword arguments (empty when None)."""
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UsageError(f"--model-args is not valid JSON ({exc.msg} at column {exc.colno}); "
                         """give an object such as '{"num_classes": 100}'""") from None
    if not isinstance(value, dict):
        raise UsageError(f"--model-args must be a JSON object such as "
                         f"""'{{"num_classes": 100}}', got a {type(value).__name__}""")
    return value


def _parse_call(text: str, factory: str, spec: str) -> tuple[tuple[object, ...],
                                                              dict[str, object]]:
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as exc:
        raise UsageError(f"--model {spec!r}: the arguments are not valid Python call syntax "
                         f"({exc.msg})") from None
    call = tree.body
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name) \
            or call.func.id != factory:
        raise UsageError(f"--model {spec!r}: expected FACTORY(arguments) after the colon, "
                         "like mynets:vgg16(num_classes=100)")
    args: list[object] = []
    for i, node in enumerate(call.args, 1):
        if isinstance(node, ast.Starred):
            raise UsageError(f"--model {spec!r}: *arguments are not accepted")
        args.append(_literal(node, i, spec))
    kwargs: dict[str, object] = {}
    for kw in call.keywords:
        if kw.arg is None:
            raise UsageError(f"--model {spec!r}: **arguments are not accepted; "
                             "use --model-args for a dict of keywords")
        kwargs[kw.arg] = _literal(kw.value, kw.arg, spec)
    return tuple(args), kwargs


def _literal(node: ast.expr, name: int | str, spec: str) -> object:
    """The value of one argument; ``name`` is its position (from 1) or keyword."""
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        src = ast.unparse(node)
        src = src if len(src) <= 60 else src[:57] + "..."
        label = f"argument {name} ({src})" if isinstance(name, int) else f"argument {name}={src}"
        raise UsageError(f"--model {spec!r}: {label} is not a literal (only numbers, "
                         "strings, booleans, None, tuples, lists and dicts are accepted; "
                         "nothing is evaluated)") from None


def parse_model_spec(spec: str, model_args: str | None = None) -> FactorySpec:
    """Split ``MODULE:FACTORY[(literal arguments)]`` and merge ``--model-args``."""
    text = spec.strip()
    paren = text.find("(")
    head, call = (text, None) if paren < 0 else (text[:paren], text[paren:])
    target, sep, factory = head.rpartition(":")
    target, factory = target.strip(), factory.strip()
    if not sep or not target or not factory:
        raise UsageError(f"--model must be MODULE:FACTORY (or path/to/file.py:FACTORY), "
                         f"got {spec!r}")
    if not factory.isidentifier():
        raise UsageError(f"--model {spec!r}: factory name {factory!r} is not a Python name")
    args: tuple[object, ...] = ()
    kwargs: dict[str, object] = {}
    if call is not None:
        args, kwargs = _parse_call(factory + call, factory, spec)
    extra = parse_model_args(model_args)
    both = sorted(set(kwargs) & set(extra))
    if both:
        raise UsageError(f"argument {both[0]!r} is given both inline in --model and in "
                         "--model-args; give it once")
    return FactorySpec(target, factory, args, {**kwargs, **extra})


def _is_path(target: str) -> bool:
    return target.endswith(".py") or "/" in target or os.sep in target


@contextlib.contextmanager
def _on_sys_path(directory: Path) -> Iterator[None]:
    """``directory`` first on sys.path for the duration, unless it is already there."""
    here = directory.resolve()
    present = any(Path(entry or ".").resolve() == here for entry in sys.path)
    entry = str(here)
    if not present:
        sys.path.insert(0, entry)
    try:
        yield
    finally:
        if not present and entry in sys.path:
            sys.path.remove(entry)


def _import_module(target: str) -> ModuleType:
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (target == exc.name or target.startswith(exc.name + ".")):
            raise UsageError(f"cannot import model module {target!r}: no such module in the "
                             f"current directory ({Path.cwd()}) or on the Python path") from None
        raise UsageError(f"importing model module {target!r} failed: {_describe(exc)}") from None
    except Exception as exc:  # the user's code may raise anything while it is imported
        raise UsageError(f"importing model module {target!r} failed: {_describe(exc)}") from None


def _import_file(target: str) -> ModuleType:
    path = Path(target)
    if not path.is_file():
        raise UsageError(f"--model: model file not found: {path}")
    if path.suffix != ".py":
        raise UsageError(f"--model: {path} is not a Python file (.py)")
    name = path.stem if path.stem.isidentifier() else "csqcfs_user_model"
    loaded = sys.modules.get(name)
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve() \
            == path.resolve():
        return loaded
    if loaded is not None:
        name = f"csqcfs_user_model_{name}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise UsageError(f"--model: cannot load {path} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module          # dataclasses, pickling and fx look modules up here
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # the user's code may raise anything while it runs
        sys.modules.pop(name, None)
        raise UsageError(f"importing model file {path} failed: {_describe(exc)}") from None
    return module


def _check_signature(factory: Callable[..., object], spec: FactorySpec) -> None:
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(*spec.args, **spec.kwargs)
    except TypeError as exc:
        raise UsageError(f"factory {spec.name} does not take the arguments given "
                         f"({_first_line(exc)}); its signature is {spec.factory}{signature}"
                         ) from None


def _is_stdlib(module: str | None) -> bool:
    """True for a module of the Python standard library (``os``, ``os.path``, ``builtins``)."""
    top = (module or "builtins").split(".")[0]
    return top in sys.stdlib_module_names or top == "builtins"


def check_target(spec: FactorySpec) -> None:
    """Refuse a standard-library module as ``--model``'s module, before importing it."""
    if not _is_path(spec.target) and _is_stdlib(spec.target):
        raise UsageError(f"--model {spec.name}: {spec.target} is a module of the Python "
                         "standard library, not a model module; give a module or a file of "
                         "your own (path/to/file.py:FACTORY)")


def check_factory(factory: object, spec: FactorySpec) -> None:
    """Refuse anything but a torch.nn.Module subclass or a Python function (or bound
    method) from outside the standard library (module doc), before it is called."""
    code = getattr(factory, "__func__", factory)
    if inspect.isclass(factory):
        if issubclass(factory, nn.Module):
            return
        what = f"a class ({factory.__module__}.{factory.__qualname__}) that is not a " \
            "torch.nn.Module"
    elif inspect.isfunction(code):
        if not _is_stdlib(code.__module__):
            return
        what = f"{code.__module__}.{code.__qualname__}, a function of the Python standard " \
            "library"
    else:
        what = f"a {type(factory).__name__}, not a class or a Python function"
    raise UsageError(f"--model {spec.name}: {what}; the factory must be a torch.nn.Module "
                     "subclass or a function (def) of your own that builds one (nothing "
                     "else is called)")


def build_user_model(spec: FactorySpec) -> object:
    """Import the factory (the cwd first on sys.path while it runs), check what it is
    (:func:`check_target`, :func:`check_factory`) and call it."""
    check_target(spec)
    directory = Path(spec.target).parent if _is_path(spec.target) else Path.cwd()
    with _on_sys_path(directory):
        module = _import_file(spec.target) if _is_path(spec.target) \
            else _import_module(spec.target)
        factory = getattr(module, spec.factory, None)
        if factory is None or not callable(factory):
            raise UsageError(f"model module {spec.target!r} has no callable {spec.factory!r}")
        check_factory(factory, spec)
        _check_signature(factory, spec)
        try:
            return factory(*spec.args, **spec.kwargs)
        except Exception as exc:  # the user's factory may raise anything
            raise UsageError(f"factory {spec.name} failed: {_describe(exc)}") from None
