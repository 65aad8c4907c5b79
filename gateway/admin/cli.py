"""``unlearn-gateway targets add|list|get|rm|import|export``: the admin API from a shell.

A thin HTTP client: the server validates, writes and answers; this module only shapes requests and prints what
comes back. Server errors are shown from their envelope (message, then one line per problem with its line number
and field path), with exit status 1. An import is sent in one request, because the server applies it atomically;
before sending, the file is read and checked locally with a progress bar (so a 100,000-line file with a typo
fails in seconds, before any upload), and a spinner runs while the server validates and writes.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn, Self

import httpx
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
from rich.table import Table

from gateway.registry import Target

targets_app = typer.Typer(help="Manage forget targets through a running gateway's admin API.", no_args_is_help=True)

DEFAULT_URL = "http://127.0.0.1:8000"
Url = Annotated[str, typer.Option("--url", envvar="UNLEARN_URL", help="gateway base URL")]
AdminKey = Annotated[str | None, typer.Option("--admin-key", envvar="UNLEARN_ADMIN_KEY",
                                                 help="an admin key (or $UNLEARN_ADMIN_KEY)", show_default=False)]
AsOf = Annotated[str | None, typer.Option("--as-of", help="ISO time with timezone, e.g. 2026-01-01T12:00:00Z")]
MAX_SHOWN_PROBLEMS = 20


class AdminError(Exception):
    """An error answer of the admin API (or no answer at all), ready to print."""

    def __init__(self, message: str, details: list[dict[str, Any]] | None = None, total: int | None = None):
        super().__init__(message)
        self.message = message
        self.details = details or []
        self.total = total or len(self.details)


class AdminClient:
    """The admin routes over HTTP with an admin key."""

    def __init__(self, url: str, admin_key: str | None, *, timeout_s: float = 60.0):
        if not admin_key:
            raise AdminError("no admin key: pass --admin-key or set UNLEARN_ADMIN_KEY (a gateway started without "
                             "UNLEARN_ADMIN_KEYS prints its generated key on stderr at startup)")
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, headers={"authorization": f"Bearer {admin_key}"},
                                  timeout=httpx.Timeout(timeout_s, connect=5.0))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_: object) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise AdminError(f"cannot reach the gateway at {self.url}: {type(exc).__name__}: {exc}") from None
        check(response)
        return response

    @contextmanager
    def stream(self, path: str, params: dict[str, Any]) -> Iterator[httpx.Response]:
        try:
            with self._http.stream("GET", path, params=params) as response:
                if response.status_code >= 400:
                    response.read()
                    check(response)
                yield response
        except httpx.TransportError as exc:
            raise AdminError(f"cannot reach the gateway at {self.url}: {type(exc).__name__}: {exc}") from None


def check(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        error = response.json()["error"]
        message, details, total = error["message"], error.get("details"), error.get("details_total")
    except (ValueError, KeyError, TypeError):
        message, details, total = response.text[:500] or response.reason_phrase, None, None
    raise AdminError(f"HTTP {response.status_code}: {message}", details, total)


def _fail(error: AdminError) -> NoReturn:
    err = Console(stderr=True, highlight=False)
    err.print(f"[red]error:[/] {error.message}", markup=True, soft_wrap=True)
    for detail in error.details[:MAX_SHOWN_PROBLEMS]:
        where = " ".join(part for part in (f"line {detail['line']}" if detail.get("line") is not None else "",
                                           detail.get("field") or "") if part)
        err.print(f"  {where or '(document)'}: {detail.get('message')}", markup=False, soft_wrap=True)
    if error.total > min(len(error.details), MAX_SHOWN_PROBLEMS):
        err.print(f"  ... {error.total - min(len(error.details), MAX_SHOWN_PROBLEMS)} more", markup=False)
    raise typer.Exit(1)


def _param_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, ensure_ascii=False))


@targets_app.command("add")
def add(
    name: Annotated[str | None, typer.Option(help="display name (the id is derived from it unless --id)")] = None,
    id: Annotated[str | None, typer.Option("--id", help="slug id")] = None,
    alias: Annotated[list[str] | None, typer.Option(help="another name (repeatable)")] = None,
    description: Annotated[str | None, typer.Option()] = None,
    fact: Annotated[list[str] | None, typer.Option(help="knowledge that must not come out (repeatable)")] = None,
    example: Annotated[list[str] | None, typer.Option(help="a prompt to catch (repeatable)")] = None,
    keep: Annotated[list[str] | None, typer.Option(help="a neighbour prompt to still answer (repeatable)")] = None,
    method: Annotated[str | None, typer.Option(help="policy: eco, guard, uld or refuse [default: eco]")] = None,
    param: Annotated[list[str] | None, typer.Option(help="policy parameter KEY=VALUE (repeatable)")] = None,
    disabled: Annotated[bool, typer.Option("--disabled", help="store it switched off")] = False,
    file: Annotated[Path | None, typer.Option(help="a JSON file with one target object ('-' = stdin)")] = None,
    url: Url = DEFAULT_URL,
    admin_key: AdminKey = None,
) -> None:
    """Create one target from options or from a JSON file."""
    if file is not None:
        body = json.loads(sys.stdin.read() if str(file) == "-" else file.read_text())
    else:
        if not name:
            raise typer.BadParameter("give --name (or --file)", param_hint="--name")
        body = {"name": name}
        for key, value in (("id", id), ("aliases", alias), ("description", description), ("facts", fact),
                           ("examples", example), ("keep", keep)):
            if value:
                body[key] = value
        if method or param:
            policy: dict[str, Any] = {"method": method or "eco"}
            for item in param or []:
                key, sep, value = item.partition("=")
                if not sep:
                    raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--param")
                policy[key.strip()] = _param_value(value)
            body["policy"] = policy
        if disabled:
            body["enabled"] = False
    try:
        with AdminClient(url, admin_key) as client:
            written = client.request("POST", "/admin/targets", json=body).json()
    except AdminError as error:
        _fail(error)
    typer.echo(f"created {written['target']['id']} (targets version {written['version']})")


@targets_app.command("list")
def list_targets(
    enabled: Annotated[bool | None, typer.Option("--enabled/--disabled", help="only enabled / disabled ones",
                                                    show_default=False)] = None,
    method: Annotated[str | None, typer.Option(help="only this policy method")] = None,
    text: Annotated[str | None, typer.Option(help="substring of name, alias or description")] = None,
    limit: Annotated[int, typer.Option(help="targets per page (max 1000)")] = 100,
    all_pages: Annotated[bool, typer.Option("--all", help="follow every page")] = False,
    as_of: AsOf = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON lines instead of a table")] = False,
    url: Url = DEFAULT_URL,
    admin_key: AdminKey = None,
) -> None:
    """List targets, sorted by id."""
    params: dict[str, Any] = {"limit": limit}
    for key, value in (("enabled", None if enabled is None else str(enabled).lower()), ("method", method),
                       ("text", text), ("as_of", as_of)):
        if value is not None:
            params[key] = value
    items: list[dict[str, Any]] = []
    try:
        with AdminClient(url, admin_key) as client:
            while True:
                page = client.request("GET", "/admin/targets", params=params).json()
                items += page["items"]
                if not all_pages or not page["next_cursor"]:
                    break
                params["cursor"] = page["next_cursor"]
    except AdminError as error:
        _fail(error)
    if as_json:
        for item in items:
            typer.echo(json.dumps(item, ensure_ascii=False))
        return
    table = Table("id", "name", "policy", "status", "enabled", "aliases", "facts",
                  caption=f"{len(items)} of {page['total']} matching, targets version {page['version']}")
    for item in items:
        table.add_row(item["id"], item["name"], item["policy"]["method"], policy_status_text(item),
                      "yes" if item["enabled"] else "no", str(len(item["aliases"])), str(len(item["facts"])))
    Console().print(table)


def policy_status_text(item: dict[str, Any]) -> str:
    """A ULD target's ``policy_status`` in a table cell: "training 40%", "failed: <reason>", "ready" ..."""
    status = item.get("policy_status")
    if not status:
        return ""
    if status["state"] == "training" and status.get("progress") is not None:
        return f"training {status['progress']:.0%}"
    if status["state"] == "failed" and status.get("reason"):
        return f"failed: {status['reason']}"
    return status["state"]


