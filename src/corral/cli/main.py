"""The ``corral`` command line: the one typer tree, assembled here.

Local commands are defined here (serve, check-config, demo) or next door (``sim``: corral.sim,
``init``: init.py). The client commands talk to a running corral, a module per command group:
status.py, strategy.py, models.py (models, place), backends.py, gpus.py (this host's GPUs, or
a corral's with --url); client.py is their admin API client, render.py what they print."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from corral import __version__
from corral.cli.render import console, err
from corral.config import Settings, load_config
from corral.errors import ConfigError

_type_of: Callable[[Any, Any], str | None] | None = getattr(
    typer.core.TyperOption, "display_type_rich", None
)


def _no_type_for_flags(self: Any, ctx: Any) -> str | None:
    """A flag takes no value: its help row shows no type (typer 0.29 prints ``<bool>``)."""
    return None if self.is_flag or _type_of is None else _type_of(self, ctx)


if _type_of is not None:  # typer versions that show a type column
    typer.core.TyperOption.display_type_rich = _no_type_for_flags  # type: ignore[method-assign]

app = typer.Typer(
    name="corral",
    help="corral: an Ollama-compatible load balancer for GPU fleets.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="TOML config file.", envvar="CORRAL_CONFIG")
]


def _load(config: Path | None, overrides: dict[str, Any] | None = None) -> Settings:
    try:
        return load_config(config, overrides=overrides)
    except ConfigError as exc:
        for line in exc.problems:
            # One line per problem, however narrow the terminal or the pipe.
            err.print(f"config error: {line}", markup=False, highlight=False, soft_wrap=True)
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
    workers: Annotated[
        int,
        typer.Option(
            min=1, help="Processes on one port (SO_REUSEPORT); >1 needs [cluster] redis_url."
        ),
    ] = 1,
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
    url = settings.cluster.redis_url
    if workers > 1 and (url is None or not url.get_secret_value()):
        err.print(
            "error: --workers > 1 needs [cluster] redis_url (workers share slots and state "
            "through Redis)",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(2)
    from corral.server import run_server

    if not settings.backends:
        err.print("warning: no [[backends]] configured; add some or POST them to the admin API")
    run_server(settings, workers)


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
    from corral.cli.demo import run_demo

    run_demo(port=port, strategy=strategy)


def _register_sim() -> None:
    from corral.sim.cli import sim_command

    app.command("sim", help="Run a simulated Ollama server (one simulated GPU).")(sim_command)


_register_sim()


def _register_init() -> None:
    from corral.cli.init import init_command

    app.command("init", help="Write a corral config and one Ollama service per GPU of this host.")(
        init_command
    )


_register_init()


def _register_client_commands() -> None:
    """The commands that talk to a running corral, a module per command group."""
    from corral.cli import backends, gpus, models, status, strategy

    app.command()(gpus.gpus)
    app.command()(status.status)
    app.command()(strategy.strategy)
    app.command()(models.models)
    app.command()(models.place)
    app.add_typer(backends.backends_app, name="backends")


_register_client_commands()


def main() -> None:
    """Console-script entry point."""
    app(prog_name="corral")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())  # type: ignore[func-returns-value]
