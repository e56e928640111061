"""The dashboard's HTML, rendered on the server (the page works without JavaScript).

Every value shown is escaped here, in one place. The sections are rendered
by the same functions for the first paint and for each live update, so the
page a browser sees after an update is the page a reload would give.

Hooks for tests and scripts: ``data-worker`` (+ ``data-status``),
``data-queue`` (+ ``data-length``), ``data-task-id`` (+ ``data-state``,
Celery's state names), ``data-action`` on each action's button,
``data-traceback`` on a failure's traceback.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from html import escape
from typing import Any
from urllib.parse import quote, urlencode

from celery import states

from ..events import TaskRecord

__all__ = ["Context", "index", "sections", "task_detail", "task_page"]

#: A symbol per state, so a state reads without its colour too.
_MARKS = {states.SUCCESS: "✓", states.FAILURE: "✕", states.REVOKED: "⊘", states.REJECTED: "⊘",
          states.STARTED: "▶", "PROGRESS": "▶", states.RECEIVED: "•", states.PENDING: "…",
          states.RETRY: "↻"}

#: The longest result or exception text shown in a table cell.
_CELL_CHARS = 120


@dataclass(frozen=True)
class Context:
    prefix: str
    base: str
    mask: Callable[[str | None], bool]
    display_args: Callable[[TaskRecord], tuple[str | None, str | None]]

    def task_url(self, task_id: str) -> str:
        return f"{self.base}/tasks/{quote(task_id)}"


def _e(value: Any) -> str:
    return escape("" if value is None else str(value), quote=True)


def _short(text: str | None, limit: int = _CELL_CHARS) -> str:
    if text is None:
        return ""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def state_badge(state: str) -> str:
    kind = state.lower()
    return (f'<span class="state state-{_e(kind)}">'
            f'<span aria-hidden="true">{_MARKS.get(state, "·")}</span> {_e(state)}</span>')


def _when(stamp: float | None) -> str:
    if stamp is None:
        return ""
    moment = datetime.datetime.fromtimestamp(stamp, datetime.timezone.utc)
    return f'<time datetime="{moment.isoformat()}">{moment.strftime("%H:%M:%S")}</time>'


def _eta(raw: str | None) -> str:
    """An ETA as the workers report it (ISO 8601) as a time and how far off it is."""
    if not raw:
        return ""
    try:
        moment = datetime.datetime.fromisoformat(str(raw))
    except ValueError:
        return _e(raw)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.timezone.utc)
    left = (moment - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
    when = "due" if left <= 0 else f"in {_duration(left)}"
    utc = moment.astimezone(datetime.timezone.utc)
    return (f'<time datetime="{_e(utc.isoformat())}">{utc.strftime("%H:%M:%S")} UTC</time>'
            f' <span class="muted">({when})</span>')


def _duration(seconds: Any) -> str:
    try:
        value = float(seconds)
    except (TypeError, ValueError):
        return ""
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 120:
        return f"{value:.1f} s"
    minutes, rest = divmod(int(value), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days} d {hours} h"
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {rest} s"


def progress_bar(record: TaskRecord, with_message: bool = False) -> str:
    meta = record.progress if isinstance(record.progress, dict) else None
    if record.state == states.SUCCESS:
        return '<progress value="1" max="1" aria-label="done">done</progress>'
    if meta is None or not isinstance(meta.get("total"), (int, float)) or not meta.get("total"):
        if record.state in (states.STARTED, "PROGRESS"):
            return '<progress aria-label="running">running</progress>'
        return ""
    current = meta.get("current") or 0
    total = meta["total"]
    label = f"{current} of {total}"
    note = (f' <span class="muted">{_e(_short(str(meta.get("message")), 80))}</span>'
            if with_message and meta.get("message") else "")
    return (f'<span class="progress"><progress value="{_e(current)}" max="{_e(total)}" aria-label="{_e(label)}">'
            f'{_e(label)}</progress><span class="progress-text">{_e(label)}</span>{note}</span>')


def _outcome(record: TaskRecord) -> str:
    if record.exception:
        return f'<span class="error">{_e(_short(record.exception))}</span>'
    if record.result is not None:
        return f'<code>{_e(_short(record.result))}</code>'
    if record.eta and record.state in (states.RECEIVED, states.PENDING):
        return f'<span class="muted">scheduled:</span> {_eta(record.eta)}'
    return ""


def _table(cls: str, head: Iterable[str], rows: list[str], empty: str) -> str:
    if not rows:
        return f'<p class="empty">{_e(empty)}</p>'
    cells = "".join(f"<th scope=\"col\">{_e(h)}</th>" for h in head)
    return f'<table class="{cls}"><thead><tr>{cells}</tr></thead><tbody>{"".join(rows)}</tbody></table>'


def _td(label: str, content: str, cls: str = "") -> str:
    extra = f' class="{cls}"' if cls else ""
    return f'<td data-label="{_e(label)}"{extra}>{content}</td>'


def short_id(task_id: str) -> str:
    """The tail of an id: ids one process makes share their head (offload.hub's prefixes)."""
    return task_id if len(task_id) <= 12 else "…" + task_id[-8:]


def _task_link(ctx: Context, task_id: str) -> str:
    return (f'<a class="id" href="{_e(ctx.task_url(task_id))}" title="{_e(task_id)}">'
            f'{_e(short_id(task_id))}</a>')


# Sections ------------------------------------------------------------------


def sections(ctx: Context, snap: dict[str, Any], recent: list[TaskRecord], failed: list[TaskRecord],
             facets: tuple[list[str], list[str]], chosen: tuple[str | None, str | None],
             receiving: bool) -> dict[str, str]:
    """Each section's inner HTML, by the id of its element."""
    workers = snap.get("workers") or {}
    queues = snap.get("queues") or {}
    tasks = snap.get("tasks") or {}
    up = sum(1 for w in workers.values() if w.get("status") == "online")
    queued = sum(n for n in queues.values() if isinstance(n, int))
    count = {what: sum(len(v or ()) for v in (tasks.get(what) or {}).values())
             for what in ("active", "reserved", "scheduled", "revoked")}
    return {
        "summary": _summary(snap, up, len(workers), queued, count, len(failed), receiving),
        "workers": _workers(workers),
        "queues": _queues(queues),
        "onworkers": _on_workers(ctx, tasks, count["revoked"]),
        "recent": _recent(ctx, recent),
        "failed": _failed(ctx, failed, facets, chosen),
    }


def _summary(snap: dict[str, Any], up: int, known: int, queued: int, count: dict[str, int],
             failed: int, receiving: bool) -> str:
    cards = [("workers up", f"{up}/{known}" if known else "0", "ok" if up else "bad"),
             ("queued", str(queued), ""), ("active", str(count["active"]), ""),
             ("scheduled", str(count["scheduled"]), ""), ("failed", str(failed), "bad" if failed else "")]
    html = "".join(f'<div class="card {cls}"><span class="num">{_e(num)}</span>'
                   f'<span class="label">{_e(label)}</span></div>' for label, num, cls in cards)
    notes = []
    if snap.get("error"):
        notes.append(f'<p class="notice bad" role="status">Workers unreachable: {_e(_short(snap["error"], 200))}</p>')
    elif snap.get("at") is None:
        notes.append('<p class="notice" role="status">Asking the workers…</p>')
    if not receiving:
        notes.append('<p class="notice" role="status">Not receiving task events yet (connecting to the broker).</p>')
    return f'<div class="cards">{html}</div>{"".join(notes)}'


def _workers(workers: dict[str, dict[str, Any]]) -> str:
    rows = []
    for name, info in workers.items():
        status = info.get("status", "offline")
        badge = (f'<span class="state state-{"success" if status == "online" else "failure"}">'
                 f'<span aria-hidden="true">{"●" if status == "online" else "○"}</span> {_e(status)}</span>')
        rows.append(f'<tr data-worker="{_e(name)}" data-status="{_e(status)}">'
                    + _td("Worker", f"<strong>{_e(name)}</strong>", "wrap")
                    + _td("Status", badge)
                    + _td("Pool", _e(info.get("pool")), "num")
                    + _td("Active", _e(info.get("active")), "num")
                    + _td("Processed", _e(info.get("processed")), "num")
                    + _td("Uptime", _e(_duration(info.get("uptime"))), "num") + "</tr>")
    return "<h2>Workers</h2>" + _table("workers", ["Worker", "Status", "Pool", "Active", "Processed", "Uptime"],
                                       rows, "No worker has answered.")


def _queues(queues: dict[str, int | None]) -> str:
    rows = []
    for name, length in queues.items():
        shown = "—" if length is None else str(length)
        rows.append(f'<tr data-queue="{_e(name)}" data-length="{_e(length if length is not None else "")}">'
                    + _td("Queue", f"<strong>{_e(name)}</strong>", "wrap") + _td("Waiting", _e(shown), "num")
                    + "</tr>")
    return "<h2>Queues</h2>" + _table("queues", ["Queue", "Waiting"], rows, "No queue known.")


def _on_workers(ctx: Context, tasks: dict[str, Any], revoked: int) -> str:
    rows = []
    for what in ("active", "reserved", "scheduled"):
        for worker, items in (tasks.get(what) or {}).items():
            for item in items or ():
                request = item.get("request", item) if what == "scheduled" else item
                if not isinstance(request, dict) or not request.get("id"):
                    continue
                eta = item.get("eta") if what == "scheduled" else None
                name = request.get("name") or ""
                rows.append(f'<tr data-on-worker="{_e(what)}" data-id="{_e(request["id"])}">'
                            + _td("Task", _task_link(ctx, request["id"]))
                            + _td("Name", f"<code>{_e(name)}</code>", "wrap")
                            + _td("Where", f'{_e(what)} on {_e(worker)}', "wrap")
                            + _td("ETA", _eta(eta), "wrap") + "</tr>")
    html = "<h2>On the workers</h2>" + _table(
        "onworkers", ["Task", "Name", "Where", "ETA"], rows, "Nothing running, reserved or scheduled.")
    return html + f'<p class="muted">Revoked ids the workers remember: {revoked}</p>'


def _recent(ctx: Context, recent: list[TaskRecord]) -> str:
    rows = [_task_row(ctx, r) for r in recent]
    return "<h2>Recent tasks</h2>" + _table(
        "tasks", ["Task", "Name", "State", "Progress", "Runtime", "Result or error"], rows,
        "No task seen yet: tasks appear here as workers report them.")


def _task_row(ctx: Context, r: TaskRecord) -> str:
    return (f'<tr data-task-id="{_e(r.id)}" data-state="{_e(r.state)}">'
            + _td("Task", _task_link(ctx, r.id))
            + _td("Name", f"<code>{_e(r.name or '?')}</code>", "wrap")
            + _td("State", state_badge(r.state))
            + _td("Progress", progress_bar(r), "progress-cell")
            + _td("Runtime", _e(_duration(r.runtime)), "num")
            + _td("Result or error", _outcome(r), "wrap") + "</tr>")


def _failed(ctx: Context, failed: list[TaskRecord], facets: tuple[list[str], list[str]],
            chosen: tuple[str | None, str | None]) -> str:
    names, kinds = facets

    def select(field: str, label: str, options: list[str], current: str | None) -> str:
        opts = ['<option value="">all</option>'] + [
            f'<option value="{_e(o)}"{" selected" if o == current else ""}>{_e(o)}</option>' for o in options]
        return f'<label>{_e(label)} <select name="{field}">{"".join(opts)}</select></label>'

    form = (f'<form class="filters" method="get" action="{_e(ctx.base)}#failed">'
            + select("name", "Task", names, chosen[0]) + select("exc", "Exception", kinds, chosen[1])
            + '<button type="submit">Filter</button></form>')
    rows = []
    for r in failed:
        rows.append(f'<tr data-task-id="{_e(r.id)}" data-state="{_e(r.state)}" data-failed>'
                    + _td("Task", _task_link(ctx, r.id))
                    + _td("Name", f"<code>{_e(r.name or '?')}</code>", "wrap")
                    + _td("Exception", f'<span class="error">{_e(_short(r.exception))}</span>', "wrap")
                    + _td("When", _when(r.updated))
                    + _td("Retried", _task_link(ctx, r.retried_as) if r.retried_as else "") + "</tr>")
    return "<h2>Failed</h2>" + form + _table(
        "failed", ["Task", "Name", "Exception", "When", "Retried as"], rows,
        "No failed task" + (" matches." if any(chosen) else "."))


# Pages ---------------------------------------------------------------------


def _layout(ctx: Context, title: str, body: str, live: dict[str, str]) -> str:
    attrs = "".join(f' data-{k}="{_e(v)}"' for k, v in live.items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)} · offload</title>
