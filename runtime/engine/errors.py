"""Errors the batching engine adds to the seam's tree (`runtime.engine.base`): both mean 400, never 5xx."""

from __future__ import annotations

from sealbox.runtime.engine.base import EngineError


class InvalidRequest(EngineError):
    """The request cannot be served as given (an empty prompt, a grammar that does not parse): answer 400."""


class GrammarError(InvalidRequest):
    """The request's GBNF grammar does not parse."""
