"""``corral status``: the load table of a running corral with its queue and utilization
(``--watch`` refreshes it in place until Ctrl-C)."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any

import typer
from rich.console import Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.text import Text

from corral.cli.client import API, DEFAULT_URL, ApiError, KeyOpt, UrlOpt, fail, fetch, poll
from corral.cli.render import JsonOpt, console, err, load_table, pct

PRIORITY_ORDER = ("urgent", "high", "normal", "low")


def status_lines(data: dict[str, Any]) -> list[str]:
    """The lines under the load table: the queue (per priority, most urgent first, when corral
    reports ``queued_by_priority``) and utilization (from ``GET /stats``), and failed requests
    per backend when there are any (off the table, to keep it narrow)."""
    stats: dict[str, Any] = data.get("stats") or {}
    queued = stats.get("queued_by_priority", stats.get("queued", 0))
    if isinstance(queued, dict):
        rank = {name: i for i, name in enumerate(PRIORITY_ORDER)}
        waiting = sorted(
            ((str(k), int(v)) for k, v in queued.items() if v), key=lambda kv: rank.get(kv[0], 9)
        )
        queue = f"queue: {sum(int(v) for v in queued.values())} waiting"
        if waiting:
            queue += " (" + ", ".join(f"{n} {name}" for name, n in waiting) + ")"
    else:
        queue = f"queue: {queued} waiting"
    healthy, count = stats.get("healthy", 0), stats.get("backends", 0)
    colour = "green" if healthy == count and count else ("red" if not healthy else "yellow")
    used = (
        f"utilization: {stats.get('current_load', 0)}/{stats.get('total_capacity', 0)} slots"
        f" ({pct(stats.get('utilization'))}), [{colour}]{healthy}/{count} backends healthy[/],"
        f" strategy {escape(str(stats.get('strategy')))}, {stats.get('retried', 0)} retried"
    )
    lines = [queue, used]
    failed = [
        (bid, e["failures"])
        for bid, e in sorted(data.get("loads", {}).items())
        if e.get("failures")
    ]
    if failed:
        each = ", ".join(f"{escape(bid)} {n}" for bid, n in failed)
        lines.append(f"failed requests: [red]{sum(n for _, n in failed)}[/] ({each})")
    return lines


def status_view(data: dict[str, Any], *, title: str | None = None) -> RenderableType:
    """``corral status``: the load table, then the queue and utilization lines."""
    lines = [Text.from_markup(line) for line in status_lines(data)]
    return Group(load_table(data, title=title), *lines)


def status_data(url: str, key: str | None) -> dict[str, Any]:
    """``GET /loads`` with ``GET /stats`` added under ``"stats"``."""
    loads: dict[str, Any] = fetch(url, key, "GET", f"{API}/loads")
    return {**loads, "stats": fetch(url, key, "GET", f"{API}/stats")}


def status(
    url: UrlOpt = DEFAULT_URL,
    admin_key: KeyOpt = None,
    as_json: JsonOpt = False,
    watch: Annotated[
        bool, typer.Option("--watch", "-w", help="Refresh in place until Ctrl-C.")
    ] = False,
    interval: Annotated[
        float, typer.Option("--interval", min=0.1, help="Seconds between refreshes (--watch).")
    ] = 2.0,
) -> None:
    """Show the load table of a running corral, with its queue and utilization.

    --json prints GET /loads with GET /stats added under "stats" (one object per line with
    --watch)."""
    if watch:
        _watch(url, admin_key, interval, as_json)
        return
    try:
        data = status_data(url, admin_key)
    except ApiError as exc:
        fail(str(exc))
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        console.print(status_view(data, title=f"corral at {url}"))


def _watch(url: str, key: str | None, interval_s: float, as_json: bool) -> None:
    """Refresh until Ctrl-C (exit 0). Once corral has answered, losing it is shown under the
    last table and retried; any other error (401, ...) ends the watch with exit 1."""

    def title() -> str:
        return f"corral at {url} ({time.strftime('%H:%M:%S')}, every {interval_s:g}s)"

    answers = poll(lambda: status_data(url, key), interval_s)
    try:
        if as_json:
            for answer in answers:
                if isinstance(answer, ApiError):
                    err.print(f"error: {answer} (retrying)", markup=False, soft_wrap=True)
                else:
                    print(json.dumps(answer), flush=True)
            return
        first = next(answers)
        if isinstance(first, ApiError):  # corral never answered: no table to keep
            fail(str(first))
        err.print(
            f"watching {url} every {interval_s:g}s; Ctrl-C to stop",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        view = status_view(first, title=title())
        with Live(view, console=console, auto_refresh=False) as live:
            for answer in answers:
                if isinstance(answer, ApiError):
                    note = Text(f"error: {answer} (retrying every {interval_s:g}s)", style="red")
                    live.update(Group(view, note), refresh=True)
                else:
                    view = status_view(answer, title=title())
                    live.update(view, refresh=True)
    except KeyboardInterrupt:
        raise typer.Exit(0) from None
    except ApiError as exc:
        fail(str(exc))
