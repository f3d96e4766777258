"""The Dockerfile and .dockerignore: a lint of what the image promises, and a real build.

The lint parses the Dockerfile as Docker does (parser directives, comments, line continuations,
JSON exec form against shell form) and checks the properties users rely on: a pinned slim
Python base in every stage, a final stage that holds only the built venv and runs as a fixed
non-root user, ``corral serve`` in exec form on all interfaces with its config under
/etc/corral, a working ``/healthz`` probe, port 11434, SIGTERM, and no secrets or remote ADDs.
.dockerignore is read with Docker's matching rules (last match wins, a pattern also covers
everything under a directory it matches, ``**``, ``!`` exceptions).

The build test needs a Docker daemon, the base image already pulled and the package index
reachable from the build; it skips, saying which one is missing, when any is not there.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
import tomllib
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from corral.config import ServerSettings
from tests.helpers import REPO_ROOT

ROOT = REPO_ROOT
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
BASE_IMAGE = "python:3.12-slim"
# python:<major.minor[.patch]>-slim[-<debian release>], optionally also pinned by digest.
SLIM_PYTHON = re.compile(
    r"python:3\.\d+(\.\d+)?-slim(-[a-z]+)?(@sha256:[0-9a-f]{64})?", re.IGNORECASE
)
SECRET_NAME = re.compile(r"KEY|TOKEN|PASSWORD|PASSWD|SECRET|CREDENTIAL", re.IGNORECASE)


@dataclass
class Instruction:
    keyword: str
    args: str
    line: int

    @property
    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction; None for shell form."""
        return json_array(self.args)


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


def json_array(text: str) -> list[str] | None:
    """Docker's rule: exec form only when the text parses as a JSON array of strings."""
    if not text.lstrip().startswith("["):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    return None


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions with continuations joined and comments dropped, as Docker's parser does."""
    lines = text.splitlines()
    escape = "\\"
    # Parser directives: `# key=value` lines at the very top, before any comment or instruction.
    for raw in lines:
        match = re.fullmatch(r"#\s*([A-Za-z]+)\s*=\s*(\S+)\s*", raw)
        if match is None:
            break
        if match.group(1).lower() == "escape":
            escape = match.group(2)
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(lines, start=1):
        stripped = raw.strip()
        # Comment and blank lines are dropped before continuations are joined, even inside one.
        if not stripped or stripped.startswith("#"):
            continue
        if not pending:
            start = number
        body = raw.rstrip()
        if body.endswith(escape):
            pending.append(body[: -len(escape)])
            continue
        pending.append(body)
        joined = " ".join(part.strip() for part in pending).strip()
        pending = []
        keyword, _, args = joined.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
    assert not pending, "the Dockerfile ends inside a line continuation"
    return instructions


def split_flags(args: str) -> tuple[dict[str, str], str]:
    """Leading ``--flag=value`` options of COPY, FROM, HEALTHCHECK... and the rest."""
    flags: dict[str, str] = {}
    rest = args
    while True:
        match = re.match(r"--([a-z-]+)(?:=(\S*))?\s+", rest)
        if match is None:
            return flags, rest
        flags[match.group(1)] = match.group(2) or ""
        rest = rest[match.end() :]


def key_values(instruction: Instruction) -> dict[str, str]:
    """ENV / LABEL / ARG pairs, in both ``K=V K2=V2`` and the legacy ``ENV K V`` forms."""
    if instruction.keyword in ("ENV", "LABEL") and "=" not in instruction.args.split(" ")[0]:
        key, _, value = instruction.args.partition(" ")
        return {key: value.strip()}
    pairs: dict[str, str] = {}
    for word in shlex.split(instruction.args):
        key, _, value = word.partition("=")
        pairs[key] = value
    return pairs


