"""What the client commands print: the consoles, ``--json`` or a rich table, and the cell
formats the tables share (durations, GiB, percentages, health, a backend's GPU)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.console import Console, RenderableType
from rich.markup import escape
from rich.table import Table

console = Console()
err = Console(stderr=True)

JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def say(text: str) -> None:
    """One line on stdout, as given (no highlighting, no wrapping)."""
    console.print(text, highlight=False, soft_wrap=True)


def show(data: Any, as_json: bool, table: Callable[[Any], RenderableType]) -> None:
    """Print an admin API answer: as JSON for scripts, else as ``table(data)``."""
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        console.print(table(data))


def fmt_s(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def age(seconds: float) -> str:
    """How long ago, in the largest unit that reads well: ``40 s``, ``12 min``, ``3.5 h``."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def num(value: float) -> str:
    return f"{round(value, 2):g}"


def gib(value: float | None) -> str:
    return "-" if value is None else f"{value / 1024**3:.1f}"


def size(value: float | None) -> str:
    """A model's size: GiB from 1 GiB up (one decimal), MiB below (a 45 MB embedding model is
    ``43 MiB``, not ``0.0 GiB``), "-" when unknown."""
    if value is None:
        return "-"
    if 0 < value < 1024**3:
        return f"{value / 1024**2:.0f} MiB"
    return f"{gib(value)} GiB"


def vram(used: float | None, total: float | None) -> str:
    if used is None and total is None:
        return "-"
    return f"{gib(used)}/{gib(total)} GiB"


def pct(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio * 100:.0f}%"


def temp(value: float | None, hot: bool = False) -> str:
    if value is None:
        return "-"
    text = f"{value:.0f}°C"
    return f"[red]{text} hot[/red]" if hot else text


def short_gpu_name(name: str | None) -> str:
    return "-" if not name else name.removeprefix("NVIDIA ")


def health(e: dict[str, Any]) -> str:
    """A backend's state as one coloured word: down, draining, ejected or up."""
    if not e.get("healthy"):
        return "[red]down[/red]"
    if e.get("draining"):
        return "[yellow]draining[/yellow]"
    if e.get("ejected"):
        return "[red]ejected[/red]"
    return "[green]up[/green]"


def gpu_cell(g: dict[str, Any] | None) -> str:
    """A backend's GPU in one cell: short name, utilization, VRAM used/total, temperature."""
    if not g:
        return "-"
    if g.get("source") == "ollama":  # no GPU reading: only the VRAM /api/ps reports
        return f"(from /api/ps) {gib(g.get('memory_used_bytes'))} GiB used"
    parts = [escape(short_gpu_name(g.get("name")))]
    if g.get("utilization_ratio") is not None:
        parts.append(pct(g["utilization_ratio"]))
    if g.get("memory_used_bytes") is not None or g.get("memory_total_bytes") is not None:
        parts.append(vram(g.get("memory_used_bytes"), g.get("memory_total_bytes")))
    if g.get("temperature_c") is not None:
        parts.append(temp(g["temperature_c"], bool(g.get("hot"))))
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
            gpu_cell(e.get("gpu_stats")),
            health(e),
            f"{e.get('active_connections', 0)}/{e.get('max_concurrent', '?')}",
            str(e.get("total_connections", 0)),
            fmt_s(e.get("avg_response_time")),
            num(e.get("weight") or 1.0),
        ]
        if wide:
            row.append(escape(str(e.get("url", ""))))
        table.add_row(*row)
    return table
