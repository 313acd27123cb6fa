"""Name registries: every variation point (backbone family, reward, ...) is picked by name.

Adding a family or a reward is one new module plus one ``@REGISTRY.register("name")`` line; nothing
else in the code branches on a model type. A registry may also name entries that a module of a
higher layer registers (``lazy``: name -> module): the module is imported on the first lookup of one
of its names, so the contract's package never imports upward (the toy world registers its backbone
and metrics this way).
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from rtdmd.errors import RtdmdError

T = TypeVar("T")


def did_you_mean(name: str, candidates: list[str] | tuple[str, ...]) -> str:
    """Return ``" (did you mean 'x'?)"`` for the closest candidate, or ``""`` when none is close."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


class UnknownNameError(RtdmdError, KeyError):
    """Raised by :meth:`Registry.get` for a name that was never registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


class Registry(Generic[T]):
    """A mapping from names to objects (classes or factories) of one kind.

    >>> FRUIT = Registry[type]("fruit")
    >>> @FRUIT.register("apple")
    ... class Apple: ...
    >>> FRUIT.get("apple") is Apple
    True
    """

    def __init__(self, kind: str, lazy: dict[str, str] | None = None) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}
        self._lazy = dict(lazy or {})  # name -> the module whose import registers it

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator that registers its target under ``name``; a second use of a name is an error."""

        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        if name not in self._entries and name in self._lazy:
            importlib.import_module(self._lazy[name])
        try:
            return self._entries[name]
        except KeyError:
            names = self.names()
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}{did_you_mean(name, names)}; known: {', '.join(names)}"
            ) from None

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(set(self._entries) | set(self._lazy)))

    def __contains__(self, name: object) -> bool:
        return name in self._entries or name in self._lazy

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.names())
