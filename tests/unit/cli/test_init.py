"""``corral init``: a loadable config and per-GPU Ollama env files, or one clear error."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from corral.cli import init as init_cmd
from corral.cli.init import HostFacts, init_command, next_steps, render_config
from corral.config import load_config
from corral.fleet.gpu import GpuReading
from tests.helpers import REPO_ROOT

REPO_UNITS = REPO_ROOT / "deploy" / "systemd"

# Real NVML readings of one H100 (nvidia-ml-py, driver 580.159.04); the second GPU is its twin.
H100 = "NVIDIA H100 80GB HBM3"
H100_BYTES = 85520809984
UUID0 = "GPU-2cf195f2-a99e-0939-bb4a-1957b50aedad"
UUID1 = "GPU-7d3a1c52-40be-58a4-0e1f-8b2c6a90f31e"
TWO_GPUS = [
    GpuReading(0, UUID0, H100, memory_total_bytes=H100_BYTES, memory_used_bytes=503316480),
    GpuReading(1, UUID1, H100, memory_total_bytes=H100_BYTES, memory_used_bytes=503316480),
]
NO_NVML = "NVML is not available: NVML Shared Library Not Found"

INSTALLED = HostFacts(
    ollama_installed=True,
    ollama_unit=False,
    corral_installed=True,
    corral_exe="/usr/local/bin/corral",
    units_dir=REPO_UNITS,
)

app = typer.Typer()
app.command("init")(init_command)


@app.callback()
def _group() -> None:
    """Keep `init` a subcommand, as in corral's own app."""


runner = CliRunner()


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch) -> list[HostFacts]:
    """This host as the tests say it is (Ollama and corral installed); replace [0] to change."""
    facts = [INSTALLED]
    monkeypatch.setattr(init_cmd, "probe_host", lambda: facts[0])
    return facts


def gpus_found(monkeypatch: pytest.MonkeyPatch, readings: list[GpuReading]) -> None:
    monkeypatch.setattr(init_cmd, "detect_local_gpus", lambda: (readings, None))


def no_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(init_cmd, "detect_local_gpus", lambda: ([], NO_NVML))


def env_file(path: Path) -> dict[str, str]:
    """Variables as systemd's EnvironmentFile= reads them: whole lines, # comments."""
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith(("#", ";")):
            key, _, value = line.partition("=")
            values[key] = value
    return values


def init(tmp_path: Path, *args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["init", "--dir", str(tmp_path), *args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.stdout, result.stderr


def test_two_gpus_make_a_config_corral_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host: list[HostFacts]
) -> None:
    """Each GPU is a backend gpuN on consecutive ports from 11435; the config loads."""
    gpus_found(monkeypatch, TWO_GPUS)
    code, _, err = init(tmp_path)
    assert (code, err) == (0, "")
    settings = load_config(tmp_path / "corral.toml", env={})
    assert [(b.id, b.url, b.gpu, b.max_concurrent) for b in settings.backends] == [
        ("gpu0", "http://127.0.0.1:11435", 0, 4),
        ("gpu1", "http://127.0.0.1:11436", 1, 4),
    ]
    assert (settings.server.host, settings.server.port) == ("127.0.0.1", 11434)
    # Written elsewhere than /etc/corral, the state stays beside the config (a user running
    # corral from ./etc cannot write /var/lib); installed, it is corral.service's.
    assert settings.server.state_file == tmp_path.resolve() / "state.json"
    assert 'state_file = "/var/lib/corral/state.json"' in render_config([], "127.0.0.1")
    assert settings.gpu.enabled
    text = (tmp_path / "corral.toml").read_text()
    assert f"# GPU 0: {H100}, 79.6 GiB, {UUID0}" in text
    assert f"# GPU 1: {H100}, 79.6 GiB, {UUID1}" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "corral.toml",
        "ollama-0.env",
        "ollama-1.env",
    ]


