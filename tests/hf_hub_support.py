"""A stand-in of the Hugging Face hub on 127.0.0.1, answering what `huggingface_hub` asks: the model info of a
revision (its commit and files, with the LFS sha256 of weight files) and `HEAD`/`GET` of a file at a revision, with
`X-Repo-Commit`, `ETag`, `Content-Length` and the `X-Error-Code` the client turns into its typed errors."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

import pytest


class Hub(ThreadingHTTPServer):
    """The part of the Hugging Face hub API that `huggingface_hub` uses to resolve and download one file."""

    daemon_threads = True

    def __init__(self, repos: dict[str, dict[str, Any]]) -> None:
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.repos = repos
        """repo id -> {"refs": {branch or tag: commit}, "files": {commit: {path: bytes}}, "license": str}."""
        self.requests: list[tuple[str, str]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@contextmanager
def serving(repos: dict[str, dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> Iterator[Hub]:
    """A hub holding `repos`, running on a thread and set as `HF_ENDPOINT` (never proxied) until the block ends."""
    server = Hub(repos)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class HubHandler(BaseHTTPRequestHandler):
    server: Hub

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        pass

    def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
        self._answer(body=True)

    def do_HEAD(self) -> None:  # noqa: N802 - the stdlib's name
        self._answer(body=False)

    def _answer(self, *, body: bool) -> None:
        self.server.requests.append((self.command, self.path))
        parts = [unquote(part) for part in self.path.split("?")[0].strip("/").split("/")]
        if parts[:2] == ["api", "models"] and len(parts) == 6 and parts[4] == "revision":
            self._model_info(f"{parts[2]}/{parts[3]}", parts[5])
        elif len(parts) >= 5 and parts[2] == "resolve":
            self._file(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), body=body)
        else:
            self._error(404, "RepoNotFound", {})

    def _resolve(self, repo_id: str, revision: str) -> tuple[dict[str, Any], str] | None:
        """The repo and the commit a revision names; None once the hub's 404 for either is sent."""
        repo = self.server.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", {})
            return None
        commit = revision if revision in repo["files"] else repo["refs"].get(revision)
        if commit is None:
            self._error(404, "RevisionNotFound", {})
            return None
        return repo, commit

    def _model_info(self, repo_id: str, revision: str) -> None:
        if (found := self._resolve(repo_id, revision)) is None:
            return
        repo, commit = found
        info = {
            "id": repo_id,
            "sha": commit,
            "siblings": [self._sibling(repo, name, data) for name, data in sorted(repo["files"][commit].items())],
            "cardData": {"license": repo["license"]},
        }
        self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body=True)

    @staticmethod
    def _sibling(repo: dict[str, Any], name: str, data: bytes) -> dict[str, Any]:
        """A file as the hub lists it with `?blobs=true`: LFS files (weights) with the sha256 their pointer names
        (`repo["lfs"]` may state another, as a hub serving other bytes than it vouches for would)."""
        sibling: dict[str, Any] = {"rfilename": name, "size": len(data)}
        if name.endswith((".safetensors", ".gguf")):
            claimed = repo.get("lfs", {}).get(name, hashlib.sha256(data).hexdigest())
            sibling["lfs"] = {"sha256": claimed, "size": len(data), "pointerSize": 134}
        return sibling

    def _file(self, repo_id: str, revision: str, path: str, *, body: bool) -> None:
        if (found := self._resolve(repo_id, revision)) is None:
            return
        repo, commit = found
        data = repo["files"][commit].get(path)
        if data is None:
            return self._error(404, "EntryNotFound", {"X-Repo-Commit": commit})
        headers = {
            "X-Repo-Commit": commit,
            "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
            "Content-Type": "application/octet-stream",
        }
        self._send(200, data, headers, body=body)

    def _error(self, status: int, code: str, headers: dict[str, str]) -> None:
        payload = json.dumps({"error": code}).encode()
        self._send(status, payload, {"X-Error-Code": code, "Content-Type": "application/json", **headers}, body=True)

    def _send(self, status: int, data: bytes, headers: dict[str, str], *, body: bool) -> None:
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(data))}.items():
            self.send_header(name, value)
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(data)
