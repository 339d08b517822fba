"""The end of scripts/check-clients' report: Open WebUI's row, then every lookup or connection beyond loopback the
audit hook refused (none is the goal). Arguments: openwebui-chat.json egress.jsonl. Exit status 1 when either
shows a problem."""

from __future__ import annotations

import collections
import json
import sys
from pathlib import Path


def openwebui_rows(path: Path) -> tuple[list[str], bool]:
    if not path.is_file() or not path.read_text().strip():
        return [f"open-webui  FAIL  (no result in {path})"], False
    report = json.loads(path.read_text())
    rows, passed = [], True
    for chat in report["chats"]:
        problems = chat.get("problems") or []
        passed = passed and not problems
        verdict = "FAIL: " + "; ".join(problems) if problems else "pass"
        words = "the model wrote words" if chat.get("model_wrote_words") else "no words from the model"
        shown = " ".join(str(chat.get("answer_as_shown", "")).split())[:160]
        rows.append(f"open-webui  {chat['chat']}: {verdict}  ({chat.get('answer_seconds', '-')}s; {words}; "
                    f"function_calling sent: {chat.get('function_calling_sent')!r}; shown: {shown!r})")  # fmt: skip
        if chat.get("outcome"):
            rows.append(f"            {chat['outcome']}")
    outside = report.get("outside_loopback") or []
    rows.append(f"open-webui  page requests beyond loopback: {len(outside)} {outside[:5] if outside else ''}")
    return rows, passed and not outside


def egress_lines(path: Path) -> list[str]:
    if not path.is_file():
        return []
    seen: collections.Counter[tuple[str, str, str, str]] = collections.Counter()
    for line in path.read_text().splitlines():
        record = json.loads(line)
        where = " < ".join(reversed(record["stack"][-3:]))
        seen[(record["argv0"].rsplit("/", 1)[-1], record["event"], record["target"], where)] += 1
    return [f"{count:4}x {who}: {event} {target}  at {where}"
            for (who, event, target, where), count in sorted(seen.items())]  # fmt: skip


def main() -> int:
    rows, passed = openwebui_rows(Path(sys.argv[1]))
    print("\n".join(rows))
    lines = egress_lines(Path(sys.argv[2]))
    print("\nlookups and connections beyond loopback (refused): " + ("none" if not lines else ""))
    if lines:
        print("\n".join(lines))
    return 0 if passed and not lines else 1


if __name__ == "__main__":
    sys.exit(main())