def test_env_files_pin_each_ollama_to_its_port_and_gpu_uuid(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host: list[HostFacts]
) -> None:
    """ollama-N.env: the backend's port, the GPU by UUID, parallel slots = max_concurrent."""
    gpus_found(monkeypatch, TWO_GPUS)
    assert init(tmp_path)[0] == 0
    settings = load_config(tmp_path / "corral.toml", env={})
    for backend, uuid in zip(settings.backends, (UUID0, UUID1), strict=True):
        env = env_file(tmp_path / f"ollama-{backend.gpu}.env")
        port = backend.url.rsplit(":", 1)[1]
        assert env == {
            "OLLAMA_HOST": f"127.0.0.1:{port}",
            "CUDA_VISIBLE_DEVICES": uuid,
            "OLLAMA_NUM_PARALLEL": str(backend.max_concurrent),
        }
    assert "# OLLAMA_MODELS=" in (tmp_path / "ollama-0.env").read_text()


def test_next_steps_install_the_units_and_start_every_gpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host: list[HostFacts]
) -> None:
    """It says what it wrote, then the commands: copy units, reload, enable each GPU, corral."""
    gpus_found(monkeypatch, TWO_GPUS)
    _, out, _ = init(tmp_path)
    lines = [line.strip() for line in out.splitlines()]
    for name in ("corral.toml", "ollama-0.env", "ollama-1.env"):
        assert f"wrote {tmp_path / name}" in lines
    units = f"{REPO_UNITS}/ollama@.service {REPO_UNITS}/corral.service"
    steps = [
        f"cp {units} /etc/systemd/system/",
        "systemctl daemon-reload",
        "systemctl enable --now ollama@0 ollama@1",
        "systemctl enable --now corral",
    ]
    start = lines.index(steps[0])
    assert lines[start : start + 4] == steps
    # --dir is not /etc/corral, where the units read: the files go there first.
    files = " ".join(str(tmp_path / n) for n in ("corral.toml", "ollama-0.env", "ollama-1.env"))
    assert f"install -D -m 644 -t /etc/corral {files}" in lines[:start]
    assert not any("ollama.com/install.sh" in line or "disable" in line for line in lines)


def test_json_lists_files_backends_and_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host: list[HostFacts]
) -> None:
    """--json: the same facts for scripts, commands identical to the printed ones."""
    gpus_found(monkeypatch, TWO_GPUS)
    code, out, _ = init(tmp_path, "--json")
    assert code == 0
    report = json.loads(out)
    assert report["files"] == [
        str(tmp_path / n) for n in ("corral.toml", "ollama-0.env", "ollama-1.env")
    ]
    assert report["backends"][1] == {
        "id": "gpu1",
        "url": "http://127.0.0.1:11436",
        "gpu": 1,
        "port": 11436,
        "env_file": "ollama-1.env",
        "name": H100,
        "uuid": UUID1,
        "memory_total_bytes": H100_BYTES,
    }
    printed = init(tmp_path, "--force")[1]
    assert all(f"  {command}" in printed.splitlines() for command in report["commands"])


def test_options_choose_gpus_ports_and_listen_address(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host: list[HostFacts]
) -> None:
    """--gpus 1 --base-port 12000 --host 0.0.0.0: one backend gpu1 on 12000."""
    gpus_found(monkeypatch, TWO_GPUS)
    code, out, _ = init(tmp_path, "--gpus", "1", "--base-port", "12000", "--host", "0.0.0.0")
    assert code == 0
    settings = load_config(tmp_path / "corral.toml", env={})
    assert settings.server.host == "0.0.0.0"
    assert [(b.id, b.url, b.gpu) for b in settings.backends] == [
        ("gpu1", "http://127.0.0.1:12000", 1)
    ]
    assert env_file(tmp_path / "ollama-1.env")["CUDA_VISIBLE_DEVICES"] == UUID1
    assert "systemctl enable --now ollama@1" in out
    assert not (tmp_path / "ollama-0.env").exists()


def test_no_gpu_found_is_one_line_and_a_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host: list[HostFacts]
) -> None:
    """--gpus all without NVML: the reason, how to write anyway, exit 1, nothing written."""
    no_nvml(monkeypatch)
    target = tmp_path / "etc"
    code, out, err = init(target)
    assert code == 1
    assert out == ""
    assert err.splitlines() == [
        f"error: no GPU found: {NO_NVML}",
        "hint: pass the indexes, e.g. --gpus 0,1, to write a config anyway",
    ]
    assert not target.exists()


