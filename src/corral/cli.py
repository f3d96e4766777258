"""The ``corral`` command line (typer)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import httpx
import typer
from rich.console import Console
from rich.table import Table

from corral import __version__
from corral.config import Settings, load_config
from corral.errors import ConfigError

app = typer.Typer(
    name="corral",
    help="corral: an Ollama-compatible load balancer for GPU fleets.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err = Console(stderr=True)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML config file.", envvar="CORRAL_CONFIG")
]
UrlOpt = Annotated[str, typer.Option("--url", envvar="CORRAL_URL", help="URL of a running corral.")]
KeyOpt = Annotated[
    str | None,
    typer.Option("--admin-key", envvar="CORRAL_ADMIN_KEY", help="Admin key.", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
DEFAULT_URL = "http://127.0.0.1:11434"


def _load(config: Path | None, overrides: dict[str, Any] | None = None) -> Settings:
    try:
        return load_config(config, overrides=overrides)
    except ConfigError as exc:
        for line in exc.problems:
            err.print(f"config error: {line}", markup=False, highlight=False)
        raise typer.Exit(2) from None


@app.callback(invoke_without_command=True)
def _main(
    version: Annotated[bool, typer.Option("--version", help="Print the version.")] = False,
) -> None:
    if version:
        console.print(f"corral {__version__}")
        raise typer.Exit(0)


@app.command()
def serve(
    config: ConfigOpt = None,
    host: Annotated[str | None, typer.Option(help="Bind address (server.host).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (server.port).")] = None,
    strategy: Annotated[str | None, typer.Option(help="Strategy (balancer.strategy).")] = None,
) -> None:
    """Run corral in front of the backends of the config."""
    overrides: dict[str, Any] = {}
    server: dict[str, Any] = {}
    if host is not None:
        server["host"] = host
    if port is not None:
        server["port"] = port
    if server:
        overrides["server"] = server
    if strategy is not None:
        overrides["balancer"] = {"strategy": strategy}
    settings = _load(config, overrides)
    from corral.server import run_server

    if not settings.backends:
        err.print("warning: no [[backends]] configured; add some or POST them to the admin API")
    run_server(settings)


@app.command("check-config")
def check_config(
    file: Annotated[Path, typer.Argument(help="The TOML file to validate.")],
) -> None:
    """Validate a config file without starting; exit 2 with one line per problem."""
    settings = _load(file)
    console.print(
        f"ok: {len(settings.backends)} backend(s), strategy {settings.balancer.strategy}, "
        f"listening on {settings.server.host}:{settings.server.port}",
        highlight=False,
    )


@app.command()
def demo(
    port: Annotated[int, typer.Option(help="Port for corral.")] = 11434,
    strategy: Annotated[str, typer.Option(help="Strategy.")] = "least_connections",
) -> None:
    """Run corral in front of two simulated GPUs (a fast one and a slow one)."""
    from corral.demo import run_demo

    run_demo(port=port, strategy=strategy)


def _register_sim() -> None:
    from corral.sim.cli import sim_command

    app.command("sim", help="Run a simulated Ollama server (one simulated GPU).")(sim_command)


_register_sim()


def _register_init() -> None:
    from corral.init_cmd import init_command

    app.command("init", help="Write a corral config and one Ollama service per GPU of this host.")(
        init_command
    )


_register_init()


# Client commands ---------------------------------------------------------------------------


def _client(url: str, key: str | None, timeout_s: float = 10.0) -> httpx.Client:
    headers = {"X-API-Key": key} if key else {}
    return httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)


def _call(
    url: str, key: str | None, method: str, path: str, body: Any = None, timeout_s: float = 10.0
) -> Any:
    try:
        with _client(url, key, timeout_s) as client:
            resp = client.request(method, path, json=body)
    except httpx.HTTPError as exc:
        err.print(f"error: cannot reach corral at {url}: {exc}", markup=False)
        raise typer.Exit(1) from None
    if resp.status_code >= 400:
        try:
            detail = resp.json().get("detail", resp.text)
        except ValueError:
            detail = resp.text
        if isinstance(detail, list):
            detail = "; ".join(str(d.get("msg", d)) for d in detail)
        err.print(f"error: {resp.status_code}: {detail}", markup=False)
        raise typer.Exit(1)
    return resp.json()


def _show(data: Any, as_json: bool, table: Callable[[Any], Table]) -> None:
    """Print an admin API answer: as JSON for scripts, else as ``table(data)``."""
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        console.print(table(data))


def _fmt_s(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


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


def load_table(data: dict[str, Any], *, wide: bool | None = None) -> Table:
    """The load table ``corral status`` prints (the URL column only on wide terminals)."""
    if wide is None:
        wide = console.width >= 150
    table = Table(title=f"corral: strategy {data.get('strategy')}", title_justify="left")
    table.add_column("backend", no_wrap=True)
    table.add_column("state", no_wrap=True)
    for col in ("in flight", "requests", "failures", "ttft", "avg", "weight"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("gpu", no_wrap=True)
    for col in ("util", "vram", "temp"):
        table.add_column(col, justify="right", no_wrap=True)
    if wide:
        table.add_column("url", no_wrap=True)
    for bid, e in sorted(data.get("loads", {}).items()):
        if not e.get("healthy"):
            state = "[red]down[/red]"
        elif e.get("draining"):
            state = "[yellow]draining[/yellow]"
        elif e.get("ejected"):
            state = "[red]ejected[/red]"
        else:
            state = "[green]up[/green]"
        row = [
            bid,
            state,
            f"{e.get('active_connections', 0)}/{e.get('max_concurrent', '?')}",
            str(e.get("total_connections", 0)),
            str(e.get("failures", 0)),
            _fmt_s(e.get("ttft_ewma_s")),
            _fmt_s(e.get("avg_response_time")),
            f"{e.get('weight', 1.0):g}",
            *_gpu_cells(e.get("gpu_stats")),
        ]
        if wide:
            row.append(str(e.get("url", "")))
        table.add_row(*row)
    return table


def _gpu_cells(g: dict[str, Any] | None) -> list[str]:
    if not g:
        return ["-", "-", "-", "-"]
    return [
        _short_gpu_name(g.get("name")) if g.get("source") != "ollama" else "(from /api/ps)",
        _pct(g.get("utilization_ratio")),
        _vram(g.get("memory_used_bytes"), g.get("memory_total_bytes")),
        _temp(g.get("temperature_c"), bool(g.get("hot"))),
    ]


def gpu_table(gpus: list[dict[str, Any]], title: str) -> Table:
    """The table ``corral gpus`` prints: one row per GPU."""
    table = Table(title=title, title_justify="left")
    table.add_column("gpu", justify="right", no_wrap=True)
    table.add_column("name", no_wrap=True)
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
            g.get("name") or "-",
            g.get("uuid") or "-",
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


@app.command()
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
        data = _call(url, admin_key, "GET", "/api/v1/loadbalancer/gpus")
        if as_json:
            print(json.dumps(data, indent=2))
            return
        if not data.get("gpus"):
            err.print("no GPU readings on that corral", markup=False)
            raise typer.Exit(1)
        console.print(gpu_table(data["gpus"], f"GPUs read by corral at {url}"))
        return
    from corral.gpu import detect_local_gpus

    found, reason = detect_local_gpus()
    if as_json:
        print(json.dumps({"gpus": [g.to_json() for g in found], "error": reason}, indent=2))
    elif reason is not None:
        err.print(f"no GPU found: {reason}", markup=False)
    else:
        console.print(gpu_table([g.to_json() for g in found], "GPUs on this host (NVML)"))
    if reason is not None:
        raise typer.Exit(1)


@app.command()
def status(url: UrlOpt = DEFAULT_URL, admin_key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """Show the load table of a running corral."""
    _show(_call(url, admin_key, "GET", "/api/v1/loadbalancer/loads"), as_json, load_table)


@app.command()
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
        data = _call(url, admin_key, "GET", "/api/v1/loadbalancer/strategy")
    else:
        data = _call(url, admin_key, "PUT", "/api/v1/loadbalancer/strategy", {"strategy": name})
    if as_json:
        print(json.dumps(data))
    else:
        console.print(data.get("message") or data["strategy"], highlight=False)


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


@app.command()
def models(url: UrlOpt = DEFAULT_URL, admin_key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """Show every model per backend: installed, loaded on GPU, partly or on CPU, and its VRAM."""
    data = _call(url, admin_key, "GET", "/api/v1/loadbalancer/models")
    _show(data, as_json, lambda d: models_table(d.get("models", [])))


@app.command()
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
    path = f"/api/v1/loadbalancer/models/{quote(model, safe='/:')}/placement"
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


def main() -> None:
    """Console-script entry point."""
    app(prog_name="corral")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())  # type: ignore[func-returns-value]
