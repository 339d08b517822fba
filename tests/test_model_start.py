"""Starting a model: its GGUF header is read once and what it says reaches every step (probe, memory plan, chat
template); a ready model holds a running engine, a failed one holds its problem and no engine."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import gguf
import pytest

from sealbox.runtime.models import gguf_facts
from sealbox.runtime.models.synthetic import CHAT_TEMPLATE
from sealbox.runtime.policy import Policy
from sealbox.runtime.server.model_registry import FailedModel, ModelRegistry, ModelSource, ServedModel


def test_a_model_start_reads_the_gguf_header_once(tiny_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[Path] = []
    read_header = gguf_facts.read_header

    def counted(path: Path) -> gguf_facts.GGUFHeader:
        reads.append(Path(path))
        return read_header(path)

    def refused(*_args: object, **_kwargs: object) -> None:
        raise AssertionError("the header was parsed a second time, by gguf.GGUFReader")

    monkeypatch.setattr(gguf_facts, "read_header", counted)
    monkeypatch.setattr(gguf, "GGUFReader", refused)
    registry = ModelRegistry()

    async def scenario() -> ServedModel:
        await registry.start([ModelSource("tiny", tiny_model, None)], Policy.default(), threads=1)
        try:
            model = registry.get("tiny")
            assert isinstance(model, ServedModel), getattr(model, "problem", None)
            assert model.engine.card.chat_template == CHAT_TEMPLATE
            assert model.engine.tokenize("hello")
            return model
        finally:
            await registry.stop()

    model = asyncio.run(scenario())
    assert reads == [tiny_model]
    assert model.context > 0 and model.sequences > 0


def test_a_model_that_fails_its_checks_holds_its_problem_and_no_engine(
    make_malformed_model: Callable[[str], Path],
) -> None:
    bad = make_malformed_model("truncated")
    registry = ModelRegistry()
    asyncio.run(registry.start([ModelSource("bad", bad, None)], Policy.default(), threads=1))
    model = registry.get("bad")
    assert isinstance(model, FailedModel) and not model.ready
    assert str(bad) in model.problem and len(model.sha256) == 64
    assert not hasattr(model, "engine") and registry.ready == []
