"""JSON whose objects never name a key twice.

Python keeps the last of two equal keys, other parsers the first: a signed document with `"version": 1, "version": 9`
would mean one thing to the signer's tools and another here. Signed JSON (the manifest payload, its envelope) and the
records the appliance acts on are parsed with this, and a repeated key is a refusal.
"""

from __future__ import annotations

import json
from typing import Any


class DuplicateKeyError(ValueError):
    """A JSON object names the same key twice."""


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise DuplicateKeyError(f"the key {key!r} appears twice in one object")
        result[key] = value
    return result


def loads_unique(data: bytes | str) -> Any:
    """`json.loads` that raises DuplicateKeyError (a ValueError) for a repeated key in any object."""
    return json.loads(data, object_pairs_hook=_unique_pairs)
