"""One registry for every kind of component: classes by their ``name``, built with keyword options."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Generic, TypeVar

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Mapping[str, type[T]], Generic[T]):
    """``{cls.name: cls}`` for the classes of one ``kind`` (``schedule``, ``sampler``, …).

    ``registry[name]`` and ``registry.build(name, **options)`` raise a ``ValueError`` that names the kind,
    the value and the allowed names."""

    def __init__(self, kind: str, *classes: type[T]) -> None:
        self.kind = kind
        self._classes: dict[str, type[T]] = {c.name: c for c in classes}  # type: ignore[attr-defined]

    def __getitem__(self, name: str) -> type[T]:
        if name not in self._classes:
            raise ValueError(f"{self.kind}={name!r} is unknown; allowed: {sorted(self._classes)}")
        return self._classes[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._classes)

    def __len__(self) -> int:
        return len(self._classes)

    def build(self, name: str, **options: Any) -> T:
        """An instance of the class called ``name``."""
        return self[name](**options)
