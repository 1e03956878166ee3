"""The one readiness pattern both servicers use: the servicer is registered
before its core is loaded (so health answers at once), answers UNAVAILABLE
until `attach(core)`, and again after `detach()` at shutdown."""

from __future__ import annotations

from typing import Generic, TypeVar

from imagesearch import errors

C = TypeVar("C")


class Readiness(Generic[C]):
    def __init__(self, loading: str):
        self._loading = loading
        self._core: C | None = None
        self._stopping = False

    def attach(self, core: C) -> None:
        self._core = core

    def detach(self) -> None:
        self._stopping = True

    @property
    def ready(self) -> bool:
        return self._core is not None and not self._stopping

    def core(self) -> C:
        """The attached core, or Unavailable (loading, or shutting down)."""
        if self._stopping:
            raise errors.Unavailable("the server is shutting down: retry on another replica")
        if self._core is None:
            raise errors.Unavailable(self._loading)
        return self._core