def stages(instructions: list[Instruction]) -> tuple[dict[str, str], list[Stage]]:
    """Global ARG defaults (those before the first FROM) and the build stages."""
    global_args: dict[str, str] = {}
    found: list[Stage] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            _, rest = split_flags(instruction.args + " ")
            words = rest.split()
            base = re.sub(
                r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), m.group(0)), words[0]
            )
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            assert len(words) in (1, 3), f"line {instruction.line}: FROM {instruction.args}"
            found.append(Stage(base, name))
        elif not found:
            assert instruction.keyword == "ARG", f"line {instruction.line}: before FROM"
            global_args.update(key_values(instruction))
        else:
            found[-1].instructions.append(instruction)
    return global_args, found


def stage_env(stage: Stage) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction in stage.all("ENV"):
        env.update(key_values(instruction))
    return env


def duration_s(text: str) -> float:
    """A Go duration as HEALTHCHECK takes it: 30s, 1m30s, 500ms."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", text)
    assert parts, f"not a duration: {text!r}"
    assert "".join(n + u for n, u in parts) == text, f"not a duration: {text!r}"
    return sum(float(n) * units[u] for n, u in parts)


def ignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go's filepath.Match plus ``**``) as a regex on paths."""
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out += "[" + pattern[i + 1 : end].replace("!", "^", 1) + "]"
            i = end + 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def ignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in DOCKERIGNORE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = os.path.normpath(line.removeprefix("!").strip()).lstrip("/")
        rules.append((negated, ignore_regex(pattern)))
    return rules