@targets_app.command("get")
def get(
    target_id: Annotated[str, typer.Argument(metavar="ID")],
    as_of: AsOf = None,
    history: Annotated[bool, typer.Option("--history", help="print its change history instead")] = False,
    url: Url = DEFAULT_URL,
    admin_key: AdminKey = None,
) -> None:
    """Print one target as JSON (or its history)."""
    try:
        with AdminClient(url, admin_key) as client:
            if history:
                result = client.request("GET", f"/admin/targets/{target_id}/history").json()
            else:
                params = {"as_of": as_of} if as_of else {}
                result = client.request("GET", f"/admin/targets/{target_id}", params=params).json()
    except AdminError as error:
        _fail(error)
    _print_json(result)


@targets_app.command("rm")
def rm(
    target_id: Annotated[str, typer.Argument(metavar="ID")],
    url: Url = DEFAULT_URL,
    admin_key: AdminKey = None,
) -> None:
    """Delete one target (its history stays)."""
    try:
        with AdminClient(url, admin_key) as client:
            deleted = client.request("DELETE", f"/admin/targets/{target_id}").json()
    except AdminError as error:
        _fail(error)
    typer.echo(f"deleted {deleted['id']} (targets version {deleted['version']})")


def _format_of(path: Path, body: bytes, given: str) -> str:
    if given != "auto":
        return given
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        return "jsonl"
    return "json" if body.lstrip()[:1] == b"[" else "jsonl"


def _read_with_progress(path: Path, progress: Progress) -> bytes:
    size = path.stat().st_size
    task = progress.add_task("reading", total=size)
    parts = []
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            parts.append(chunk)
            progress.advance(task, len(chunk))
    return b"".join(parts)


