"""``corral backends``: list, add, remove, drain and enable a running corral's backends."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any
from urllib.parse import quote

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from corral.cli.client import API, DEFAULT_URL, ApiError, KeyOpt, UrlOpt, call, fail, fetch
from corral.cli.render import JsonOpt, err, health, num, say, short_gpu_name, show

backends_app = typer.Typer(
    help="List, add, remove, drain and enable the backends of a running corral.",
    invoke_without_command=True,
    no_args_is_help=False,
)


def _opts(
    ctx: typer.Context, url: str, key: str | None, as_json: bool
) -> tuple[str, str | None, bool]:
    """A subcommand's --url/--admin-key/--json, or the ones given to ``corral backends``
    before it (``corral backends --json drain gpu1``)."""
    parent = ctx.parent

    def typed(c: Any, name: str) -> bool:
        # By name: typer bundles its own click, whose ParameterSource is not click's.
        source = c.get_parameter_source(name)
        return source is not None and source.name == "COMMANDLINE"

    def pick(name: str, own: Any) -> Any:
        if parent is not None and not typed(ctx, name) and typed(parent, name):
            return parent.params[name]
        return own

    return pick("url", url), pick("admin_key", key), pick("as_json", as_json)


IdArg = Annotated[str, typer.Argument(metavar="ID", help="The backend's ID.")]


def _backend_path(backend_id: str) -> str:
    return f"{API}/backends/{quote(backend_id, safe='')}"


def backends_table(entries: list[dict[str, Any]]) -> Table:
    """The table ``corral backends`` prints: one row per backend."""
    table = Table(title="backends", title_justify="left")
    table.add_column("INSTANCE", no_wrap=True)
    table.add_column("URL", no_wrap=True)
    table.add_column("HEALTH", no_wrap=True)
    for col in ("ACTIVE", "WEIGHT"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("GPU")
    table.add_column("NOTES")
    for e in sorted(entries, key=lambda e: str(e.get("instance_id"))):
        stats = e.get("gpu_stats") or {}
        gpu = e.get("gpu")
        if stats.get("name"):
            gpu_text = short_gpu_name(stats["name"])
        elif gpu is not None:
            gpu_text = ", ".join(map(str, gpu)) if isinstance(gpu, list) else str(gpu)
        else:
            gpu_text = "-"
        notes = [
            note
            for note, on in (
                ("fallback", e.get("fallback")),
                ("ttl", e.get("dynamic")),
                ("dcgm", e.get("gpu_metrics_url")),
            )
            if on
        ]
        table.add_row(
            escape(str(e.get("instance_id"))),
            escape(str(e.get("url", ""))),
            health(e),
            f"{e.get('active_connections', 0)}/{e.get('max_concurrent', '?')}",
            num(e.get("weight") or 1.0),
            escape(gpu_text),
            ", ".join(notes) or "-",
        )
    return table


def _list_backends(url: str, key: str | None, as_json: bool) -> None:
    data = call(url, key, "GET", f"{API}/backends")
    show(data, as_json, lambda d: backends_table(d.get("backends", [])))


@backends_app.callback()
def _backends(
    ctx: typer.Context,
    url: UrlOpt = DEFAULT_URL,
    admin_key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """With no subcommand: list the backends."""
    if ctx.invoked_subcommand is None:
        _list_backends(url, admin_key, as_json)


@backends_app.command("list")
def backends_list(
    ctx: typer.Context,
    url: UrlOpt = DEFAULT_URL,
    admin_key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the backends: health, in flight, weight, GPU."""
    _list_backends(*_opts(ctx, url, admin_key, as_json))


def _state_words(e: dict[str, Any]) -> str:
    return (
        f"{Text.from_markup(health(e)).plain}, {e.get('active_connections', 0)}/"
        f"{e.get('max_concurrent', '?')} in flight, weight {num(e.get('weight') or 1.0)}"
    )


def _gpu_ref(value: str) -> int | str:
    return int(value) if value.isdigit() else value


