"""``corral init``: a config and one Ollama env file per GPU of this host, plus the next steps.

For each chosen GPU N it writes ``ollama-N.env`` (read by ``ollama@N.service``: the port and the
GPU's UUID) and one ``[[backends]]`` entry in ``corral.toml`` pointing at that port. Nothing is
overwritten without ``--force``, and nothing at all is written when any target already exists.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from corral.config import ServerSettings
from corral.fleet.gpu import GpuReading, detect_local_gpus

GIB = 1024**3
MAX_CONCURRENT = 4  # per backend; OLLAMA_NUM_PARALLEL in its env file matches it
CORRAL_PORT = 11434
# Where the unit files look; they are fixed paths in deploy/systemd/*.service.
SYSTEM_DIR = Path("/etc/corral")
STATE_FILE = "/var/lib/corral/state.json"  # corral.service's StateDirectory
UNITS = ("ollama@.service", "corral.service")
OLLAMA_INSTALL = "curl -fsSL https://ollama.com/install.sh | sh"


@dataclass(frozen=True)
class HostFacts:
    """What the next steps depend on, read from this host (tests pass their own)."""

    ollama_installed: bool  # /usr/local/bin/ollama, where ollama@.service runs it
    ollama_unit: bool  # Ollama's installer's own ollama.service, which holds :11434
    corral_installed: bool  # /usr/local/bin/corral, where corral.service runs it
    corral_exe: str | None  # the corral on PATH, to link there
    units_dir: Path | None  # deploy/systemd of the checkout corral runs from


def probe_host() -> HostFacts:
    """This host's facts."""
    checkout = Path(__file__).resolve().parents[3] / "deploy" / "systemd"
    return HostFacts(
        ollama_installed=Path("/usr/local/bin/ollama").exists(),
        ollama_unit=Path("/etc/systemd/system/ollama.service").exists(),
        corral_installed=Path("/usr/local/bin/corral").exists(),
        corral_exe=shutil.which("corral"),
        units_dir=checkout if all((checkout / u).is_file() for u in UNITS) else None,
    )


@dataclass(frozen=True)
class Gpu:
    """One chosen GPU and the Ollama that will serve it."""

    index: int
    port: int
    reading: GpuReading | None  # None: written by index without NVML

    @property
    def backend_id(self) -> str:
        return f"gpu{self.index}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env_name(self) -> str:
        return f"ollama-{self.index}.env"

    def describe(self) -> str:
        """``NVIDIA H100 80GB HBM3, 79.6 GiB, GPU-2cf1...``, or why there is nothing to say."""
        r = self.reading
        if r is None:
            return "not detected (NVML was unavailable when this was written)"
        parts = [r.name]
        if r.memory_total_bytes is not None:
            parts.append(f"{r.memory_total_bytes / GIB:.1f} GiB")
        parts.append(r.uuid)
        return ", ".join(parts)

    def to_json(self) -> dict[str, Any]:
        r = self.reading
        return {
            "id": self.backend_id,
            "url": self.url,
            "gpu": self.index,
            "port": self.port,
            "env_file": self.env_name,
            "name": r.name if r else None,
            "uuid": r.uuid if r else None,
            "memory_total_bytes": r.memory_total_bytes if r else None,
        }


