"""The client commands of ``corral``: they talk to a running corral's admin API."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Annotated, Any, NoReturn
from urllib.parse import quote

import httpx
import typer
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

console = Console()
err = Console(stderr=True)

UrlOpt = Annotated[str, typer.Option("--url", envvar="CORRAL_URL", help="URL of a running corral.")]
KeyOpt = Annotated[
    str | None,
    typer.Option("--admin-key", envvar="CORRAL_ADMIN_KEY", help="Admin key.", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
DEFAULT_URL = "http://127.0.0.1:11434"

client_app = typer.Typer()


# Client commands ---------------------------------------------------------------------------
# They talk to a running corral's admin API. Every failure becomes one ``error: ...`` line on
# stderr and exit code 1: ``fetch`` raises ApiError with that line, ``_call`` prints it.

API = "/api/v1/loadbalancer"
KEY_HOW = "pass --admin-key KEY or set CORRAL_ADMIN_KEY"


class ApiError(Exception):
    """Why a call to a running corral failed, worded as the line the user sees."""

    def __init__(self, message: str, *, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


def _client(url: str, key: str | None, timeout_s: float) -> httpx.Client:
    headers = {"X-API-Key": key} if key else {}
    return httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)


def _why(exc: Exception) -> str:
    if isinstance(exc, httpx.UnsupportedProtocol):
        return "the URL must start with http:// or https://"
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer in time ({type(exc).__name__})"
    return str(exc) or type(exc).__name__


def _detail(resp: httpx.Response) -> str | None:
    """The error text of a corral answer (FastAPI's ``detail``), None if it is not one."""
    try:
        body = resp.json()
    except ValueError:
        return None
    if not isinstance(body, dict) or "detail" not in body:
        return None
    detail = body["detail"]
    if isinstance(detail, list):  # request validation: one entry per bad field
        return "; ".join(_invalid_field(d) for d in detail)
    return str(detail)


def _invalid_field(entry: Any) -> str:
    if not isinstance(entry, dict):
        return str(entry)
    where = [str(p) for p in entry.get("loc", []) if p not in ("body", "query", "path")]
    message = str(entry.get("msg", entry))
    return f"{'.'.join(where)}: {message}" if where else message


def fetch(
    url: str,
    key: str | None,
    method: str,
    path: str,
    body: Any = None,
    *,
    params: dict[str, str] | None = None,
    timeout_s: float = 10.0,
) -> Any:
    """One admin API call: its JSON answer, or ApiError with the one line to show."""
    try:
        with _client(url, key, timeout_s) as client:
            resp = client.request(method, path, json=body, params=params)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise ApiError(f"cannot reach corral at {url}: {_why(exc)}", unreachable=True) from None
    if resp.status_code == 401:
        if key:
            raise ApiError(f"401: the admin key was refused (wrong key?); {KEY_HOW}")
        raise ApiError(f"401: this corral needs an admin key; {KEY_HOW}")
    detail = _detail(resp)
    if resp.status_code == 404 and detail in (None, "Not Found"):
        # Not corral's own 404 (an unknown backend): the URL is not a corral, or an older one.
        raise ApiError(f"404: {url} has no {path}: is it a corral (and a recent one)?")
    if resp.status_code >= 400:
        text = detail if detail is not None else (resp.text.strip()[:200] or resp.reason_phrase)
        raise ApiError(f"{resp.status_code}: {text}")
    try:
        return resp.json()
    except ValueError:
        raise ApiError(f"{url}{path} did not answer JSON: is it a corral?") from None


def _fail(message: str) -> NoReturn:
    err.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _call(
    url: str,
    key: str | None,
    method: str,
    path: str,
    body: Any = None,
    timeout_s: float = 10.0,
    params: dict[str, str] | None = None,
) -> Any:
    """``fetch``, printing the error line and exiting 1 when it fails."""
    try:
        return fetch(url, key, method, path, body, params=params, timeout_s=timeout_s)
    except ApiError as exc:
        _fail(str(exc))


def _say(text: str) -> None:
    console.print(text, highlight=False, soft_wrap=True)


def _show(data: Any, as_json: bool, table: Callable[[Any], RenderableType]) -> None:
    """Print an admin API answer: as JSON for scripts, else as ``table(data)``."""
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        console.print(table(data))


def _fmt_s(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def _num(value: float) -> str:
    return f"{round(value, 2):g}"


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value / 1024**3:.1f}"


def _vram(used: float | None, total: float | None) -> str:
    if used is None and total is None:
        return "-"
    return f"{_gib(used)}/{_gib(total)} GiB"


def _pct(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio * 100:.0f}%"


def _temp(value: float | None, hot: bool = False) -> str:
    if value is None:
        return "-"
    text = f"{value:.0f}°C"
    return f"[red]{text} hot[/red]" if hot else text


def _short_gpu_name(name: str | None) -> str:
    return "-" if not name else name.removeprefix("NVIDIA ")


def _health(e: dict[str, Any]) -> str:
    if not e.get("healthy"):
        return "[red]down[/red]"
    if e.get("draining"):
        return "[yellow]draining[/yellow]"
    if e.get("ejected"):
        return "[red]ejected[/red]"
    return "[green]up[/green]"


def _gpu_cell(g: dict[str, Any] | None) -> str:
    """A backend's GPU in one cell: short name, utilization, VRAM used/total, temperature."""
    if not g:
        return "-"
    if g.get("source") == "ollama":  # no GPU reading: only the VRAM /api/ps reports
        return f"(from /api/ps) {_gib(g.get('memory_used_bytes'))} GiB used"
    parts = [escape(_short_gpu_name(g.get("name")))]
    if g.get("utilization_ratio") is not None:
        parts.append(_pct(g["utilization_ratio"]))
    if g.get("memory_used_bytes") is not None or g.get("memory_total_bytes") is not None:
        parts.append(_vram(g.get("memory_used_bytes"), g.get("memory_total_bytes")))
    if g.get("temperature_c") is not None:
        parts.append(_temp(g["temperature_c"], bool(g.get("hot"))))
    return " ".join(parts)


def load_table(
    data: dict[str, Any], *, title: str | None = None, wide: bool | None = None
) -> Table:
    """The load table ``corral status`` and the demo print: one row per backend (the URL
    column only on wide terminals). On narrow ones the GPU column wraps, nothing is cut."""
    if wide is None:
        wide = console.width >= 150
    if title is None:
        title = f"corral: strategy {data.get('strategy')}"
    table = Table(title=title, title_justify="left")
    table.add_column("INSTANCE", no_wrap=True)
    table.add_column("GPU")
    table.add_column("HEALTH", no_wrap=True)
    for col in ("ACTIVE", "TOTAL", "AVG RT", "WEIGHT"):
        table.add_column(col, justify="right", no_wrap=True)
    if wide:
        table.add_column("URL", no_wrap=True)
    for bid, e in sorted(data.get("loads", {}).items()):
        row = [
            escape(bid),
            _gpu_cell(e.get("gpu_stats")),
            _health(e),
            f"{e.get('active_connections', 0)}/{e.get('max_concurrent', '?')}",
            str(e.get("total_connections", 0)),
            _fmt_s(e.get("avg_response_time")),
            _num(e.get("weight") or 1.0),
        ]
        if wide:
            row.append(escape(str(e.get("url", ""))))
        table.add_row(*row)
    return table


PRIORITY_ORDER = ("urgent", "high", "normal", "low")


def status_lines(data: dict[str, Any]) -> list[str]:
    """The lines under the load table: the queue and utilization (from ``GET /stats``), and
    failed requests per backend when there are any (off the table, to keep it narrow)."""
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
        f" ({_pct(stats.get('utilization'))}), [{colour}]{healthy}/{count} backends healthy[/],"
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


def _status_data(url: str, key: str | None) -> dict[str, Any]:
    """``GET /loads`` with ``GET /stats`` added under ``"stats"``."""
    loads: dict[str, Any] = fetch(url, key, "GET", f"{API}/loads")
    return {**loads, "stats": fetch(url, key, "GET", f"{API}/stats")}


def gpu_table(gpus: list[dict[str, Any]], title: str, *, wide: bool | None = None) -> Table:
    """The table ``corral gpus`` prints: one row per GPU (UUIDs only on wide terminals)."""
    if wide is None:
        wide = console.width >= 140
    table = Table(title=title, title_justify="left")
    table.add_column("gpu", justify="right", no_wrap=True)
    table.add_column("name")
    if wide:
        table.add_column("uuid", no_wrap=True)
    for col in ("util", "memory", "temp", "power"):
        table.add_column(col, justify="right", no_wrap=True)
    show_backends = any("backends" in g for g in gpus)
    if show_backends:
        table.add_column("backends", no_wrap=True)
    show_hosts = any(g.get("host") for g in gpus)
    if show_hosts:
        table.add_column("host", no_wrap=True)
    for g in gpus:
        power = g.get("power_w")
        limit = g.get("power_limit_w")
        power_text = "-" if power is None else f"{power:.0f} W"
        if power is not None and limit:
            power_text += f" / {limit:.0f} W"
        row = [
            str(g.get("index")) if (g.get("index") is not None and g["index"] >= 0) else "-",
            escape(g.get("name") or "-"),
            *([g.get("uuid") or "-"] if wide else []),
            _pct(g.get("utilization_ratio")),
            _vram(g.get("memory_used_bytes"), g.get("memory_total_bytes")),
            _temp(g.get("temperature_c"), bool(g.get("hot"))),
            power_text,
        ]
        if show_backends:
            row.append(", ".join(g.get("backends") or []) or "-")
        if show_hosts:
            row.append(g.get("host") or "local")
        table.add_row(*row)
    return table


@client_app.command()
def gpus(
    as_json: JsonOpt = False,
    url: Annotated[
        str | None,
        typer.Option(
            "--url", help="Ask a running corral instead of this host's NVML.", show_default=False
        ),
    ] = None,
    admin_key: KeyOpt = None,
) -> None:
    """List this host's GPUs through NVML (or, with --url, the GPUs a running corral reads)."""
    if url is not None:
        data = _call(url, admin_key, "GET", f"{API}/gpus")
        if as_json:
            print(json.dumps(data, indent=2))
            return
        if not data.get("gpus"):
            err.print("no GPU readings on that corral", markup=False)
            raise typer.Exit(1)
        console.print(gpu_table(data["gpus"], f"GPUs read by corral at {url}"))
        return
    from corral.fleet.gpu import detect_local_gpus

    found, reason = detect_local_gpus()
    if as_json:
        print(json.dumps({"gpus": [g.to_json() for g in found], "error": reason}, indent=2))
    elif reason is not None:
        err.print(f"no GPU found: {reason}", markup=False)
    else:
        console.print(gpu_table([g.to_json() for g in found], "GPUs on this host (NVML)"))
    if reason is not None:
        raise typer.Exit(1)


@client_app.command()
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
        data = _status_data(url, admin_key)
    except ApiError as exc:
        _fail(str(exc))
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        console.print(status_view(data, title=f"corral at {url}"))


def _watch(url: str, key: str | None, interval_s: float, as_json: bool) -> None:
    """Refresh until Ctrl-C (exit 0). Once corral has answered, losing it is shown under the
    last table and retried; any other error (401, ...) ends the watch with exit 1."""

    def title() -> str:
        return f"corral at {url} ({time.strftime('%H:%M:%S')}, every {interval_s:g}s)"

    try:
        if as_json:
            while True:
                try:
                    print(json.dumps(_status_data(url, key)), flush=True)
                except ApiError as exc:
                    if not exc.unreachable:
                        raise
                    err.print(f"error: {exc} (retrying)", markup=False, soft_wrap=True)
                time.sleep(interval_s)
        first = _status_data(url, key)
        err.print(
            f"watching {url} every {interval_s:g}s; Ctrl-C to stop",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        view = status_view(first, title=title())
        with Live(view, console=console, auto_refresh=False) as live:
            while True:
                time.sleep(interval_s)
                try:
                    view = status_view(_status_data(url, key), title=title())
                    live.update(view, refresh=True)
                except ApiError as exc:
                    if not exc.unreachable:
                        raise
                    note = Text(f"error: {exc} (retrying every {interval_s:g}s)", style="red")
                    live.update(Group(view, note), refresh=True)
    except KeyboardInterrupt:
        raise typer.Exit(0) from None
    except ApiError as exc:
        _fail(str(exc))


@client_app.command()
def strategy(
    name: Annotated[
        str | None, typer.Argument(help="New strategy; omit to show the current one.")
    ] = None,
    url: UrlOpt = DEFAULT_URL,
    admin_key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show or switch the balancing strategy at runtime."""
    if name is None:
        data = _call(url, admin_key, "GET", f"{API}/strategy")
    else:
        data = _call(url, admin_key, "PUT", f"{API}/strategy", {"strategy": name})
    if as_json:
        print(json.dumps(data))
    else:
        _say(data.get("message") or data["strategy"])


def models_table(models: list[dict[str, Any]]) -> Table:
    """The VRAM report ``corral models`` prints: one row per model and backend."""
    table = Table(title="models per backend", title_justify="left")
    table.add_column("model", no_wrap=True)
    table.add_column("backend", no_wrap=True)
    table.add_column("installed", no_wrap=True)
    table.add_column("resident", no_wrap=True)
    for col in ("on gpu", "size", "vram"):
        table.add_column(col, justify="right", no_wrap=True)
    colour = {"gpu": "green", "partial": "yellow", "cpu": "red"}
    for m in models:
        for bid, e in sorted(m.get("backends", {}).items()):
            where = e.get("resident")
            size, vram = e.get("size"), e.get("size_vram")
            if where:
                state = f"[{colour.get(where, 'white')}]{where}[/]"
            else:
                state = "loading" if e.get("loading") else "-"
            share = vram / size if where and size and vram is not None else None
            table.add_row(
                m.get("name", "?"),
                bid,
                "yes" if e.get("installed") else "no",
                state,
                _pct(share),
                "-" if size is None else f"{_gib(size)} GiB",
                "-" if vram is None else f"{_gib(vram)} GiB",
            )
    return table


@client_app.command()
def models(url: UrlOpt = DEFAULT_URL, admin_key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """Show every model per backend: installed, loaded on GPU, partly or on CPU, and its VRAM."""
    data = _call(url, admin_key, "GET", f"{API}/models")
    _show(data, as_json, lambda d: models_table(d.get("models", [])))


@client_app.command()
def place(
    model: Annotated[str, typer.Argument(help="Model name, e.g. llama3.2 or qwen2.5:7b.")],
    gpu: Annotated[bool, typer.Option("--gpu", help="Reload it fully on GPU if it fits.")] = False,
    cpu: Annotated[bool, typer.Option("--cpu", help="Reload it on CPU (num_gpu 0).")] = False,
    preload: Annotated[bool, typer.Option("--preload", help="Load it now.")] = False,
    unload: Annotated[bool, typer.Option("--unload", help="Unload it now.")] = False,
    backend: Annotated[
        str | None,
        typer.Option("--backend", help="Only this backend (default: every one that has it)."),
    ] = None,
    url: UrlOpt = DEFAULT_URL,
    admin_key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Load, unload, or move a model to GPU or CPU; exits 1 when any backend failed."""
    chosen = [
        a for a, on in (("gpu", gpu), ("cpu", cpu), ("preload", preload), ("unload", unload)) if on
    ]
    if len(chosen) != 1:
        err.print("error: give exactly one of --gpu, --cpu, --preload, --unload", markup=False)
        raise typer.Exit(2)
    body: dict[str, Any] = {"action": chosen[0]}
    if backend is not None:
        body["backend"] = backend
    path = f"{API}/models/{quote(model, safe='/:')}/placement"
    # Loads can take minutes (a cold model read from disk).
    data = _call(url, admin_key, "POST", path, body, timeout_s=900.0)
    results: dict[str, Any] = data.get("results", {})
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        for bid, r in sorted(results.items()):
            if r.get("ok"):
                where = r.get("resident")
                now = f"on {where}" if where else "not loaded"
                console.print(f"{bid}: {chosen[0]} ok; {model} is {now}", highlight=False)
            else:
                err.print(f"{bid}: {chosen[0]} failed: {r.get('error')}", markup=False)
    if not all(r.get("ok") for r in results.values()):
        raise typer.Exit(1)