def test_without_nvml_explicit_gpus_are_written_by_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host: list[HostFacts]
) -> None:
    """--gpus 0,1 without NVML: written anyway with CUDA_VISIBLE_DEVICES=<index>, a warning."""
    no_nvml(monkeypatch)
    code, _, err = init(tmp_path, "--gpus", "0,1")
    assert code == 0
    [warning] = err.splitlines()
    assert warning.startswith("warning: cannot read this host's GPUs")
    assert NO_NVML in warning
    assert len(load_config(tmp_path / "corral.toml", env={}).backends) == 2
    assert env_file(tmp_path / "ollama-1.env") == {
        "OLLAMA_HOST": "127.0.0.1:11436",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "CUDA_VISIBLE_DEVICES": "1",
        "OLLAMA_NUM_PARALLEL": "4",
    }
    assert "# GPU 1: not detected" in (tmp_path / "corral.toml").read_text()


def test_a_gpu_this_host_lacks_is_a_usage_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host: list[HostFacts]
) -> None:
    """--gpus 5 with GPUs 0 and 1: exit 2, naming what exists; nothing written."""
    gpus_found(monkeypatch, TWO_GPUS)
    code, _, err = init(tmp_path, "--gpus", "1,5")
    assert code == 2
    assert err == "error: no GPU 5 on this host (NVML found GPU 0, 1)\n"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("spec", ["x", "0,,1", "1,1", "-1", "", "0;1"])
def test_malformed_gpus_is_a_usage_error(
    spec: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host: list[HostFacts]
) -> None:
    """--gpus takes 'all' or distinct indexes: anything else exits 2 with one line."""
    gpus_found(monkeypatch, TWO_GPUS)
    code, _, err = init(tmp_path, "--gpus", spec)
    assert code == 2
    assert err.startswith("error: --gpus: ")
    assert len(err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("base_port", "reason"), [("11433", "include corral's 11434"), ("65535", "ports up to 65536")]
)
def test_ports_must_fit_and_miss_corral(
    base_port: str,
    reason: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    host: list[HostFacts],
) -> None:
    """Backend ports may not cover corral's own port nor run past 65535."""
    gpus_found(monkeypatch, TWO_GPUS)
    code, _, err = init(tmp_path, "--base-port", base_port)
    assert code == 2
    assert reason in err


def test_existing_files_are_kept_without_force(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host: list[HostFacts]
) -> None:
    """One existing target: exit 1 naming it, no file written or changed; --force rewrites."""
    gpus_found(monkeypatch, TWO_GPUS)
    (tmp_path / "ollama-1.env").write_text("OLLAMA_HOST=127.0.0.1:9999\n")
    code, out, err = init(tmp_path)
    assert code == 1
    assert out == ""
    assert err == (
        f"error: {tmp_path / 'ollama-1.env'} already exists; pass --force to overwrite\n"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["ollama-1.env"]
    assert env_file(tmp_path / "ollama-1.env") == {"OLLAMA_HOST": "127.0.0.1:9999"}

    assert init(tmp_path, "--force")[0] == 0
    assert env_file(tmp_path / "ollama-1.env")["OLLAMA_HOST"] == "127.0.0.1:11436"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "corral.toml",
        "ollama-0.env",
        "ollama-1.env",
    ]


def test_a_directory_that_cannot_be_made_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host: list[HostFacts]
) -> None:
    """--dir under a regular file: one error line, exit 1, no traceback."""
    gpus_found(monkeypatch, TWO_GPUS)
    (tmp_path / "file").write_text("")
    code, out, err = init(tmp_path / "file" / "corral")
    assert code == 1
    assert out == ""
    assert err == f"error: cannot create {tmp_path / 'file' / 'corral'}: Not a directory\n"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to a read-only directory")
