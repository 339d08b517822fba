"""The engine's 400-class errors, kept importable here for the engine's own modules; they live in the seam
(`runtime.engine.base`), which is what the server imports."""

from __future__ import annotations

from sealbox.runtime.engine.base import GrammarError, InvalidRequest

__all__ = ["GrammarError", "InvalidRequest"]
