"""Per-kind dispatch: one table of handlers per consumer, keyed by node class.

A back end or file format that treats each projection kind differently keeps one
:class:`KindTable` and registers one handler per kind it supports::

    SYNAPSES: KindTable[Callable[[ConvProjection], nn.Module]] = KindTable("norse")

    @SYNAPSES.register(ConvProjection)
    def _conv(p): ...

    SYNAPSES.lookup(p)(p)     # TargetError "projection p: kind dense is not supported by norse"

A kind the table does not know is a :class:`~csqcfs_deploy.errors.TargetError`
naming the node, the kind and the consumer, never a silent fall-through.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from csqcfs_deploy.errors import TargetError

H = TypeVar("H")


def kind_name(node: object) -> str:
    """A node class's short kind: ``ConvProjection`` -> ``conv``, ``ConvOp`` -> ``conv``."""
    name = type(node).__name__
    for suffix in ("Projection", "Op"):
        if name.endswith(suffix) and name != suffix:
            name = name[: -len(suffix)]
            break
    return name.lower()


class KindTable(Generic[H]):
    """Handlers of one consumer (``consumer`` names it in errors), keyed by node class."""

    def __init__(self, consumer: str) -> None:
        self.consumer = consumer
        self._handlers: dict[type, H] = {}

    def register(self, *kinds: type) -> Callable[[H], H]:
        """Decorator: register the handler for each class in ``kinds``."""

        def deco(handler: H) -> H:
            for kind in kinds:
                if kind in self._handlers:
                    raise TypeError(f"{self.consumer}: kind {kind.__name__} registered twice")
                self._handlers[kind] = handler
            return handler

        return deco

    def add(self, kind: type, handler: H) -> None:
        """Register ``handler`` for ``kind`` (the non-decorator form)."""
        self.register(kind)(handler)

    def supports(self, node: object) -> bool:
        return type(node) in self._handlers

    def lookup(self, node: object) -> H:
        """The handler of ``node``'s class, or TargetError naming node, kind and consumer."""
        try:
            return self._handlers[type(node)]
        except KeyError:
            label = getattr(node, "name", None)
            where = f"node {label}: " if label is not None else ""
            raise TargetError(f"{where}kind {kind_name(node)} is not supported by "
                              f"{self.consumer}") from None

    @property
    def kinds(self) -> tuple[type, ...]:
        return tuple(self._handlers)
