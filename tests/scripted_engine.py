"""An engine host that answers with bytes fixed in advance, for tests of what the gateway does to an answer on its way
(nothing, byte for byte) and what it reads from it (the usage and finish reason of the audit record).

A real HTTPS server (uvicorn, mutual TLS with a client certificate required, like a sealbox engine host) on a
loopback port, run as its own process: `python tests/scripted_engine.py --port P --cert C --key K --client-ca CA`.
It serves `/v1/engine/status` (one model, "scripted") and `/v1/completions`: a stream is sent as the chunks of
`STREAM` (or `HELD` for the prompt "hold": `[DONE]`, then the answer stays open until the gateway lets go; for
"hold before done", the same but held before `[DONE]`), each chunk one HTTP chunk, cut where a real engine would never cut (inside a UTF-8 character, inside the usage event).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import ssl
import sys
from typing import Any

MODEL = "scripted"
MODEL_SHA256 = "5c" * 32
HOLD_S = 30.0

_OPEN = b'data: {"id":"cmpl-scripted","object":"text_completion","created":1,"model":"scripted","choices":'
STREAM = [
    _OPEN + b'[{"index":0,"text":"caf\xc3',
    b'\xa9 \\"usage\\":{\\"completion_tokens\\":99}","logprobs":null,"finish_reason":null}],"usage":null}\n\n',
    b": a comment, passed on like the rest\n\n",
    _OPEN + b'[{"index":0,"text":"","logprobs":null,"finish_reason":"length"}],"usage":null}\n\n',
    _OPEN + b'[],"usage":{"prompt_tokens":7,',
    b'"completion_tokens":3,"total_tokens":10}}\n\n',
    b"data: [DONE]\n\n",
]
"""A stream with usage (the client asked for it), cut inside `é` and inside the usage event; its text quotes
`"usage":{` the way JSON must (escaped), which is not the usage chunk."""
HELD = [
    _OPEN + b'[{"index":0,"text":"held","logprobs":null,"finish_reason":null}]}\n\n',
    _OPEN + b'[{"index":0,"text":"","logprobs":null,"finish_reason":"stop"}]}\n\n',
    b"data: [DONE]\n\n",
]
"""A stream without usage, whose answer stays open after `[DONE]`."""
WHOLE = {"id": "cmpl-scripted", "object": "text_completion", "created": 1, "model": MODEL,
         "choices": [{"index": 0, "text": "whole", "logprobs": None, "finish_reason": "stop"}],
         "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}  # fmt: skip


def status() -> dict[str, Any]:
    return {"models": [{"id": MODEL, "sha256": MODEL_SHA256, "sequences_total": 8, "free_sequences": 8, "queued": 0,
                        "kv_cells_total": 4096, "kv_cells_free": 4096}], "queue_size": 8}  # fmt: skip


async def _body(receive: Any) -> bytes:
    parts = []
    while True:
        message = await receive()
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    if scope["path"] == "/v1/engine/status":
        await _send_json(send, status())
        return
    request = json.loads(await _body(receive))
    if not request.get("stream"):
        await _send_json(send, WHOLE)
        return
    prompt = request.get("prompt")
    chunks = {"hold": HELD, "hold before done": HELD[:-1]}.get(prompt, STREAM)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream; charset=utf-8")]})  # fmt: skip
    for chunk in chunks:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    if chunks is not STREAM:
        try:
            await asyncio.wait_for(receive(), HOLD_S)  # until the gateway closes the connection
        except TimeoutError:
            pass
    if prompt == "hold before done":
        await send({"type": "http.response.body", "body": HELD[-1], "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _send_json(send: Any, body: dict[str, Any]) -> None:
    data = json.dumps(body, separators=(",", ":")).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": data})


def main() -> None:
    parser = argparse.ArgumentParser()
    for option in ("--cert", "--key", "--client-ca"):
        parser.add_argument(option, required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    import uvicorn

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", args.port))
    listener.listen(64)
    config = uvicorn.Config(app, log_level="warning", ssl_certfile=args.cert, ssl_keyfile=args.key,
                            ssl_ca_certs=args.client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)  # fmt: skip
    print("sealbox serving (scripted engine)", file=sys.stderr, flush=True)
    uvicorn.Server(config).run(sockets=[listener])


if __name__ == "__main__":
    main()