class InitError(Exception):
    """A problem ``corral init`` reports in one line and exits on."""

    def __init__(self, message: str, code: int, hint: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.hint = hint


def parse_gpus(spec: str) -> list[int] | None:
    """``all`` -> None; ``0,1`` -> [0, 1] (sorted); else InitError (exit 2)."""
    if spec.strip().lower() == "all":
        return None
    items = [item.strip() for item in spec.split(",")]
    if not all(item.isdecimal() for item in items):
        raise InitError(f"--gpus: expected 'all' or GPU indexes like 0,1, got {spec!r}", 2)
    indexes = [int(item) for item in items]
    if len(set(indexes)) != len(indexes):
        raise InitError(f"--gpus: an index appears twice in {spec!r}", 2)
    return sorted(indexes)


def choose_gpus(wanted: list[int] | None, base_port: int) -> tuple[list[Gpu], list[str]]:
    """The GPUs to write for, and warnings; InitError when there are none or one is missing."""
    readings, reason = detect_local_gpus()
    warnings: list[str] = []
    if wanted is None:
        if not readings:
            raise InitError(
                f"no GPU found: {reason}",
                1,
                "pass the indexes, e.g. --gpus 0,1, to write a config anyway",
            )
        chosen: list[GpuReading | None] = list(readings)
        indexes = [r.index for r in readings]
    elif readings:
        by_index = {r.index: r for r in readings}
        missing = [i for i in wanted if i not in by_index]
        if missing:
            found = ", ".join(str(i) for i in sorted(by_index))
            names = ", ".join(str(i) for i in missing)
            raise InitError(f"no GPU {names} on this host (NVML found GPU {found})", 2)
        chosen, indexes = [by_index[i] for i in wanted], wanted
    else:
        warnings.append(
            f"warning: cannot read this host's GPUs ({reason}); writing by index, "
            "CUDA_VISIBLE_DEVICES=<index> (a UUID would be safer: nvidia-smi -L)"
        )
        chosen, indexes = [None] * len(wanted), wanted
    last = base_port + len(indexes) - 1
    if last > 65535:
        raise InitError(f"--base-port {base_port}: {len(indexes)} GPUs need ports up to {last}", 2)
    if base_port <= CORRAL_PORT <= last:
        raise InitError(
            f"--base-port {base_port}: ports {base_port}-{last} include corral's {CORRAL_PORT}", 2
        )
    gpus = [
        Gpu(index, base_port + pos, reading)
        for pos, (index, reading) in enumerate(zip(indexes, chosen, strict=True))
    ]
    return gpus, warnings


def _q(value: str) -> str:
    return json.dumps(value)  # a JSON string is a TOML basic string


def render_config(gpus: list[Gpu], host: str, directory: Path = SYSTEM_DIR) -> str:
    """corral.toml for these GPUs, to be read from ``directory``: installed in /etc/corral it
    keeps its state where corral.service's StateDirectory is; anywhere else beside itself."""
    state = STATE_FILE if directory == SYSTEM_DIR else str(directory.resolve() / "state.json")
    where = "corral.service's StateDirectory" if directory == SYSTEM_DIR else "beside this file"
    drain = ServerSettings().drain_timeout_s
    lines = [
        "# corral configuration, written by `corral init` for this host's GPUs.",
        "# Every key with its default: config.example.toml in corral's repository.",
        "# Check it with: corral check-config /etc/corral/corral.toml",
        "",
        "[server]",
        f"host = {_q(host)}",
        f"port = {CORRAL_PORT}",
        f"drain_timeout_s = {drain:g}  # keep below TimeoutStopSec= in corral.service",
        f"state_file = {_q(state)}  # {where}",
        "",
        "[balancer]",
        'strategy = "least_connections"',
        "model_affinity = true",
        "",
        "[gpu]",
        "enabled = true",
        "",
        "# One backend per GPU: ollama@N.service, configured by ollama-N.env.",
        "# max_concurrent matches OLLAMA_NUM_PARALLEL there.",
    ]
    for gpu in gpus:
        lines += [
            "",
            f"# GPU {gpu.index}: {gpu.describe()}",
            "[[backends]]",
            f"id = {_q(gpu.backend_id)}",
            f"url = {_q(gpu.url)}",
            f"gpu = {gpu.index}",
            f"max_concurrent = {MAX_CONCURRENT}",
        ]
    return "\n".join(lines) + "\n"


def render_env(gpu: Gpu) -> str:
    """ollama-N.env. systemd reads whole lines: comments stay on lines of their own."""
    lines = [
        f"# Ollama for GPU {gpu.index}: {gpu.describe()}",
        f'# Read by ollama@{gpu.index}.service; backend "{gpu.backend_id}" in corral.toml.',
        f"OLLAMA_HOST=127.0.0.1:{gpu.port}",
    ]
    if gpu.reading is not None:
        lines += [
            "# The GPU by UUID: it names the same card even if the indexes shift.",
            f"CUDA_VISIBLE_DEVICES={gpu.reading.uuid}",
        ]
    else:
        lines += [
            "# The GPU by index, numbered as nvidia-smi does. A UUID names the same card even if",
            "# the indexes shift: nvidia-smi -L lists them.",
            "CUDA_DEVICE_ORDER=PCI_BUS_ID",
            f"CUDA_VISIBLE_DEVICES={gpu.index}",
        ]
    lines += [
        "# Requests each model serves at once (Ollama's default: 1). It equals max_concurrent",
        f'# of "{gpu.backend_id}" in corral.toml, so what corral sends runs at once instead of',
        "# queueing inside Ollama. Each slot holds its own context: VRAM use grows with it.",
        f"OLLAMA_NUM_PARALLEL={MAX_CONCURRENT}",
        "# Ollama's default model store, shared by every GPU; uncomment to move it.",
        "# OLLAMA_MODELS=/usr/share/ollama/.ollama/models",
    ]
    return "\n".join(lines) + "\n"


def next_steps(
    gpus: list[Gpu], written: list[Path], directory: Path, facts: HostFacts
) -> list[str]:
    """The commands, as root, that turn the files into running services."""
    commands: list[str] = []
    if not facts.ollama_installed:
        commands.append(OLLAMA_INSTALL)
    if facts.ollama_unit or not facts.ollama_installed:
        # Ollama's installer enables its own ollama.service on corral's port.
        commands.append("systemctl disable --now ollama")
    if directory.absolute() != SYSTEM_DIR:
        files = " ".join(str(p) for p in written)
        commands.append(f"install -D -m 644 -t {SYSTEM_DIR} {files}")
    if not facts.corral_installed and facts.corral_exe and not _hidden(facts.corral_exe):
        commands.append(f"ln -s {facts.corral_exe} /usr/local/bin/corral")
    commands.append(
        "id -u corral >/dev/null 2>&1 || "
        "useradd --system --user-group --no-create-home --shell /usr/sbin/nologin corral"
    )
    units_dir = facts.units_dir or Path("deploy/systemd")
    units = " ".join(str(units_dir / unit) for unit in UNITS)
    commands += [
        f"cp {units} /etc/systemd/system/",
        "systemctl daemon-reload",
        "systemctl enable --now " + " ".join(f"ollama@{gpu.index}" for gpu in gpus),
        "systemctl enable --now corral",
    ]
    return commands


def _hidden(path: str | None) -> bool:
    """True for a path corral.service cannot see (ProtectHome=yes)."""
    return path is not None and path.startswith(("/home/", "/root/", "/run/user/"))


def _write(path: Path, text: str) -> None:
    """Replace ``path`` atomically (a reader never sees half a file), mode 0644."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def write_files(directory: Path, files: dict[str, str], force: bool) -> list[Path]:
    """Write every file or none; InitError (exit 1) when one exists and not ``force``."""
    targets = {directory / name: text for name, text in files.items()}
    odd = [str(path) for path in targets if path.exists() and not path.is_file()]
    if odd:
        raise InitError(f"{', '.join(odd)}: not a regular file; remove it first", 1)
    existing = [str(path) for path in targets if path.exists() or path.is_symlink()]
    if existing and not force:
        verb = "exists" if len(existing) == 1 else "exist"
        raise InitError(f"{', '.join(existing)} already {verb}; pass --force to overwrite", 1)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InitError(f"cannot create {directory}: {exc.strerror or exc}", 1) from None
    if not os.access(directory, os.W_OK):
        raise InitError(f"cannot write to {directory}: permission denied (run as root?)", 1)
    for path, text in targets.items():
        try:
            _write(path, text)
        except OSError as exc:
            raise InitError(f"cannot write {path}: {exc.strerror or exc}", 1) from None
    return list(targets)


@dataclass(frozen=True)
class InitResult:
    """What ``corral init`` wrote and what is left to do."""

    gpus: list[Gpu]
    files: list[Path]
    commands: list[str]
    warnings: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "files": [str(path) for path in self.files],
            "backends": [gpu.to_json() for gpu in self.gpus],
            "commands": self.commands,
        }


def run_init(
    gpus_spec: str, base_port: int, directory: Path, host: str, force: bool, facts: HostFacts
) -> InitResult:
    """Detect, write, plan; InitError on a problem (then nothing was written)."""
    gpus, warnings = choose_gpus(parse_gpus(gpus_spec), base_port)
    files = {"corral.toml": render_config(gpus, host, directory)}
    files.update({gpu.env_name: render_env(gpu) for gpu in gpus})
    written = write_files(directory, files, force)
    if not facts.corral_installed and _hidden(facts.corral_exe):
        warnings.append(
            f"warning: corral.service cannot run {facts.corral_exe} (ProtectHome=yes hides /home "
            "and /root): install corral elsewhere, e.g. a venv in /opt/corral, and link it to "
            "/usr/local/bin/corral"
        )
    return InitResult(gpus, written, next_steps(gpus, written, directory, facts), warnings)


def _print_result(result: InitResult, facts: HostFacts) -> None:
    for path in result.files:
        typer.echo(f"wrote {path}")
    typer.echo("")
    for gpu in result.gpus:
        typer.echo(f"  {gpu.backend_id}  {gpu.url}  ollama@{gpu.index}  {gpu.describe()}")
    typer.echo("")
    where = "" if facts.units_dir else " (in a corral checkout: the unit files ship in it)"
    typer.echo(f"Next, as root{where}:")
    for command in result.commands:
        typer.echo(f"  {command}")
    typer.echo("Then `corral status` shows one backend per GPU.")


def init_command(
    gpus: Annotated[
        str, typer.Option(help="GPUs to serve: 'all' (found through NVML) or indexes, e.g. 0,1.")
    ] = "all",
    base_port: Annotated[
        int, typer.Option(min=1, max=65535, help="Port of the first GPU's Ollama; then +1 each.")
    ] = 11435,
    directory: Annotated[
        Path, typer.Option("--dir", help="Where to write corral.toml and ollama-N.env.")
    ] = SYSTEM_DIR,
    host: Annotated[str, typer.Option(help="Address corral listens on (server.host).")] = (
        "127.0.0.1"
    ),
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing files.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Write a config and per-GPU Ollama env files for this host's GPUs; print the next steps."""
    facts = probe_host()
    try:
        result = run_init(gpus, base_port, directory, host, force, facts)
    except InitError as exc:
        typer.echo(f"error: {exc}", err=True)
        if exc.hint:
            typer.echo(f"hint: {exc.hint}", err=True)
        raise typer.Exit(exc.code) from None
    for line in result.warnings:
        typer.echo(line, err=True)
    if as_json:
        typer.echo(json.dumps(result.to_json(), indent=2))
    else:
        _print_result(result, facts)
