"""The gateway's routing decisions, from engine statuses as the engines report them (no processes needed)."""

from __future__ import annotations

import pytest

from sealbox.runtime.gateway.engine_hosts import EngineHost, EngineStatus, ModelStatus
from sealbox.runtime.gateway.routing import PrefixAffinity, Router, conversation_key


def _host(name: str, free: int, *, total: int = 4, queued: int = 0, queue_size: int = 8,
          kv_free: int = 1000) -> EngineHost:  # fmt: skip
    host = EngineHost(name=name, url=f"https://10.200.0.1:{8000 + len(name)}", fingerprint="", api_key="",
                      pool=None)  # type: ignore[arg-type]  # routing never touches the pool
    host.status = EngineStatus(models={"m": ModelStatus(id="m", sha256="0" * 64, sequences_total=total,
                                                        free_sequences=free, queued=queued, kv_cells_total=4096,
                                                        kv_cells_free=kv_free)}, queue_size=queue_size)  # fmt: skip
    host.healthy, host.problem = True, None
    return host


def test_the_engine_with_the_most_free_sequences_is_chosen_then_the_most_free_kv_cells() -> None:
    router = Router([_host("a", 1), _host("b", 3, kv_free=10), _host("c", 3, kv_free=900)], PrefixAffinity(10))
    assert [h.name for h in router.candidates("m", None, exclude=set())] == ["c", "b", "a"]


def test_requests_sent_since_the_last_report_count_against_an_engine() -> None:
    a, b = _host("a", 2), _host("b", 1)
    router = Router([a, b], PrefixAffinity(10))
    a.begin("m")
    a.begin("m")  # two sent to a since its report: it has none free now
    assert [h.name for h in router.candidates("m", None, exclude=set())] == ["b", "a"]  # a only for its queue
    a.end("m")
    a.end("m")
    assert router.candidates("m", None, exclude=set())[0].name == "a"


def test_a_conversation_goes_back_to_the_engine_holding_its_prefix_while_that_engine_has_room() -> None:
    a, b = _host("a", 1), _host("b", 4)
    router = Router([a, b], PrefixAffinity(10))
    first = {"messages": [{"role": "system", "content": "triage"}, {"role": "user", "content": "fever"}]}
    later = {"messages": [*first["messages"], {"role": "assistant", "content": "how long?"},
                          {"role": "user", "content": "two days"}]}  # fmt: skip
    key = conversation_key("m", first)
    assert key == conversation_key("m", later)
    router.affinity.remember(key, "a")
    assert router.candidates("m", conversation_key("m", later), exclude=set())[0].name == "a"
    a.begin("m")  # a is full now: the conversation goes where there is room
    assert router.candidates("m", key, exclude=set())[0].name == "b"


def test_an_engine_out_of_rotation_or_full_with_a_full_queue_is_no_candidate() -> None:
    down, full = _host("down", 4), _host("full", 0, queued=8, queue_size=8)
    down.fail("connection refused")
    router = Router([down, full], PrefixAffinity(10))
    assert router.candidates("m", None, exclude=set()) == []
    assert router.candidates("other-model", None, exclude=set()) == []


@pytest.mark.parametrize("capacity", [0, 2])
def test_the_affinity_map_is_bounded(capacity: int) -> None:
    affinity = PrefixAffinity(capacity)
    for i in range(5):
        affinity.remember(f"k{i}", "a")
    assert [affinity.engine_for(f"k{i}") for i in range(5)] == [None] * (5 - capacity) + ["a"] * capacity
