"""`sealbox audit export | verify | anchor | report`: the compliance officer's commands over `<root>/audit/`."""

from __future__ import annotations

import getpass
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sealbox.runtime.audit.checkpoint import CHECKPOINTS_NAME, PUBLIC_KEY_NAME, Checkpoint, read_public_key
from sealbox.runtime.audit.errors import AuditFormatError, AuditUnavailableError
from sealbox.runtime.audit.export import export_log
from sealbox.runtime.audit.log import AuditLog
from sealbox.runtime.audit.report import ProcessingReport, Usage, build_report
from sealbox.runtime.audit.verify import TailBound, VerificationReport, verify_path
from sealbox.runtime.hostroot import HostRoot
from sealbox.runtime.exit_codes import ExitCode
from sealbox.runtime.policy import AuditPolicy

audit_app = typer.Typer(
    help="Export, verify and summarise the tamper-evident audit log.", no_args_is_help=True
)

_ROOT_HELP = "Appliance root (default: $SEALBOX_ROOT, /var/lib/sealbox as root); the log is <root>/audit."
_TIME_HELP = "UTC unless an offset is given: 2025-01-31, 2025-01-31T12:00, 2025-01-31T12:00:00+05:30."


def parse_moment(value: str | None) -> datetime | None:
    """An ISO 8601 date or time; naive values are UTC."""
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r} is not an ISO 8601 date or time ({_TIME_HELP})") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