def test_a_read_only_directory_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host: list[HostFacts]
) -> None:
    """--dir without write permission: one error line, exit 1, nothing written."""
    gpus_found(monkeypatch, TWO_GPUS)
    target = tmp_path / "ro"
    target.mkdir(mode=0o555)
    try:
        code, _, err = init(target)
    finally:
        target.chmod(0o755)
    assert code == 1
    assert err.startswith(f"error: cannot write to {target}")
    assert list(target.iterdir()) == []


def test_an_unwritable_directory_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host: list[HostFacts]
) -> None:
    """No write permission on --dir (whoever runs the tests): one line, exit 1, nothing written."""
    gpus_found(monkeypatch, TWO_GPUS)
    real_access = os.access

    def access(path: str, mode: int, **kwargs: bool) -> bool:
        if Path(path) == tmp_path and mode & os.W_OK:
            return False
        return real_access(path, mode, **kwargs)

    monkeypatch.setattr(os, "access", access)
    code, _, err = init(tmp_path)
    assert code == 1
    assert err == f"error: cannot write to {tmp_path}: permission denied (run as root?)\n"
    assert list(tmp_path.iterdir()) == []


def test_a_directory_in_place_of_a_file_stops_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host: list[HostFacts]
) -> None:
    """Even with --force, a target that is a directory is reported before anything is written."""
    gpus_found(monkeypatch, TWO_GPUS)
    (tmp_path / "ollama-1.env").mkdir()
    code, _, err = init(tmp_path, "--force")
    assert code == 1
    assert err == f"error: {tmp_path / 'ollama-1.env'}: not a regular file; remove it first\n"
    assert [p.name for p in tmp_path.iterdir()] == ["ollama-1.env"]


def test_a_fresh_host_is_told_to_install_ollama_and_corral(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host: list[HostFacts]
) -> None:
    """No Ollama yet: install it, then free :11434 from its own unit; link corral in place."""
    gpus_found(monkeypatch, TWO_GPUS)
    host[0] = HostFacts(
        ollama_installed=False,
        ollama_unit=False,
        corral_installed=False,
        corral_exe="/opt/corral/bin/corral",
        units_dir=None,
    )
    code, out, err = init(tmp_path)
    assert (code, err) == (0, "")
    lines = [line.strip() for line in out.splitlines()]
    first = lines.index("curl -fsSL https://ollama.com/install.sh | sh")
    assert lines[first + 1] == "systemctl disable --now ollama"
    assert "ln -s /opt/corral/bin/corral /usr/local/bin/corral" in lines
    # Not run from a checkout: the unit files are named relative to one.
    units = "deploy/systemd/ollama@.service deploy/systemd/corral.service"
    assert f"cp {units} /etc/systemd/system/" in lines
    assert "Next, as root (in a corral checkout: the unit files ship in it):" in lines


def test_corral_in_a_home_directory_gets_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, host: list[HostFacts]
) -> None:
    """corral.service hides /home: a corral installed there is flagged, not linked."""
    gpus_found(monkeypatch, TWO_GPUS)
    host[0] = HostFacts(
        ollama_installed=True,
        ollama_unit=True,
        corral_installed=False,
        corral_exe="/home/ada/corral/.venv/bin/corral",
        units_dir=REPO_UNITS,
    )
    code, out, err = init(tmp_path)
    assert code == 0
    assert "ProtectHome=yes" in err
    assert "ln -s" not in out
    assert "  systemctl disable --now ollama" in out.splitlines()


def test_writing_straight_to_etc_corral_needs_no_copy() -> None:
    """With --dir /etc/corral the files are already where the units read them."""
    gpu = init_cmd.Gpu(0, 11435, TWO_GPUS[0])
    written = [Path("/etc/corral/corral.toml"), Path("/etc/corral/ollama-0.env")]
    commands = next_steps([gpu], written, Path("/etc/corral"), INSTALLED)
    assert not any(command.startswith("install ") for command in commands)
    assert commands[-1] == "systemctl enable --now corral"


def test_probe_host_finds_the_units_of_this_checkout() -> None:
    """Run from the repository, the cp step names its deploy/systemd by absolute path."""
    assert init_cmd.probe_host().units_dir == REPO_UNITS
