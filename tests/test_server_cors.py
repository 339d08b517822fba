"""Browsers: pages from the origins the policy lists may call the API (CORS); every other page may not.

A preflight `OPTIONS` carries no key (browsers never send one), so it is answered before authentication; the request
that follows still needs its key. Without `cors_origins` the server sends no CORS header at all.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from server_support import ServerProcess, create_api_key
from server_support import api_key, root  # noqa: F401, F811  (module fixtures)

ALLOWED = "http://chat.example.internal:3000"
STRANGER = "http://evil.example"
PREFLIGHT = {"access-control-request-method": "POST", "access-control-request-headers": "authorization, content-type"}
HELLO = {"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def http(root: Path, api_key: str, tiny_model: Path) -> Iterator[httpx.Client]:
    policy = f'[server]\ncors_origins = ["{ALLOWED}"]\n[limits]\ncontext = 256\nmax_tokens = 16\n'
    with ServerProcess(root, models=[tiny_model], policy_text=policy) as server:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            yield client


def test_a_preflight_from_an_allowed_origin_is_answered_without_a_key(http: httpx.Client) -> None:
    answer = http.options("/v1/chat/completions", headers={"origin": ALLOWED, **PREFLIGHT})
    assert answer.status_code == 200, answer.text
    assert answer.headers["access-control-allow-origin"] == ALLOWED
    assert "POST" in answer.headers["access-control-allow-methods"]
    assert "authorization" in answer.headers["access-control-allow-headers"].lower()


def test_a_preflight_from_another_origin_gets_no_permission(http: httpx.Client) -> None:
    answer = http.options("/v1/chat/completions", headers={"origin": STRANGER, **PREFLIGHT})
    assert answer.status_code == 400
    assert "access-control-allow-origin" not in answer.headers


def test_a_browser_request_still_needs_its_key_and_its_refusal_is_readable_by_the_page(
    http: httpx.Client, api_key: str
) -> None:
    refused = http.post("/v1/chat/completions", json=HELLO, headers={"origin": ALLOWED})
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == ALLOWED
    answered = http.post("/v1/chat/completions", json=HELLO,
                         headers={"origin": ALLOWED, "authorization": f"Bearer {api_key}"})  # fmt: skip
    assert answered.status_code == 200, answered.text
    assert answered.headers["access-control-allow-origin"] == ALLOWED


def test_an_answer_to_another_origin_carries_no_cors_permission(http: httpx.Client, api_key: str) -> None:
    answered = http.post("/v1/chat/completions", json=HELLO,
                         headers={"origin": STRANGER, "authorization": f"Bearer {api_key}"})  # fmt: skip
    assert "access-control-allow-origin" not in answered.headers


def test_without_cors_origins_a_preflight_is_unauthenticated_and_gets_no_cors_headers(
    tmp_path: Path, tiny_model: Path
) -> None:
    create_api_key(tmp_path, "someone")
    with ServerProcess(tmp_path, models=[tiny_model], policy_text="[limits]\ncontext = 256\n") as server:
        answer = httpx.options(f"{server.url}/v1/chat/completions", headers={"origin": ALLOWED, **PREFLIGHT})
    assert answer.status_code == 401
    assert "access-control-allow-origin" not in answer.headers
