"""Which engine host takes a request: the one holding the conversation's cached prefix if it has a free sequence,
else the one with the most free sequences (then the most free KV cells), else one with room in its queue.

A conversation is known by a hash of its first messages (system prompt and first user turn): every later turn
starts with them, so the engine that served it last holds them in its KV cache and skips their prompt processing.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from sealbox.runtime.gateway.engine_hosts import EngineHost

PREFIX_MESSAGES = 2
PREFIX_CHARS = 2048


def conversation_key(model: str, body: dict[str, Any]) -> str | None:
    """A stable key for the conversation's opening, or None when the request has nothing to key on."""
    opening: Any
    messages = body.get("messages")
    if isinstance(messages, list) and messages:
        opening = messages[:PREFIX_MESSAGES]
    elif isinstance(body.get("prompt"), str) and body["prompt"]:
        opening = body["prompt"][:PREFIX_CHARS]
    else:
        return None
    text = json.dumps([model, opening], sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class PrefixAffinity:
    """A bounded map from conversation key to the engine that served it last (least recently used forgotten)."""

    capacity: int
    _engines: OrderedDict[str, str] = field(default_factory=OrderedDict)

    def engine_for(self, key: str | None) -> str | None:
        if key is None or key not in self._engines:
            return None
        self._engines.move_to_end(key)
        return self._engines[key]

    def remember(self, key: str | None, engine: str) -> None:
        if key is None or self.capacity == 0:
            return
        self._engines[key] = engine
        self._engines.move_to_end(key)
        while len(self._engines) > self.capacity:
            self._engines.popitem(last=False)


@dataclass
class Router:
    hosts: list[EngineHost]
    affinity: PrefixAffinity

    def candidates(self, model: str, key: str | None, *, exclude: set[str]) -> list[EngineHost]:
        """Engines in rotation serving `model` that can take a request now, best first; empty when all are full."""
        serving = [h for h in self.hosts if h.healthy and h.name not in exclude and h.model(model) is not None]
        free = sorted((h for h in serving if h.free_sequences(model) > 0),
                      key=lambda h: (h.free_sequences(model), _kv_free(h, model)), reverse=True)  # fmt: skip
        preferred = self.affinity.engine_for(key)
        for i, host in enumerate(free):
            if host.name == preferred:
                free.insert(0, free.pop(i))
                break
        queued = sorted((h for h in serving if h.free_sequences(model) <= 0 and h.queue_room(model) > 0),
                        key=lambda h: h.queue_room(model), reverse=True)  # fmt: skip
        return free + queued

    def serves(self, model: str) -> bool:
        return any(h.healthy and h.model(model) is not None for h in self.hosts)


def _kv_free(host: EngineHost, model: str) -> int:
    status = host.model(model)
    return status.kv_cells_free if status is not None else 0