@backends_app.command("add")
def backends_add(
    ctx: typer.Context,
    backend_id: IdArg,
    backend_url: Annotated[
        str, typer.Argument(metavar="URL", help="Its Ollama URL, e.g. http://10.0.0.5:11434.")
    ],
    max_concurrent: Annotated[
        int | None, typer.Option(min=1, help="Requests at once (default 4).", show_default=False)
    ] = None,
    weight: Annotated[
        float | None,
        typer.Option(help="Weight (default: from VRAM).", show_default=False),
    ] = None,
    gpu: Annotated[
        list[str] | None,
        typer.Option(
            help="This host's GPU index or UUID behind it (repeat for several).", show_default=False
        ),
    ] = None,
    gpu_metrics_url: Annotated[
        str | None,
        typer.Option(help="Its host's DCGM exporter URL, for GPU readings.", show_default=False),
    ] = None,
    fallback: Annotated[
        bool, typer.Option("--fallback", help="Use it only when no other backend can.")
    ] = False,
    ttl: Annotated[
        float | None,
        typer.Option(
            help="Remove it unless it heartbeats within S seconds.",
            show_default=False,
            metavar="S",
        ),
    ] = None,
    url: UrlOpt = DEFAULT_URL,
    admin_key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Register a backend at runtime (corral probes it at once)."""
    url, admin_key, as_json = _opts(ctx, url, admin_key, as_json)
    body: dict[str, Any] = {"id": backend_id, "url": backend_url}
    refs = [_gpu_ref(part.strip()) for item in gpu or [] for part in item.split(",") if part]
    if refs:
        body["gpu"] = refs[0] if len(refs) == 1 else refs
    for field, value in (
        ("max_concurrent", max_concurrent),
        ("weight", weight),
        ("gpu_metrics_url", gpu_metrics_url),
        ("ttl_s", ttl),
    ):
        if value is not None:
            body[field] = value
    if fallback:
        body["fallback"] = True
    entry = call(url, admin_key, "POST", f"{API}/backends", body)
    if as_json:
        print(json.dumps(entry, indent=2))
        return
    say(f"added {backend_id} ({entry.get('url', backend_url)}): {_state_words(entry)}")
    if not entry.get("healthy"):
        err.print(
            f"warning: {backend_id} does not answer yet; corral keeps probing it",
            markup=False,
            soft_wrap=True,
        )


@backends_app.command("remove")
def backends_remove(
    ctx: typer.Context,
    backend_id: IdArg,
    force: Annotated[
        bool,
        typer.Option("--force", help="Remove at once; requests in flight finish on their own."),
    ] = False,
    url: UrlOpt = DEFAULT_URL,
    admin_key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Drain a backend, wait for its requests in flight (up to the drain timeout), remove it."""
    url, admin_key, as_json = _opts(ctx, url, admin_key, as_json)
    params = {"force": "true"} if force else None
    try:
        with err.status(f"draining {backend_id}: waiting for its requests in flight"):
            # corral bounds the wait (server.drain_timeout_s); this only guards a hung server.
            data = fetch(
                url, admin_key, "DELETE", _backend_path(backend_id), params=params, timeout_s=3600.0
            )
    except ApiError as exc:
        fail(str(exc).replace("DELETE with ?force=true", "add --force"))
    if as_json:
        print(json.dumps(data, indent=2))
        return
    left = data.get("in_flight") or 0
    tail = f" ({left} request(s) still in flight finish on their own)" if left else ""
    say(f"removed {data.get('removed', backend_id)}{tail}")


def _register_action(action: str, doc: str, said: Callable[[str, dict[str, Any]], str]) -> None:
    """``corral backends drain|enable ID``: PATCH the action, print ``said(ID, new entry)``."""

    def command(
        ctx: typer.Context,
        backend_id: IdArg,
        url: UrlOpt = DEFAULT_URL,
        admin_key: KeyOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        url, admin_key, as_json = _opts(ctx, url, admin_key, as_json)
        path = _backend_path(backend_id)
        entry: dict[str, Any] = call(url, admin_key, "PATCH", path, {"action": action})
        if as_json:
            print(json.dumps(entry, indent=2))
        else:
            say(said(backend_id, entry))

    backends_app.command(action, help=doc)(command)


_register_action(
    "drain",
    "Stop sending new requests to a backend; the ones in flight finish.",
    lambda bid, e: (
        f"{bid} draining: no new requests; {e.get('active_connections', 0)} in flight will finish"
    ),
)
_register_action(
    "enable",
    "Send requests to a drained backend again.",
    lambda bid, e: f"{bid} enabled: {_state_words(e)}",
)