<link rel="stylesheet" href="{_e(ctx.prefix)}/static/offload.css">
</head>
<body class="offload-ui">
<header class="topbar"><a class="brand" href="{_e(ctx.base)}"><span class="logo" aria-hidden="true">◆</span> offload</a>
<span class="live" id="live" data-live="off" role="status">not live</span></header>
<main{attrs}>
{body}
</main>
<script src="{_e(ctx.prefix)}/static/dashboard.js" defer></script>
</body></html>
"""


def index(ctx: Context, parts: dict[str, str], csrf: str) -> str:
    body = "\n".join(f'<section id="{key}" class="panel panel-{key}">{html}</section>' for key, html in parts.items())
    return _layout(ctx, "Dashboard", f"<h1>Dashboard</h1>\n{body}", {
        "fragments": f"{ctx.base}/fragments", "stream": f"{ctx.base}/live"})


def task_detail(ctx: Context, record: TaskRecord | None, task_id: str) -> str | None:
    """The live part of a task's page (None: nothing is known of it)."""
    if record is None:
        return None
    masked = ctx.mask(record.name)
    args, kwargs = ctx.display_args(record)
    rows = [("Name", f"<code>{_e(record.name or '?')}</code>"), ("State", state_badge(record.state)),
            ("Worker", _e(record.worker or "")), ("Queue", _e(record.queue or "")),
            ("Runtime", _e(_duration(record.runtime))), ("ETA", _eta(record.eta)),
            ("Retries", _e(record.retries or ""))]
    if masked:
        rows.append(("Arguments", '<span class="muted" data-masked>hidden (mask_args=True)</span>'))
    else:
        rows += [("args", f"<code>{_e(args or '')}</code>"), ("kwargs", f"<code>{_e(kwargs or '')}</code>")]
    if record.retry_of:
        rows.append(("Retry of", _task_link(ctx, record.retry_of)))
    if record.retried_as:
        rows.append(("Retried as", _task_link(ctx, record.retried_as)))
    facts = "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>" for k, v in rows if v)
    progress = progress_bar(record, with_message=True)
    history = [f'<tr>{_td("State", state_badge(s))}{_td("At", _when(t))}</tr>' for s, t in record.history]
    html = [f'<div class="task-head" data-task-id="{_e(record.id)}" data-state="{_e(record.state)}">'
            f"<dl class=\"facts\">{facts}</dl>"
            + (f'<div class="progress-line">{progress}</div>' if progress else "") + "</div>",
            "<h2>History</h2>" + _table("history", ["State", "At"], history, "No event seen.")]
    if record.result is not None and record.state == states.SUCCESS:
        html.append(f"<h2>Result</h2><pre class=\"result\">{_e(record.result)}</pre>")
    if record.exception:
        html.append(f'<h2>Exception</h2><p class="error"><strong>{_e(record.exception)}</strong></p>')
    if record.traceback:
        html.append(f"<h2>Traceback</h2><pre class=\"traceback\" data-traceback>{_e(record.traceback)}</pre>")
    return "\n".join(html)