RootOption = Annotated[Path | None, typer.Option("--root", help=_ROOT_HELP)]
SinceOption = Annotated[str | None, typer.Option("--since", help=f"First moment included. {_TIME_HELP}")]
UntilOption = Annotated[str | None, typer.Option("--until", help=f"First moment excluded. {_TIME_HELP}")]
PubkeyOption = Annotated[
    Path | None,
    typer.Option(
        "--pubkey",
        help="The host's audit public key, obtained independently (default: the one shipped with the log).",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON.")]


@audit_app.command("export")
def export(
    out: Annotated[Path, typer.Option("--out", help="File to write (for csv, also <FILE>.verify.json).")],
    root: RootOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    fmt: Annotated[str, typer.Option("--format", help="jsonl (self-contained) or csv (+ companion).")] = "jsonl",
) -> None:
    """Export the records of a window with the anchor hash, covering checkpoints and public key to verify offline."""
    console = Console(stderr=True, soft_wrap=True)
    if fmt not in ("jsonl", "csv"):
        raise typer.BadParameter(f"{fmt!r}: use jsonl or csv", param_hint="--format")
    start, stop = parse_moment(since), parse_moment(until)
    directory = HostRoot.resolve(root).audit
    if not (directory / PUBLIC_KEY_NAME).exists():
        console.print(f"[red]no audit log at {escape(str(directory))}[/] ({PUBLIC_KEY_NAME} is missing)")
        raise typer.Exit(ExitCode.USAGE)
    try:
        log = AuditLog.open(directory, AuditPolicy(), retention=False)
    except AuditUnavailableError as exc:
        console.print(
            "[red]cannot export:[/] an export is signed with the host audit key, and the log cannot be opened: "
            + escape(str(exc))
        )
        raise typer.Exit(ExitCode.USAGE) from exc
    try:
        through = _record_export(log, start, stop, fmt, out)
        result = export_log(
            directory, out, sign=log.sign_statement, since=start, until=stop,
            fmt=fmt, through_seq=through,  # type: ignore[arg-type]
        )  # fmt: skip
    except (AuditFormatError, AuditUnavailableError, OSError) as exc:
        console.print(f"[red]export failed:[/] {escape(str(exc))}")
        raise typer.Exit(ExitCode.USAGE) from exc
    finally:
        log.close()
    span = f"seq {result.first_seq}..{result.last_seq}" if result.records else "no records in the window"
    console.print(f"exported {result.records} record(s), {span}, to {escape(str(result.out))}")
    if result.last_seq is not None and result.window_last_seq is not None and result.last_seq > result.window_last_seq:
        console.print(
            f"the window ends at seq {result.window_last_seq}; records up to seq {result.last_seq} are included so "
            "that a signed checkpoint covers every exported record"
        )
    if result.companion is not None:
        console.print(f"anchor, checkpoints and public key: {escape(str(result.companion))} (keep it with the CSV)")


def _record_export(log: AuditLog, since: datetime | None, until: datetime | None, fmt: str, out: Path) -> int:
    """Log the export itself and sign the head, so every exported record is covered; returns the signed head."""
    log.append(
        "audit.export",
        since=since.isoformat() if since else None,
        until=until.isoformat() if until else None,
        format=fmt,
        out=str(out.absolute()),
        user=getpass.getuser(),
    )
    log.checkpoint()
    return log.head[0]


@audit_app.command("verify")
def verify(
    target: Annotated[
        Path | None,
        typer.Argument(help="An export (.jsonl, or .csv with its .verify.json), or an audit directory."),
    ] = None,
    root: RootOption = None,
    pubkey: PubkeyOption = None,
    anchor: Annotated[
        Path | None,
        typer.Option(
            "--anchor", help="A checkpoint note kept off the host (`sealbox audit anchor`): the log must extend it."
        ),
    ] = None,
    max_unsigned_records: Annotated[
        int,
        typer.Option("--max-unsigned-records", min=1, help="Records the live tail may hold past the last checkpoint."),
    ] = AuditPolicy().max_unsigned_records,
    max_unsigned_seconds: Annotated[
        float,
        typer.Option("--max-unsigned-seconds", min=0, help="Seconds the live tail may span past the last checkpoint."),
    ] = AuditPolicy().max_unsigned_seconds,
    as_json: JsonOption = False,
) -> None:
    """Check every record's hash and link, every checkpoint's signature, that every record but a bounded live tail is
    signed (an export: to its last record, and against its signed statement); exit 0 only if all hold."""
    if target is not None and root is not None:
        raise typer.BadParameter("give an export FILE or --root, not both")
    path = target if target is not None else HostRoot.resolve(root).audit
    bound = TailBound(max_unsigned_records, max_unsigned_seconds)
    try:
        report = verify_path(path, pubkey=pubkey, bound=bound, anchor=anchor)
    except AuditFormatError as exc:
        if as_json:
            typer.echo(json.dumps({"source": str(path), "ok": False, "error": str(exc)}, indent=2))
        else:
            Console(stderr=True, soft_wrap=True).print(f"[red]cannot verify:[/] {escape(str(exc))}")
        raise typer.Exit(ExitCode.USAGE) from exc
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        render_verification(report, Console(soft_wrap=True))
    if not report.ok:
        raise typer.Exit(ExitCode.FAILED)


def render_verification(report: VerificationReport, console: Console) -> None:
    console.print(f"[bold]audit log[/] {escape(report.source)}")
    console.print(f"  key          {report.key_id} ({escape(report.key_source)})")
    console.print(f"  anchor       {escape(report.anchor)}")
    span = f" (seq {report.first_seq}..{report.last_seq})" if report.first_seq is not None else ""
    console.print(f"  records      {report.valid}/{report.records} valid{span}")
    console.print(
        f"  checkpoints  {report.checkpoints_valid}/{report.checkpoints} valid, signed through seq {report.signed_through}"
    )
    if report.statement is not None:
        statement = report.statement
        console.print(
            f"  statement    signed: seq {statement['first_seq']}..{statement['last_seq']}, {statement['records']} "
            f"record(s), head {statement['head']}"
        )
    if report.anchor_checked:
        console.print(f"  extends      anchor {escape(report.anchor_checked)}")
    for problem in report.problems[:20]:
        where = escape(problem.where)
        console.print(f"  [red]broken[/]       seq {problem.seq}: {escape(problem.reason)} [dim]({where})[/]")
    if len(report.problems) > 20:
        console.print(f"  … {len(report.problems) - 20} more (use --json)")
    for warning in report.warnings:
        console.print(f"  [yellow]note[/]         {escape(warning)}")
    verdict = "[bold green]VALID[/]" if report.ok else "[bold red]BROKEN[/]"
    console.print(f"{verdict}: {escape(report.summary())}")


@audit_app.command("anchor")
def anchor(root: RootOption = None, pubkey: PubkeyOption = None) -> None:
    """Print the newest signed checkpoint as a C2SP tlog-checkpoint note: keep it off the host, and later
    `sealbox audit verify --anchor FILE` proves the log still extends it (no rollback, no wipe)."""
    console = Console(stderr=True, soft_wrap=True)
    directory = HostRoot.resolve(root).audit
    try:
        public = read_public_key(pubkey or directory / PUBLIC_KEY_NAME)
        data = (directory / CHECKPOINTS_NAME).read_bytes()
    except (AuditFormatError, OSError) as exc:
        console.print(f"[red]no anchor:[/] {escape(str(exc))}")
        raise typer.Exit(ExitCode.USAGE) from exc
    newest = None
    for line in data.splitlines():
        try:
            checkpoint = Checkpoint.from_line(line)
        except ValueError:
            continue
        if checkpoint.signature_holds(public) and (newest is None or checkpoint.size >= newest.size):
            newest = checkpoint
    if newest is None:
        console.print(f"[red]no anchor:[/] {CHECKPOINTS_NAME} holds no checkpoint signed by this key")
        raise typer.Exit(ExitCode.FAILED)
    typer.echo(newest.to_note(public), nl=False)


@audit_app.command("report")
def report(
    root: RootOption = None,
    since: SinceOption = None,
    until: UntilOption = None,
    pubkey: PubkeyOption = None,
    as_json: JsonOption = False,
) -> None:
    """Record of processing for a window: requests by purpose, principal, model and day; other events; integrity."""
    directory = HostRoot.resolve(root).audit
    try:
        summary = build_report(directory, since=parse_moment(since), until=parse_moment(until), pubkey=pubkey)
    except AuditFormatError as exc:
        Console(stderr=True, soft_wrap=True).print(f"[red]cannot report:[/] {escape(str(exc))}")
        raise typer.Exit(ExitCode.USAGE) from exc
    if as_json:
        typer.echo(json.dumps(summary.to_dict(), indent=2))
    else:
        render_report(summary, Console())
    if summary.integrity is not None and not summary.integrity.ok:
        raise typer.Exit(ExitCode.FAILED)


def _usage_table(title: str, rows: dict[str, Usage]) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column(title.split(" ")[-1].capitalize())
    for name in ("Requests", "Prompt tokens", "Completion tokens"):
        table.add_column(name, justify="right")
    for key, usage in sorted(rows.items()):
        table.add_row(escape(key), str(usage.requests), str(usage.prompt_tokens), str(usage.completion_tokens))
    return table


def render_report(summary: ProcessingReport, console: Console) -> None:
    window = f"{summary.since or 'beginning'} — {summary.until or 'now'}"
    console.print(f"[bold]Record of processing[/] {escape(summary.source)}, {window}")
    console.print(
        f"{summary.records} record(s) from {summary.first_time or '-'} to {summary.last_time or '-'}; "
        f"{summary.total.requests} API request(s); {summary.content_logged} record(s) with prompt/completion text"
    )
    for title, rows in (
        ("Requests by purpose", summary.by_purpose),
        ("Requests by principal", summary.by_principal),
        ("Requests by model", summary.by_model),
        ("Requests by day", summary.by_day),
    ):
        console.print(_usage_table(title, rows))
    events = Table(title="Events", title_justify="left")
    events.add_column("Event")
    events.add_column("Count", justify="right")
    for name, count in sorted(summary.events.items()):
        events.add_row(escape(name), str(count))
    console.print(events)
    if summary.by_status:
        statuses = ", ".join(f"{status}: {count}" for status, count in sorted(summary.by_status.items()))
        console.print(f"API statuses: {statuses}")
    integrity = summary.integrity
    if integrity is not None:
        verdict = "[bold green]chain VALID[/]" if integrity.ok else "[bold red]chain BROKEN[/]"
        console.print(f"{verdict}: {escape(integrity.summary())}")


def _host_pairs(values: list[str], what: str) -> dict[str, Path]:
    pairs: dict[str, Path] = {}
    for value in values:
        host, sep, file = value.partition("=")
        if not sep or not host or not file or host in pairs:
            raise typer.BadParameter(f"{value!r}: give {what} as HOST=FILE, each host once")
        pairs[host] = Path(file)
    return pairs


@audit_app.command("merge")
def merge(
    parts: Annotated[list[str], typer.Argument(help="HOST=EXPORT.jsonl, one per host (e.g. gateway=gw.jsonl).")],
    pubkey: Annotated[list[str], typer.Option("--pubkey", help="HOST=KEY.pub: each host's audit key, obtained independently.")],
    out: Annotated[Path, typer.Option("--out", help="The merged report (JSONL: a manifest, then each part as exported).")],
) -> None:
    """Merge several hosts' exports into one report; each part is verified against its host's key first."""
    from sealbox.runtime.audit.merge import MergeError, Part, merge_exports

    exports, keys = _host_pairs(parts, "exports"), _host_pairs(pubkey, "--pubkey")
    missing = sorted(set(exports) - set(keys))
    if missing:
        raise typer.BadParameter(f"no --pubkey for {', '.join(missing)}")
    try:
        manifest = merge_exports([Part(host, path, keys[host]) for host, path in exports.items()], out)
    except (MergeError, OSError) as exc:
        Console(stderr=True, soft_wrap=True).print(f"[red]merge refused:[/] {escape(str(exc))}")
        raise typer.Exit(ExitCode.FAILED) from exc
    for entry in manifest["parts"]:  # type: ignore[union-attr]
        typer.echo(f"{entry['host']}: {entry['records']} record(s), seq {entry['first_seq']}..{entry['last_seq']}, "
                   f"key {entry['key_id']}")  # fmt: skip
    typer.echo(f"merged {len(exports)} host(s) into {out}")


@audit_app.command("verify-merged")
def verify_merged_command(
    report: Annotated[Path, typer.Argument(help="A report written by `sealbox audit merge`.")],
    pubkey: Annotated[list[str], typer.Option("--pubkey", help="HOST=KEY.pub for every host the report names.")],
) -> None:
    """Verify every part of a merged report against the key pinned for its host; exit 0 only if all hold."""
    from sealbox.runtime.audit.merge import MergeError, verify_merged

    try:
        result = verify_merged(report, _host_pairs(pubkey, "--pubkey"))
    except (MergeError, OSError) as exc:
        Console(stderr=True, soft_wrap=True).print(f"[red]cannot verify:[/] {escape(str(exc))}")
        raise typer.Exit(ExitCode.USAGE) from exc
    console = Console(soft_wrap=True)
    for host, part in result.parts.items():
        console.print(f"{escape(host)}: {'ok' if part.ok else 'FAILED'} ({escape(part.summary())})")
    for problem in result.problems:
        console.print(f"[red]{escape(problem)}[/]")
    if not result.ok:
        raise typer.Exit(ExitCode.FAILED)
