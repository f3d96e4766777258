"""deploy/systemd: the units pass ``systemd-analyze verify`` as installed, and agree with corral.

``systemd-analyze verify`` exits 0 on an unknown key or a bad value (it only warns, and systemd
would ignore the line), so a unit counts as verified only when verify prints nothing at all.
It runs on a scratch root (``--root``) that holds the units as ``corral init``'s next steps
install them, the files ``corral init`` writes to /etc/corral, stand-ins for the binaries the
units run (verify checks that ExecStart= is executable) and empty stubs for the targets they
depend on. EnvironmentFile= is only read when a unit starts; verify does not look at it.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from corral.cli import init as init_cmd
from corral.config import ServerSettings
from corral.fleet.gpu import GpuReading
from tests.helpers import REPO_ROOT, require_tool

UNITS_DIR = REPO_ROOT / "deploy" / "systemd"
CORRAL = "corral.service"
OLLAMA = "ollama@.service"
# Units the tested ones pull in or order against (the default dependencies among them).
STUBS = ("sysinit.target", "basic.target", "shutdown.target", "network-online.target")
BINARIES = ("/usr/local/bin/ollama", "/usr/local/bin/corral")


def systemd_analyze() -> str:
    return require_tool("systemd-analyze", "deploy/systemd/*.service cannot be verified", "systemd")


def unit_text(name: str) -> str:
    return (UNITS_DIR / name).read_text()


def directives(name: str) -> dict[str, list[str]]:
    """``Section.Key`` -> every value, in order (keys such as Environment= repeat)."""
    found: dict[str, list[str]] = {}
    section = ""
    for raw in unit_text(name).splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return found


@pytest.fixture
def scratch_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Path]:
    """Build a root holding the units (optionally edited) as installed on a two-GPU host."""

    def build(**replace: str) -> Path:
        root = tmp_path / "root"
        units = root / "etc" / "systemd" / "system"
        units.mkdir(parents=True)
        for name in (CORRAL, OLLAMA):
            (units / name).write_text(replace.get(name, unit_text(name)))
            (units / name).chmod(0o644)
        for stub in STUBS:
            (units / stub).write_text("[Unit]\nDescription=stub for the test\n")
        for binary in BINARIES:
            exe = root / binary.lstrip("/")
            exe.parent.mkdir(parents=True, exist_ok=True)
            exe.write_text("#!/bin/sh\nexit 0\n")
            exe.chmod(0o755)
        readings = [GpuReading(i, f"GPU-0000000{i}-test", "NVIDIA H100 80GB HBM3") for i in (0, 1)]
        monkeypatch.setattr(init_cmd, "detect_local_gpus", lambda: (readings, None))
        facts = init_cmd.HostFacts(True, False, True, None, UNITS_DIR)
        init_cmd.run_init("all", 11435, root / "etc" / "corral", "127.0.0.1", False, facts)
        return root

    return build


def verify(root: Path, *units: str) -> list[str]:
    """Every line ``systemd-analyze verify`` prints about ``units``, plus a failing exit."""
    proc = subprocess.run(
        [systemd_analyze(), "verify", "--man=no", "--generators=no", f"--root={root}", *units],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    problems = (proc.stdout + proc.stderr).splitlines()
    if proc.returncode != 0:
        problems.append(f"systemd-analyze verify exited {proc.returncode}")
    return problems


def test_units_verify_as_corral_init_installs_them(scratch_root: Callable[..., Path]) -> None:
    """corral.service and the instances ollama@0/ollama@1: not one warning from verify."""
    root = scratch_root()
    assert (root / "etc" / "corral" / "ollama-1.env").is_file()
    assert verify(root, CORRAL, "ollama@0.service", "ollama@1.service") == []


@pytest.mark.parametrize(
    ("unit", "old", "new", "instance"),
    [
        (OLLAMA, "Restart=always", "Restart=sometimes", "ollama@0.service"),
        (CORRAL, "ProtectHome=yes", "ProtectHome=yes\nPrivateDevice=yes", CORRAL),
        (CORRAL, "ExecStart=/usr/local/bin/corral", "ExecStart=/usr/local/bin/korral", CORRAL),
        (OLLAMA, "[Install]", "[Instal]", "ollama@0.service"),
    ],
    ids=["bad-value", "unknown-key", "missing-binary", "unknown-section"],
)
def test_verify_catches_a_broken_unit(
    scratch_root: Callable[..., Path], unit: str, old: str, new: str, instance: str
) -> None:
    """The check is not blind: one bad line in a unit makes verify report it."""
    text = unit_text(unit)
    assert old in text
    root = scratch_root(**{unit: text.replace(old, new, 1)})
    assert verify(root, instance) != []


def test_init_names_the_units_that_ship() -> None:
    """The cp step of `corral init` copies exactly the unit files in deploy/systemd."""
    assert sorted(init_cmd.UNITS) == sorted(p.name for p in UNITS_DIR.glob("*.service"))


def test_ollama_instances_read_what_corral_init_writes() -> None:
    """ollama@N: GPU N by index, overridden by /etc/corral/ollama-N.env; Ollama's binary."""
    unit = directives(OLLAMA)
    env_file = init_cmd.SYSTEM_DIR / init_cmd.Gpu(0, 11435, None).env_name
    assert unit["Service.EnvironmentFile"] == [str(env_file).replace("ollama-0", "ollama-%i")]
    environment = " ".join(unit["Service.Environment"]).split()
    assert "CUDA_VISIBLE_DEVICES=%i" in environment
    assert "CUDA_DEVICE_ORDER=PCI_BUS_ID" in environment
    assert unit["Service.ExecStart"] == ["/usr/local/bin/ollama serve"]
    assert (unit["Service.User"], unit["Service.Group"]) == (["ollama"], ["ollama"])
    assert unit["Service.Restart"] == ["always"]
    # OLLAMA_MODELS stays Ollama's default unless the env file sets it.
    assert not any("OLLAMA_MODELS" in value for values in unit.values() for value in values)