def task_page(ctx: Context, record: TaskRecord | None, task_id: str, parts: dict[str, Any], csrf: str,
              listed_failed: bool) -> str:
    detail = parts["detail"]
    if detail is None:
        detail = ('<p class="empty">Nothing is known of this task yet: no event names it and the result '
                  "store has no state for it. This page updates when it appears.</p>")
    state = record.state if record else states.PENDING
    body = [f'<p class="crumbs"><a href="{_e(ctx.base)}">Dashboard</a> › task</p>',
            f'<h1 class="task-title">Task <code>{_e(task_id)}</code></h1>',
            f'<div id="actions" class="actions" data-state="{_e(state)}">{_actions(ctx, record, task_id, csrf, listed_failed)}</div>',
            f'<section id="detail" class="panel">{detail}</section>']
    return _layout(ctx, f"Task {short_id(task_id)}", "\n".join(body), {
        "fragments": f"{ctx.task_url(task_id)}/fragment",
        "stream": f"{ctx.base}/live?{urlencode({'task': task_id})}", "task": task_id})


def _actions(ctx: Context, record: TaskRecord | None, task_id: str, csrf: str, listed_failed: bool) -> str:
    url = ctx.task_url(task_id)
    token = f'<input type="hidden" name="csrf" value="{_e(csrf)}">'
    forms = []
    final = record is not None and record.final
    if not final:
        forms.append(f'<form method="post" action="{_e(url)}/revoke" data-when="unfinished">{token}'
                     '<button type="submit" data-action="revoke">Revoke</button></form>')
        forms.append(f'<form method="post" action="{_e(url)}/revoke" data-when="unfinished">{token}'
                     '<input type="hidden" name="terminate" value="1">'
                     '<button type="submit" class="danger" data-action="terminate" '
                     'title="Also stop it if it is running (kills the pool process)">Terminate</button></form>')
    if record is not None and record.state == states.FAILURE and not record.retried_as:
        forms.append(f'<form method="post" action="{_e(url)}/retry">{token}'
                     '<button type="submit" data-action="retry">Retry with the same arguments</button></form>')
    if listed_failed:
        forms.append(f'<form method="post" action="{_e(url)}/dismiss">{token}'
                     '<button type="submit" data-action="dismiss">Dismiss</button></form>')
    return "".join(forms)
