"""Errors a pool request can end with. Plain one-message exceptions, so they pickle through Ray unchanged."""

from __future__ import annotations

from difix3d.errors import Difix3DError


class PoolRequestError(Difix3DError, ValueError):
    """The fixer rejected this request (wrong shape or dtype, NaN, ...): it failed alone, the pool goes on.

    A ``ValueError``, as ``FixerRunner.fix`` raises for the same input in-process, so callers handle both alike.
    """


class PoolFixError(Difix3DError, RuntimeError):
    """The request was well-formed but could not be fixed: the fixer crashed on it, or replicas kept dying."""


class PoolUnavailableError(Difix3DError, RuntimeError):
    """No pool of that name, or its replicas cannot start (the message carries the replica's own error)."""
