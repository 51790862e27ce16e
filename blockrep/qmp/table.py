"""The QMP command table: a name → handler registry each command domain registers into.

A handler takes the ``arguments`` object and returns the ``return`` value; it reports a
refusal by raising any error of ``blockrep.errors``, which the server turns into a QMP
error in one place.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from ..block.options import check

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


class CommandTable:
    """QMP commands by name. A name is registered once: two owners of one command is a bug."""

    def __init__(self) -> None:
        self._handlers: dict[str, Handler] = {}

    def register(self, name: str, handler: Handler) -> None:
        if name in self._handlers:
            raise ValueError(f"QMP command '{name}' is already registered")
        self._handlers[name] = handler

    def command(self, name: str) -> Callable[[Handler], Handler]:
        """Decorator form of ``register``."""

        def deco(fn: Handler) -> Handler:
            self.register(name, fn)
            return fn

        return deco

    def get(self, name: str) -> Handler | None:
        return self._handlers.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._handlers

    def __iter__(self) -> Iterator[str]:
        return iter(self._handlers)


def args_of(
    schema: dict[str, Any], args: dict[str, Any], required: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Check a command's arguments against its schema, with QEMU's texts for what is wrong."""
    return check(schema, args, typed=True, required=required)