def check_locally(body: bytes, fmt: str, progress: Progress) -> tuple[int, list[dict[str, Any]]]:
    """Parse and validate like the server would: (targets, problems). The server checks again; this only
    catches mistakes before a long upload."""
    problems: list[dict[str, Any]] = []
    text = body.decode("utf-8-sig", errors="replace")
    if fmt == "json":
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            return 0, [{"line": exc.lineno, "field": "", "message": f"invalid JSON: {exc.msg}"}]
        if not isinstance(document, list):
            return 0, [{"line": 1, "field": "", "message": "expected a JSON array of targets"}]
        numbered = list(enumerate(document, start=1))
    else:
        numbered = []
        for number, raw in enumerate(text.split("\n"), start=1):
            if raw.strip():
                try:
                    numbered.append((number, json.loads(raw)))
                except ValueError as exc:
                    problems.append({"line": number, "field": "", "message": f"invalid JSON: {exc}"})
    task = progress.add_task("validating", total=len(numbered))
    first_line: dict[str, int] = {}
    for number, item in numbered:
        progress.advance(task)
        if not isinstance(item, dict):
            problems.append({"line": number, "field": "", "message": "expected a JSON object"})
            continue
        try:
            target = Target.model_validate(item)
        except ValidationError as exc:
            problems += [{"line": number, "field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]}
                         for e in exc.errors(include_url=False)]
            continue
        if target.id in first_line:
            problems.append({"line": number, "field": "id", "message": f"duplicate id {target.id!r} (first at line "
                                                                        f"{first_line[target.id]})"})
        first_line.setdefault(target.id, number)
    problems.sort(key=lambda p: p["line"] or 0)
    return len(first_line), problems


@targets_app.command("import")
def import_targets(
    file: Annotated[Path, typer.Argument(help="JSON array or JSON lines of targets", exists=True, dir_okay=False)],
    mode: Annotated[str, typer.Option(help="upsert: add/overwrite these; replace: these become the whole set")]
    = "upsert",
    fmt: Annotated[str, typer.Option("--format", help="auto, json or jsonl")] = "auto",
    local_check: Annotated[bool, typer.Option("--check/--no-check", help="validate locally before uploading")]
    = True,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the server")] = 600.0,
    url: Url = DEFAULT_URL,
    admin_key: AdminKey = None,
) -> None:
    """Import many targets in one atomic write (all or nothing)."""
    if mode not in ("upsert", "replace"):
        raise typer.BadParameter("upsert or replace", param_hint="--mode")
    if fmt not in ("auto", "json", "jsonl"):
        raise typer.BadParameter("auto, json or jsonl", param_hint="--format")
    err = Console(stderr=True)
    columns = (TextColumn("{task.description:>10}"), BarColumn(), TaskProgressColumn(), TimeRemainingColumn())
    with Progress(*columns, console=err, transient=True) as progress:
        body = _read_with_progress(file, progress)
        fmt = _format_of(file, body, fmt)
        count = None
        if local_check:
            count, problems = check_locally(body, fmt, progress)
    if local_check:
        if problems:
            _fail(AdminError(f"{file}: {len(problems)} problem(s); nothing was sent", problems))
        err.print(f"{file}: {count:,} valid targets")
    media = "application/json" if fmt == "json" else "application/x-ndjson"
    try:
        with AdminClient(url, admin_key, timeout_s=timeout) as client, \
                err.status(f"the gateway is validating and writing {f'{count:,}' if count else 'the'} targets ..."):
            result = client.request("POST", "/admin/targets/import", params={"mode": mode}, content=body,
                                    headers={"content-type": media}).json()
    except AdminError as error:
        _fail(error)
    typer.echo(f"imported {result['received']:,} targets (mode {result['mode']}, targets version "
               f"{result['version']})")


@targets_app.command("export")
def export(
    out: Annotated[Path | None, typer.Option(help="file to write [default: stdout]")] = None,
    fmt: Annotated[str, typer.Option("--format", help="jsonl or json")] = "jsonl",
    as_of: AsOf = None,
    url: Url = DEFAULT_URL,
    admin_key: AdminKey = None,
) -> None:
    """Write every target as JSON lines (or a JSON array): the input format of `targets import`."""
    if fmt not in ("jsonl", "json"):
        raise typer.BadParameter("jsonl or json", param_hint="--format")
    params: dict[str, Any] = {"format": fmt}
    if as_of:
        params["as_of"] = as_of
    target = out.open("wb") if out is not None else sys.stdout.buffer
    try:
        with AdminClient(url, admin_key, timeout_s=600.0) as client, \
                client.stream("/admin/targets/export", params) as response:
                version = response.headers.get("x-unlearn-targets-version", "?")
                for chunk in response.iter_bytes():
                    target.write(chunk)
    except AdminError as error:
        _fail(error)
    finally:
        if out is not None:
            target.close()
        else:
            target.flush()
    if out is not None:
        Console(stderr=True).print(f"exported targets version {version} to {out}")
