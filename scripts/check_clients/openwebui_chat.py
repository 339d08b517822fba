"""Chats through Open WebUI's own page, in headless Chromium (the system's /usr/bin/chromium, driven by Playwright):
type a message, wait for the answer to finish, save a screenshot, print what the page showed. Twice: as Open WebUI
comes (its built-in tools sent with the chat, issue 14's first point), then with the user's Function Calling setting
on "legacy" (no tools: the model's words).

Chromium gets a dead proxy on loopback for everything that is not loopback, and the page's requests beyond loopback
are aborted and listed: the check says whether the page tried to reach the internet.

Settings (environment): CHECK_OPENWEBUI_URL, CHECK_SCREENSHOT (the legacy chat's; the default chat's goes to
<name>-tools.png), CHECK_CHROMIUM (default /usr/bin/chromium),
CHECK_MESSAGE, CHECK_ANSWER_TIMEOUT_S. Prints one JSON object on stdout; exit status 1 when a chat failed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from urllib.parse import urlsplit

from playwright.sync_api import Page, Request, Route, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeout

URL = os.environ["CHECK_OPENWEBUI_URL"]
SCREENSHOT = os.environ["CHECK_SCREENSHOT"]
CHROMIUM = os.environ.get("CHECK_CHROMIUM", "/usr/bin/chromium")
MESSAGE = os.environ.get("CHECK_MESSAGE", "Write one sentence about the sea.")
ANSWER_TIMEOUT_S = float(os.environ.get("CHECK_ANSWER_TIMEOUT_S", "900"))
MARKERS = ("<|im_end|>", "<|im_start|>", "<end_of_turn>", "<start_of_turn>", "<eos>", "<bos>")
LOOPBACK = {"127.0.0.1", "localhost", "[::1]", "::1"}
CHROMIUM_ARGS = [
    "--no-sandbox",  # run as root in a container
    "--proxy-server=http://127.0.0.1:9",  # nothing listens there: whatever is not loopback goes nowhere
    "--disable-background-networking", "--disable-component-update", "--disable-domain-reliability",
    "--disable-sync", "--no-first-run", "--no-default-browser-check", "--metrics-recording-only",
    "--disable-features=Translate,OptimizationHints,MediaRouter,AutofillServerCommunication",
]  # fmt: skip


class Outside:
    """Requests the page made beyond loopback: aborted, and listed in the result."""

    def __init__(self) -> None:
        self.urls: list[str] = []

    def route(self, route: Route, request: Request) -> None:
        host = urlsplit(request.url).hostname or ""
        if request.url.startswith(("data:", "blob:")) or host in LOOPBACK:
            route.continue_()
        else:
            self.urls.append(request.url)
            route.abort("blockedbyclient")


def dismiss_dialogs(page: Page) -> None:
    """First visit: Open WebUI greets with a changelog dialog; close whatever modal is open."""
    for label in ("Okay, Let's Go!", "Okay, let's go!", "Get started"):
        button = page.get_by_role("button", name=label)
        if button.count() and button.first.is_visible():
            try:
                button.first.click(timeout=5_000)
            except PlaywrightTimeout:  # it closed by itself, or another layer took the click: Escape below
                pass
    page.keyboard.press("Escape")


def last_text(page: Page, selector: str) -> str:
    """The text of the last element the selector finds ('' when none)."""
    return page.evaluate(
        """(selector) => {
            const nodes = [...document.querySelectorAll(selector)];
            return nodes.length ? nodes[nodes.length - 1].innerText : '';
        }""",
        selector,
    )


def stored_answer(page: Page) -> dict[str, object]:
    """The newest assistant message as Open WebUI stored it (content, and `error` when the request failed), read
    through its own API with the page's token: the page draws an error in the same place as an answer."""
    return page.evaluate(
        """async () => {
            const id = location.pathname.split('/c/')[1];
            if (!id) return {};
            const headers = {Authorization: `Bearer ${localStorage.token}`};
            const reply = await fetch(`/api/v1/chats/${id}`, {headers});
            const history = (await reply.json()).chat.history;
            const message = history.messages[history.currentId];
            const error = message.error ? (message.error.content ?? JSON.stringify(message.error)) : null;
            return {content: message.content, error: error, done: message.done ?? null};
        }"""
    )


def wait_until_done(page: Page) -> dict[str, object]:
    """Polls the stored message until Open WebUI marks it done: with tools offered, a message can go through several
    rounds (the model calls tools, Open WebUI runs them and asks again), and the page's buttons come and go."""
    deadline = time.monotonic() + ANSWER_TIMEOUT_S
    while True:
        stored = stored_answer(page)
        if stored.get("done") or stored.get("error"):
            return stored
        if time.monotonic() > deadline:
            raise TimeoutError(f"the answer was not done after {ANSWER_TIMEOUT_S:.0f}s")
        page.wait_for_timeout(2000)


