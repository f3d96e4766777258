"""``corral models`` (the VRAM report per model and backend) and ``corral place MODEL``
(load, unload, or move a model to GPU or CPU)."""

from __future__ import annotations

import json
import time
from typing import Annotated, Any
from urllib.parse import quote

import typer
from rich.console import Group, RenderableType
from rich.table import Table

from corral.cli.client import API, DEFAULT_URL, KeyOpt, UrlOpt, call
from corral.cli.render import JsonOpt, age, console, err, pct, show
from corral.cli.render import size as size_text


def models_table(models: list[dict[str, Any]]) -> Table:
    """The VRAM report ``corral models`` prints: one row per model and backend."""
    table = Table(title="models per backend", title_justify="left")
    table.add_column("model", no_wrap=True)
    table.add_column("backend", no_wrap=True)
    table.add_column("installed", no_wrap=True)
    table.add_column("resident", no_wrap=True)
    for col in ("on gpu", "size", "vram", "context"):
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
                pct(share),
                size_text(size),
                size_text(vram),
                "-" if e.get("context_length") is None else f"{e['context_length']:,}",
            )
    return table


def replays_table(replays: list[dict[str, Any]], now: float | None = None) -> Table:
    """The fleet-wide operations backends missed and will get when they are available."""
    now = time.time() if now is None else now
    table = Table(title="pending replays", title_justify="left")
    for col in ("backend", "action", "model", "missed because", "since", "tries", "last error"):
        table.add_column(col, no_wrap=col != "last error")
    for r in replays:
        model = r.get("model", "?")
        if r.get("source"):
            model = f"{r['source']} -> {model}"
        since = r.get("since")
        table.add_row(
            r.get("backend", "?"),
            r.get("action", "?"),
            model,
            r.get("reason", "?"),
            "-" if not isinstance(since, int | float) else age(max(now - since, 0.0)) + " ago",
            str(r.get("attempts", 0)),
            r.get("last_error") or "-",
        )
    return table


def _report(data: dict[str, Any]) -> RenderableType:
    tables: list[RenderableType] = [models_table(data.get("models", []))]
    if data.get("replays"):
        tables.append(replays_table(data["replays"]))
    return Group(*tables)


def models(url: UrlOpt = DEFAULT_URL, admin_key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """Show every model per backend: installed, loaded on GPU, partly or on CPU, and its VRAM;
    then the fleet-wide pulls, deletes and copies a backend missed and will get again."""
    data = call(url, admin_key, "GET", f"{API}/models")
    show(data, as_json, _report)


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
    data = call(url, admin_key, "POST", path, body, timeout_s=900.0)
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