def ignored(path: str) -> bool:
    """Whether Docker leaves ``path`` (relative to the context) out of the build context."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    excluded = False
    for negated, regex in ignore_rules():
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            excluded = not negated
    return excluded


@pytest.fixture(scope="module")
def parsed() -> tuple[dict[str, str], list[Stage]]:
    return stages(parse_dockerfile(DOCKERFILE.read_text()))


@pytest.fixture(scope="module")
def final(parsed: tuple[dict[str, str], list[Stage]]) -> Stage:
    return parsed[1][-1]


def pyproject() -> dict[str, object]:
    with (ROOT / "pyproject.toml").open("rb") as fh:
        project: dict[str, object] = tomllib.load(fh)["project"]
    return project


# --- the parser itself -------------------------------------------------------------------------


def test_parser_joins_continuations_drops_comments_and_tells_exec_from_shell_form() -> None:
    """Continuations, comment lines inside them and both CMD forms parse as Docker reads them."""
    text = (
        "# syntax=docker/dockerfile:1\n"
        "FROM python:3.12-slim AS build\n"
        "RUN a \\\n"
        "    # a comment inside a continuation\n"
        "    && b\n"
        'CMD ["corral", "serve"]\n'
        "ENTRYPOINT corral serve\n"
        'ENV A=1 B="x y"\n'
        "ENV C plain value\n"
    )
    instructions = parse_dockerfile(text)
    assert [i.keyword for i in instructions] == ["FROM", "RUN", "CMD", "ENTRYPOINT", "ENV", "ENV"]
    assert instructions[1].args == "a && b"
    assert instructions[2].exec_form == ["corral", "serve"]
    assert instructions[3].exec_form is None
    assert key_values(instructions[4]) == {"A": "1", "B": "x y"}
    assert key_values(instructions[5]) == {"C": "plain value"}


def test_ignore_matching_follows_docker_rules() -> None:
    """Last match wins, directories cover their contents, ``**`` spans directories."""
    assert ignore_regex("**/__pycache__").fullmatch("src/corral/__pycache__")
    assert ignore_regex("**/__pycache__").fullmatch("__pycache__")
    assert not ignore_regex("*").fullmatch("src/corral")
    assert ignore_regex("*.py[cod]").fullmatch("x.pyc")


# --- the Dockerfile ----------------------------------------------------------------------------


def test_every_stage_starts_from_a_slim_python_pinned_to_a_tag(
    parsed: tuple[dict[str, str], list[Stage]],
) -> None:
    """Each external base is python:3.X-slim by an explicit tag (never latest or untagged)."""
    _, found = parsed
    names: set[str] = set()
    for stage in found:
        if stage.base in names:  # FROM an earlier stage
            continue
        assert SLIM_PYTHON.fullmatch(stage.base), f"base {stage.base!r} is not a pinned slim"
        if stage.name:
            names.add(stage.name)


def test_multi_stage_final_image_holds_only_the_venv(
    parsed: tuple[dict[str, str], list[Stage]], final: Stage
) -> None:
    """The final stage copies from the build stage only, to the same (non-relocatable) path."""
    _, found = parsed
    assert len(found) >= 2, "expected a build stage and a final stage"
    copies = final.all("COPY") + final.all("ADD")
    assert copies, "the final stage copies nothing in"
    builders = {stage.name for stage in found[:-1]}
    for copy in copies:
        flags, rest = split_flags(copy.args + " ")
        assert flags.get("from") in builders, f"line {copy.line}: copies from the build context"
        source, dest = rest.split()
        assert source.rstrip("/") == dest.rstrip("/"), f"line {copy.line}: a venv cannot move"
        venv = source.rstrip("/")
        created = " ".join(i.args for s in found[:-1] for i in s.all("RUN"))
        assert f"venv {venv}" in created, f"{venv} is not a venv made in the build stage"
        assert f"{venv}/bin" in stage_env(final).get("PATH", ""), "the venv is not on PATH"


def test_final_stage_runs_as_a_fixed_non_root_user(final: Stage) -> None:
    """USER is numeric (runAsNonRoot can check it), not root, and created with that UID/GID."""
    user = final.last("USER")
    assert user is not None, "the final stage has no USER: it would run as root"
    uid, _, gid = user.args.partition(":")
    assert uid not in ("root", "0")
    assert gid not in ("root", "0")
    assert uid.isdigit(), "use a numeric UID:GID"
    assert gid.isdigit(), "use a numeric UID:GID"
    runs = " ".join(i.args for i in final.all("RUN"))
    assert re.search(rf"useradd\b.*--uid {uid}\b", runs), f"no user created with UID {uid}"
    assert re.search(rf"groupadd\b.*--gid {gid}\b", runs), f"no group created with GID {gid}"
    assert final.instructions.index(user) > max(
        final.instructions.index(i) for i in final.all("RUN")
    ), "a RUN after USER would need the user's rights"
    workdir = final.last("WORKDIR")
    assert workdir is not None
    assert workdir.args.startswith("/")


def test_cmd_runs_corral_serve_on_all_interfaces_with_the_etc_corral_config(
    final: Stage,
) -> None:
    """Exec form (corral is PID 1 and gets SIGTERM), config under /etc/corral, 0.0.0.0."""
    entrypoint = final.last("ENTRYPOINT")
    cmd = final.last("CMD")
    assert cmd is not None
    argv: list[str] = []
    for instruction in (entrypoint, cmd):
        if instruction is None:
            continue
        form = instruction.exec_form
        assert form is not None, f"line {instruction.line}: shell form puts sh in front"
        argv += form
    assert argv[:2] == ["corral", "serve"], argv
    config = argv[argv.index("--config") + 1]
    assert config.startswith("/etc/corral/")
    assert config.endswith(".toml")
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    assert "--port" not in argv, "the port is EXPOSEd and probed as 11434"


def test_exposes_corrals_default_port(final: Stage) -> None:
    """EXPOSE names the port corral listens on by default."""
    exposed = {port for i in final.all("EXPOSE") for port in i.args.split()}
    assert exposed == {str(ServerSettings().port)} or exposed == {f"{ServerSettings().port}/tcp"}


def test_healthcheck_probes_healthz_with_the_stdlib(final: Stage) -> None:
    """HEALTHCHECK: /healthz on the exposed port, no curl/wget, sane timings."""
    check = final.last("HEALTHCHECK")
    assert check is not None
    assert check.args.upper() != "NONE"
    flags, rest = split_flags(check.args + " ")
    keyword, _, command = rest.strip().partition(" ")
    assert keyword.upper() == "CMD"
    argv = json_array(command)
    assert argv is not None, "exec form: no shell needed for the probe"
    probe = " ".join(argv)
    assert argv[0] in ("python", "python3")
    assert "http://127.0.0.1:" in probe
    assert "/healthz" in probe
    assert str(ServerSettings().port) in probe
    assert not re.search(r"\b(curl|wget)\b", probe), "slim images have neither"
    assert {"interval", "timeout", "start-period", "retries"} <= flags.keys()
    interval = duration_s(flags["interval"])
    timeout = duration_s(flags["timeout"])
    assert 5 <= interval <= 120
    assert 1 <= timeout < interval
    assert duration_s(flags["start-period"]) >= 5
    assert 1 <= int(flags["retries"]) <= 10
    # The probe's own timeout must fire before Docker's, so a hang reads as a clean failure.
    inner = re.search(r"timeout=(\d+(?:\.\d+)?)", probe)
    assert inner is not None
    assert float(inner.group(1)) < timeout


def test_stops_with_sigterm_and_sets_python_and_nvidia_env(final: Stage) -> None:
    """SIGTERM drains; unbuffered logs, no bytecode writes, NVML-only NVIDIA capabilities."""
    stop = final.last("STOPSIGNAL")
    assert stop is not None
    assert stop.args in ("SIGTERM", "15")
    env = stage_env(final)
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "utility"


def test_no_secrets_and_no_remote_add(parsed: tuple[dict[str, str], list[Stage]]) -> None:
    """No KEY/TOKEN/PASSWORD-like ENV or ARG with a value; ADD never fetches a URL."""
    global_args, found = parsed
    pairs = list(global_args.items())
    for stage in found:
        for instruction in stage.all("ENV") + stage.all("ARG"):
            pairs += key_values(instruction).items()
        for add in stage.all("ADD"):
            assert not re.search(r"\b(https?|git|ssh)://|git@", add.args), add.args
    leaked = [key for key, value in pairs if SECRET_NAME.search(key) and value]
    assert not leaked, f"secrets baked into the image: {leaked}"


def test_labels_follow_oci_and_match_pyproject(final: Stage) -> None:
    """org.opencontainers.image.* labels; version and licence agree with pyproject.toml."""
    labels: dict[str, str] = {}
    for instruction in final.all("LABEL"):
        labels.update(key_values(instruction))
    args: dict[str, str] = {}
    for instruction in final.all("ARG"):
        args.update(key_values(instruction))
    version = re.sub(
        r"\$\{?(\w+)\}?",
        lambda m: args.get(m.group(1), ""),
        labels["org.opencontainers.image.version"],
    )
    project = pyproject()
    assert labels["org.opencontainers.image.title"] == project["name"]
    assert version == project["version"]
    assert labels["org.opencontainers.image.licenses"] == project["license"]


# --- .dockerignore -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        ".git/HEAD",
        ".venv/bin/python",
        ".pytest_cache/v/cache",
        ".ruff_cache/x",
        ".mypy_cache/x",
        ".coverage",
        "bench/results/affinity.json",
        "build/lib/corral/__init__.py",
        "dist/corral-0.1.0-py3-none-any.whl",
        "src/corral.egg-info/PKG-INFO",
        "src/corral/__pycache__/app.cpython-312.pyc",
        ".whl/x.whl",
        ".devrun/log",
        "tests/unit/test_config.py",
        "corral.env",
        ".env",
    ],
)
def test_dockerignore_keeps_out(path: str) -> None:
    """Repository metadata, environments, caches, outputs and secrets stay out of the context."""
    assert ignored(path)


def test_every_copy_source_reaches_the_build(parsed: tuple[dict[str, str], list[Stage]]) -> None:
    """Whatever the build stage COPYs exists and is not ignored, down to each package file."""
    _, found = parsed
    sources: list[str] = []
    for stage in found:
        for copy in stage.all("COPY"):
            flags, rest = split_flags(copy.args + " ")
            if "from" in flags:
                continue
            words = json_array(rest) or rest.split()
            sources += words[:-1]
    assert sources
    readme = pyproject()["readme"]
    assert readme in sources, "pyproject's readme is needed to build the package"
    for source in sources:
        path = ROOT / source
        assert path.exists(), source
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            generated = "__pycache__" in relative or ".egg-info" in relative
            assert ignored(relative) == generated, relative
    assert not ignored("src/corral/sim/__init__.py")


# --- a real build ------------------------------------------------------------------------------


def docker_or_skip() -> str:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("docker not found: the image build is not tried (the lint above still ran)")
    info = subprocess.run([docker, "info"], capture_output=True, text=True, timeout=30)
    if info.returncode != 0:
        reason = (info.stderr.strip().splitlines() or ["docker info failed"])[-1]
        pytest.skip(f"no Docker daemon answers ({reason}): the image build is not tried")
    image = subprocess.run(
        [docker, "image", "inspect", BASE_IMAGE], capture_output=True, text=True, timeout=30
    )
    if image.returncode != 0:
        pytest.skip(
            f"{BASE_IMAGE} is not pulled here and tests do not pull it: "
            f"`docker pull {BASE_IMAGE}` to run the build test"
        )
    return docker


def docker(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


# pip's words when the build cannot reach the package index.
OFFLINE = re.compile(
    r"Temporary failure in name resolution|Failed to establish a new connection|"
    r"No matching distribution found|Network is unreachable|Could not fetch URL"
)


@pytest.mark.integration
def test_image_builds_serves_healthz_and_stops_cleanly(tmp_path: Path) -> None:
    """Built image: starts with zero backends, /healthz answers, Docker sees it healthy,
    runs as UID 10001 and exits 0 on docker stop (SIGTERM drains)."""
    docker_or_skip()
    tag = f"corral-test:{uuid.uuid4().hex[:12]}"
    build = docker("build", "--quiet", "-t", tag, str(ROOT), timeout=900)
    if build.returncode != 0 and OFFLINE.search(build.stdout + build.stderr):
        pytest.skip("the build cannot reach the package index to install corral's dependencies")
    assert build.returncode == 0, build.stderr[-4000:]
    config_dir = tmp_path / "etc-corral"
    config_dir.mkdir()
    (config_dir / "corral.toml").write_text('[server]\nlog_level = "info"\n')
    # The container's user (UID 10001) reads the mount: world-readable, as /etc/corral is.
    config_dir.chmod(0o755)
    (config_dir / "corral.toml").chmod(0o644)
    name = f"corral-test-{uuid.uuid4().hex[:12]}"
    try:
        run = docker(
            "run", "-d", "--name", name, "--health-interval=1s",
            "-p", "127.0.0.1::11434", "-v", f"{config_dir}:/etc/corral:ro", tag,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        port = docker("port", name, "11434/tcp").stdout.split(":")[-1].strip()
        deadline = time.monotonic() + 60
        health = ""
        status = None
        while time.monotonic() < deadline:
            try:
                status = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code
            except httpx.HTTPError:
                status = None
            health = docker("inspect", "-f", "{{.State.Health.Status}}", name).stdout.strip()
            if status == 200 and health == "healthy":
                break
            time.sleep(0.5)
        logs = docker("logs", name)
        assert status == 200, logs.stdout + logs.stderr
        assert health == "healthy", logs.stdout + logs.stderr
        assert '"backends": 0' in logs.stdout + logs.stderr, "started with zero backends"
        user = docker("exec", name, "python", "-c", "import os; print(os.getuid(), os.getgid())")
        assert user.stdout.split() == ["10001", "10001"]
        stop = docker("stop", "-t", "30", name, timeout=60)
        assert stop.returncode == 0, stop.stderr
        code = docker("inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip()
        assert code == "0", docker("logs", name).stderr
    finally:
        docker("rm", "-f", name)
        docker("image", "rm", "-f", tag)
