"""Stand-in for `vllm.entrypoints.openai.api_server`: the same flags sealbox passes, `VLLM_API_KEY` guarding `/v1`,
`/health`, `/v1/models` and a fixed streamer behind `/v1/chat/completions` in vLLM's OpenAI shapes.

At start it does what a phone-home would: it opens a TCP connection to the loopback port named by the model
directory's `config.json` (`standin_phone_home_port`) and writes on stderr whether that was blocked or connected;
and it starts a worker process, as vLLM does, which it leaves for its supervisor to end.
"""


import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path

WORDS = ["Sealed", " boxes", " keep", " secrets", " well", "."]


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="vllm")
    parser.add_argument("--model", required=True)
    parser.add_argument("--served-model-name", default="")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--disable-log-requests", action="store_true")
    arguments, _others = parser.parse_known_args()  # parallelism and memory flags mean nothing without a GPU
    return arguments


def _phone_home(model: Path) -> None:
    config = json.loads((model / "config.json").read_text())
    port = config.get("standin_phone_home_port")
    if not port:
        return
    try:
        with socket.create_connection(("127.0.0.1", int(port)), timeout=5):
            print(f"standin phone-home: CONNECTED to 127.0.0.1:{port}", file=sys.stderr, flush=True)
    except OSError as exc:
        print(f"standin phone-home: refused: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)


def _app(name: str, api_key: str):  # type: ignore[no-untyped-def]
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    app = FastAPI()

    @app.middleware("http")
    async def authenticate(request: Request, call_next):  # type: ignore[no-untyped-def]
        if request.url.path.startswith("/v1") and request.headers.get("authorization") != f"Bearer {api_key}":
            return JSONResponse({"error": "Unauthorized"}, status_code=401)
        return await call_next(request)

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({})

    @app.get("/v1/models")
    async def models() -> dict:  # type: ignore[type-arg]
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "vllm",
                                            "root": name, "max_model_len": 2048}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):  # type: ignore[no-untyped-def]
        body = await request.json()
        if body.get("model") != name:
            return JSONResponse({"object": "error", "message": f"The model `{body.get('model')}` does not exist.",
                                 "type": "NotFoundError", "param": None, "code": 404}, status_code=404)
        created, ident = int(time.time()), f"chatcmpl-{os.getpid()}-{time.monotonic_ns()}"
        if body.get("stream"):
            def events():  # type: ignore[no-untyped-def]
                for word in WORDS:
                    chunk = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": name,
                             "choices": [{"index": 0, "delta": {"role": "assistant", "content": word},
                                          "logprobs": None, "finish_reason": None}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                last = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": name,
                        "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]}
                yield f"data: {json.dumps(last)}\n\ndata: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")
        return {"id": ident, "object": "chat.completion", "created": created, "model": name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(WORDS)},
                             "logprobs": None, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 7, "completion_tokens": len(WORDS), "total_tokens": 7 + len(WORDS)}}

    return app


def _start_worker() -> None:
    """vLLM runs its engine in worker processes of its own; this one only sleeps, so a test can see who ends it."""
    import subprocess

    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
    print(f"standin worker pid {worker.pid}", file=sys.stderr, flush=True)


def main() -> None:
    import uvicorn

    arguments = _arguments()
    model = Path(arguments.model)
    _phone_home(model)
    _start_worker()
    name = arguments.served_model_name or arguments.model
    uvicorn.run(_app(name, os.environ.get("VLLM_API_KEY", "")), host=arguments.host, port=arguments.port,
                log_level="warning")


if __name__ == "__main__":
    main()