def test_ollama_keeps_gpu_access() -> None:
    """Nothing that closes /dev/nvidia* or blocks the setuid nvidia-modprobe."""
    unit = directives(OLLAMA)
    for key in ("PrivateDevices", "DevicePolicy", "DeviceAllow", "ProtectClock"):
        assert f"Service.{key}" not in unit, key
    for key in ("NoNewPrivileges", "ProtectKernelModules", "CapabilityBoundingSet"):
        assert f"Service.{key}" not in unit, key


def test_corral_unit_runs_the_config_under_systemd_notify() -> None:
    """Type=notify as corral speaks it, its own user, the config and state paths of init."""
    unit = directives(CORRAL)
    config = init_cmd.SYSTEM_DIR / "corral.toml"
    assert unit["Service.ExecStart"] == [f"/usr/local/bin/corral serve --config {config}"]
    assert unit["Service.Type"] == ["notify"]
    assert unit["Service.NotifyAccess"] == ["main"]
    assert unit["Service.Restart"] == ["on-failure"]
    assert (unit["Service.User"], unit["Service.Group"]) == (["corral"], ["corral"])
    assert unit["Service.ConfigurationDirectory"] == [init_cmd.SYSTEM_DIR.name]
    state_dir = Path("/var/lib") / unit["Service.StateDirectory"][0]
    assert Path(init_cmd.STATE_FILE).parent == state_dir
    assert unit["Unit.After"][0].split()[0] == "network-online.target"
    assert unit["Unit.Wants"] == ["network-online.target"]


def test_corral_stop_timeout_outlasts_the_drain() -> None:
    """systemd's SIGKILL comes only after the drain and uvicorn's last 5 s."""
    timeout = float(directives(CORRAL)["Service.TimeoutStopSec"][0])
    assert timeout > ServerSettings().drain_timeout_s + 5


def test_corral_is_hardened_but_reaches_nvml() -> None:
    """No PrivateDevices (it hides /dev/nvidia*): a closed device policy allowing NVIDIA's."""
    unit = directives(CORRAL)
    assert "Service.PrivateDevices" not in unit
    assert unit["Service.DevicePolicy"] == ["closed"]
    assert unit["Service.DeviceAllow"] == ["char-nvidia* rw"]
    for key, value in {
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "ProtectKernelTunables": "yes",
        "ProtectControlGroups": "yes",
        "LockPersonality": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    }.items():
        assert unit[f"Service.{key}"] == [value], key