LEGACY_FUNCTION_CALLING = """async () => {
    const headers = {Authorization: `Bearer ${localStorage.token}`, 'Content-Type': 'application/json'};
    const settings = (await (await fetch('/api/v1/users/user/settings', {headers})).json()) || {};
    const ui = {...(settings.ui || {})};
    ui.params = {...(ui.params || {}), function_calling: 'legacy'};
    const reply = await fetch('/api/v1/users/user/settings/update', {method: 'POST', headers,
                                                                     body: JSON.stringify({...settings, ui})});
    return reply.status;
}"""
"""The user's setting Function Calling: "legacy" (Open WebUI's own prompt-based mode): no built-in tools are sent."""
TOOL_LIMIT = "Tool-call limit reached"


def one_chat(page: Page, label: str, screenshot: str) -> dict[str, object]:
    """A new chat on the page: type the message, send it, wait until Open WebUI marks the answer done."""
    result: dict[str, object] = {"chat": label, "message": MESSAGE, "screenshot": screenshot}
    try:
        page.goto(URL, wait_until="load", timeout=120_000)
        box = page.locator("#chat-input")
        box.wait_for(state="visible", timeout=120_000)
        dismiss_dialogs(page)
        box.focus()  # not a click: a dialog's closing animation may still lie over the box
        page.keyboard.type(MESSAGE)
        page.wait_for_function("(text) => document.querySelector('#chat-input').innerText.includes(text)",
                               arg=MESSAGE, timeout=30_000)  # fmt: skip
        started = time.monotonic()
        with page.expect_request(lambda r: r.method == "POST" and "/api/chat/completions" in r.url,
                                 timeout=30_000) as sent:  # fmt: skip
            page.keyboard.press("Enter")
        params = (sent.value.post_data_json or {}).get("params") or {}
        result["function_calling_sent"] = params.get("function_calling")
        page.wait_for_url("**/c/**", timeout=60_000)
        stored = wait_until_done(page)
        result["answer_seconds"] = round(time.monotonic() - started, 1)
        answer = str(stored.get("content") or "")
        shown = last_text(page, "#response-content-container")
        result.update(answer=answer, answer_as_shown=shown, model_wrote_words=bool(answer.strip()))
        problems = [f"the answer shows {m!r}" for m in MARKERS if m in answer + shown]
        error = str(stored.get("error") or "")
        if error.startswith(TOOL_LIMIT):
            # Served, not refused: the model called tools every round and Open WebUI stopped asking.
            result["outcome"] = f"the model called tools every round; Open WebUI stopped: {error}"
        elif error:
            problems.append(f"Open WebUI shows an error instead of an answer: {error}")
        elif not answer.strip() and not shown.strip():
            problems.append("neither words nor tool calls in the answer")
        result["problems"] = problems
    except Exception as error:  # what the page did is the result; the screenshot shows where it stopped
        result["problems"] = [f"{type(error).__name__}: {str(error).splitlines()[0]}"]
    first = page.locator("[id^='message-']").first
    if first.count():  # the question and the answer's beginning, not the end of a long answer
        first.scroll_into_view_if_needed()
    page.screenshot(path=screenshot, full_page=False)
    return result


def main() -> int:
    outside = Outside()
    chats: list[dict[str, object]] = []
    failures: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 860})
        page.route("**/*", outside.route)
        page.on("response", lambda r: failures.append(f"{r.status} {r.url}") if r.status >= 400 else None)
        # Open WebUI's default: its built-in tools go with every chat (issue 14's first point).
        chats.append(one_chat(page, "default (built-in tools offered)", SCREENSHOT.replace(".png", "-tools.png")))
        # The same chat as a user who turned function calling to "legacy": words from the model.
        try:
            status = page.evaluate(LEGACY_FUNCTION_CALLING)
        except Exception as error:  # reported as that chat's problem
            status = f"{type(error).__name__}: {error}"
        chat = one_chat(page, "function calling: legacy (no tools)", SCREENSHOT)
        if status != 200:
            refused = f"setting function calling to legacy answered {status}"
            chat["problems"] = [refused, *chat["problems"]]  # type: ignore[misc]
        chats.append(chat)
        browser.close()
    report = {"url": URL, "chats": chats, "http_errors": failures, "outside_loopback": outside.urls}
    print(json.dumps(report, indent=1))
    return 1 if any(chat["problems"] for chat in chats) or outside.urls else 0


if __name__ == "__main__":
    sys.exit(main())
