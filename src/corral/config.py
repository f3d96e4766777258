"""Settings: a TOML file plus ``CORRAL_`` environment overrides, validated in one place."""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from pathlib import Path
from typing import Any, Literal, NamedTuple
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from corral.auth import ClientKey, parse_client_keys
from corral.errors import ConfigError

# Keys that hold secrets: accepted from the environment or a file, never from the TOML.
_SECRET_KEYS = ("admin_key", "client_keys")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class ServerSettings(_Section):
    host: str = "127.0.0.1"
    port: int = Field(11434, ge=1, le=65535)
    max_body_mb: float = Field(20, gt=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"
    drain_timeout_s: float = Field(60, ge=0)
    state_file: Path | None = None
    # Set: the admin API, /metrics, /ui and /docs move to their own listener (loopback by
    # default), and the main port serves only the Ollama/OpenAI routes, /healthz and /readyz.
    admin_port: int | None = Field(None, ge=1, le=65535)
    admin_host: str = "127.0.0.1"
    # The edge (README "Defaults at the edge"). Host names accepted besides loopback ones
    # ("*.example.com" matches subdomains, "*" any), and browser origins (OLLAMA_ORIGINS'
    # syntax: "https://app.example.com", "https://*.example.com", "*").
    allowed_hosts: list[str] = []
    allowed_origins: list[str] = []
    # Peers (addresses or CIDRs) whose X-Forwarded-For / Forwarded / X-Real-IP name the client.
    trusted_proxies: list[str] = []
    header_timeout_s: float = Field(60, gt=0)  # request line and headers (nginx: 60 s)
    body_timeout_s: float = Field(60, gt=0)  # longest pause between body reads (nginx: 60 s)
    idle_timeout_s: float = Field(75, gt=0)  # an idle kept-alive connection (nginx: 75 s)
    max_connections: int = Field(1024, ge=1)  # open client connections at once
    max_header_bytes: int = Field(65536, ge=1024)  # request line and headers, in all
    max_headers: int = Field(100, ge=8)
    # Request bodies buffered at once, across all requests: beyond, 503 + Retry-After.
    max_buffered_mb: float = Field(256, gt=0)
    metrics_auth: bool = False  # /metrics needs the admin key
    docs: bool = False  # /docs and /openapi.json (off: no page loads a third-party script)
    expose_backend_header: bool = True  # X-Corral-Backend on answers

    @model_validator(mode="after")
    def _distinct_ports(self) -> ServerSettings:
        if self.admin_port is not None and self.admin_port == self.port:
            raise ValueError("admin_port must differ from port")
        return self

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item.strip(), strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an address or CIDR") from None
        return [item.strip() for item in value]

    @field_validator("allowed_hosts", "allowed_origins")
    @classmethod
    def _no_blanks(cls, value: list[str]) -> list[str]:
        cleaned = [item.strip().lower() for item in value]
        if any(not item for item in cleaned):
            raise ValueError("an empty entry matches nothing; remove it")
        return cleaned

    def trusted_networks(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        return [ipaddress.ip_network(item, strict=False) for item in self.trusted_proxies]


class BalancerSettings(_Section):
    strategy: str = "least_connections"
    model_affinity: bool = True
    # A backend holding the model (or the conversation) keeps its requests unless it has more
    # than affinity_spill_abs requests in flight beyond the least loaded eligible backend (in
    # its own slots) and more than affinity_spill_ratio times its load.
    affinity_spill_abs: float = Field(2, ge=0)
    affinity_spill_ratio: float = Field(1.5, ge=1)
    session_affinity: bool = True
    # Demand per model is averaged over this window: a new copy of a model is loaded when the
    # requests for it exceeded what its holders serve over it, not on one burst.
    demand_window_s: float = Field(30, gt=0)
    max_attempts: int = Field(3, ge=1, le=10)
    retry_budget_ratio: float = Field(0.2, ge=0, le=1)
    retry_budget_min: float = Field(3, ge=0)
    score_weights: tuple[float, float, float] = (0.5, 0.3, 0.2)

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, value: str) -> str:
        known = STRATEGY_NAMES
        if value not in known:
            raise ValueError(f"unknown strategy {value!r}; known: {', '.join(known)}")
        return value


# The strategies corral.strategies registers (a test keeps the two in step): named here so
# that the configuration, at the bottom of the import order, imports nothing above it.
STRATEGY_NAMES = (
    "equal_weighted",
    "least_connections",
    "least_response_time",
    "round_robin",
    "score",
    "weighted_round_robin",
)


class HealthSettings(_Section):
    interval_s: float = Field(5, gt=0)
    timeout_s: float = Field(2, gt=0)
    fall: int = Field(3, ge=1)
    rise: int = Field(2, ge=1)
    backoff_max_s: float = Field(30, gt=0)
    error_rate_threshold: float = Field(0.5, gt=0, le=1)
    error_window_s: float = Field(30, gt=0)
    error_min_requests: int = Field(10, ge=1)
    consecutive_errors: int = Field(3, ge=1)
    ejection_s: float = Field(30, gt=0)
    max_ejection_s: float = Field(300, gt=0)


class TimeoutSettings(_Section):
    connect_s: float = Field(3, gt=0)
    first_token_s: float = Field(300, gt=0)
    idle_s: float = Field(120, gt=0)


class QueueSettings(_Section):
    max_size: int = Field(512, ge=0)
    timeout_s: float = Field(60, gt=0)
    aging_s: float = Field(10, gt=0)


class GpuSettings(_Section):
    enabled: bool = True
    poll_s: float = Field(2, gt=0)
    max_temp_c: float = Field(85, gt=0)
    # A GPU that reached max_temp_c is avoided until it is this much cooler.
    temp_hysteresis_c: float = Field(5, ge=0)


# A Go duration as Ollama's keep_alive takes it ("30m", "1h30m", "-1m"); a bare number is seconds.
_GO_DURATION = re.compile(r"[-+]?(0|(([0-9]+(\.[0-9]*)?|\.[0-9]+)(ns|us|µs|μs|ms|s|m|h))+)")


class PlacementSettings(_Section):
    """Priority models: preloaded, kept warm, and moved back to a GPU when found on CPU; copies
    of the models in demand loaded on idle backends."""

    enabled: bool = True
    interval_s: float = Field(300, gt=0)
    priority_models: list[str] = []
    # Sent as Ollama's keep_alive with every load corral makes; negative: forever.
    keep_alive: int | float | str = -1
    # Demand-driven copies: a model whose demand exceeded what its holders serve (or that was
    # asked for and is held nowhere) is loaded on an idle backend, checked this often.
    demand: bool = True
    demand_interval_s: float = Field(2, gt=0)

    @field_validator("priority_models")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        names = [name.strip() for name in value]
        if any(not name for name in names):
            raise ValueError("empty model name")
        return names

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _keep_alive(cls, value: Any) -> Any:
        return validate_keep_alive(value)


def validate_keep_alive(value: Any) -> int | float | str:
    """Ollama's keep_alive: seconds (a number, or a numeric string as OLLAMA_KEEP_ALIVE takes)
    or a Go duration string; 0 is refused (it would unload the model at once)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError('expected seconds (a number) or a duration such as "30m" or "-1m"')
    seconds: float | None = None
    if isinstance(value, str):
        text = value.strip()
        if _GO_DURATION.fullmatch(text):
            if not any(c in "123456789" for c in text):
                raise ValueError("keep_alive 0 would unload the model at once")
            return text
        try:
            seconds = float(text)
        except ValueError:
            raise ValueError(
                f"invalid duration {text!r}: expected seconds or a duration such as "
                '"30m", "1h30m" or "-1m" (negative: forever)'
            ) from None
    else:
        seconds = float(value)
    if not math.isfinite(seconds):
        raise ValueError("keep_alive must be a finite number of seconds (negative: forever)")
    if seconds == 0:
        raise ValueError("keep_alive 0 would unload the model at once")
    return int(seconds) if seconds.is_integer() else seconds


class AccountSettings(_Section):
    # The backend whose Ollama account /api/me, /api/signout, /api/user/keys and /api/status
    # act on (None: the first healthy backend in config order).
    backend: str | None = None


class ClusterSettings(_Section):
    """Several corral replicas (or ``serve --workers``) sharing state in Redis."""

    # redis://[:password@]host:port/db, or rediss:// for TLS; a secret (never logged).
    redis_url: SecretStr | None = None
    name: str = Field("corral", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    lease_s: float = Field(10, gt=0)


# What a [[discovery]] dns names.
OLLAMA_PORT = 11434
# _service._proto.name: an SRV name (RFC 2782).
_SRV = re.compile(r"^_[^.]+\._(tcp|udp)\..+$", re.IGNORECASE)


class Target(NamedTuple):
    """What one ``[[discovery]] dns`` names: ``host`` and ``port``, or an SRV name
    (``port`` None)."""

    name: str
    port: int | None

    @property
    def srv(self) -> bool:
        return self.port is None


def parse_target(dns: str) -> Target:
    """``host:port`` (A/AAAA), ``_service._proto.name`` (SRV) or ``host`` (port 11434).

    Raises ValueError for a bad port or an empty name.
    """
    text = dns.strip()  # a final dot (an absolute name) is kept: no search domain is tried
    if _SRV.match(text):
        return Target(text, None)
    host, port = text, OLLAMA_PORT
    if text.startswith("["):  # [v6]:port
        inner, _, rest = text[1:].partition("]")
        host = inner
        if rest:
            port = _port(rest.removeprefix(":"), dns)
    elif text.count(":") == 1:
        host, _, raw = text.partition(":")
        port = _port(raw, dns)
    host = host.strip()
    if not host.strip("."):
        raise ValueError(f"{dns!r}: no host name")
    return Target(host, port)


def _port(raw: str, dns: str) -> int:
    if not raw.isdigit() or not 1 <= int(raw) <= 65535:
        raise ValueError(f"{dns!r}: the port must be a number from 1 to 65535")
    return int(raw)


class DiscoverySettings(_Section):
    """Backends found in DNS: each address of ``dns`` (A/AAAA ``host:port``, or an SRV name
    ``_service._proto.name``) is a backend, re-resolved every ``interval_s``."""

    dns: str = Field(min_length=1, max_length=253)
    interval_s: float = Field(10, gt=0)
    max_concurrent: int = Field(4, ge=1)
    max_loaded_models: int = Field(3, ge=0)
    # Each discovered backend's DCGM exporter: "{host}" is replaced by the pod's address.
    gpu_metrics_url: str | None = None

    @field_validator("dns")
    @classmethod
    def _target(cls, value: str) -> str:
        parse_target(value)  # ValueError: a bad port or no name
        return value

    @field_validator("gpu_metrics_url")
    @classmethod
    def _template(cls, value: str | None) -> str | None:
        if value is not None:
            _http_url(value.replace("{host}", "10.0.0.1"), "http://{host}:9400/metrics")
        return value


class AuthSettings(_Section):
    admin_key_file: Path | None = None
    client_keys_file: Path | None = None
    model_management: Literal["admin", "clients"] = "admin"


GpuRef = int | str


class BackendSettings(_Section):
    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$")
    url: str
    # This host's GPU(s) behind the backend: NVML index or UUID, or a list for several.
    gpu: GpuRef | list[GpuRef] | None = None
    # A remote host's NVIDIA DCGM exporter (http://host:9400/metrics) to read its GPUs from.
    gpu_metrics_url: str | None = None
    weight: float | None = Field(None, gt=0)
    max_concurrent: int = Field(4, ge=1)
    # The Ollama's OLLAMA_MAX_LOADED_MODELS: at most this many models loaded at once (0: no
    # limit). Ollama's default is 3 per GPU.
    max_loaded_models: int = Field(3, ge=0)
    fallback: bool = False

    @field_validator("url")
    @classmethod
    def _valid_url(cls, value: str) -> str:
        return validate_backend_url(value)

    @field_validator("gpu", mode="before")
    @classmethod
    def _no_bool_gpu(cls, value: Any) -> Any:
        return reject_bool_gpu(value)

    @field_validator("gpu")
    @classmethod
    def _valid_gpu(cls, value: GpuRef | list[GpuRef] | None) -> GpuRef | list[GpuRef] | None:
        return validate_gpu_ref(value)

    @field_validator("gpu_metrics_url")
    @classmethod
    def _valid_metrics_url(cls, value: str | None) -> str | None:
        return None if value is None else validate_metrics_url(value)


def reject_bool_gpu(value: Any) -> Any:
    """``gpu = true`` is a mistake, not GPU 1."""
    refs = value if isinstance(value, list) else [value]
    if any(isinstance(ref, bool) for ref in refs):
        raise ValueError("invalid GPU: expected an index or a UUID, not true/false")
    return value


def validate_gpu_ref(value: GpuRef | list[GpuRef] | None) -> GpuRef | list[GpuRef] | None:
    """A GPU index (``0``), a UUID (``GPU-…``/``MIG-…``), or a non-empty list of them."""
    if value is None:
        return None
    refs = value if isinstance(value, list) else [value]
    if not refs:
        raise ValueError("empty GPU list: give an index, a UUID, or leave gpu out")
    clean: list[GpuRef] = []
    for ref in refs:
        if isinstance(ref, bool):
            raise ValueError(f"invalid GPU {ref!r}: expected an index or a UUID")
        if isinstance(ref, str):
            text = ref.strip()
            if text.isdigit():
                ref = int(text)
            elif not text.upper().startswith(("GPU-", "MIG-")) or len(text) < 8:
                raise ValueError(f"invalid GPU {ref!r}: expected an index or a UUID (GPU-…)")
            else:
                ref = text
        if isinstance(ref, int) and ref < 0:
            raise ValueError(f"invalid GPU index {ref}: must be 0 or more")
        clean.append(ref)
    return clean if isinstance(value, list) else clean[0]


def _http_url(value: str, example: str) -> str:
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"invalid URL {value!r}: expected {example}")
    try:
        _ = parts.port
    except ValueError as exc:
        raise ValueError(f"invalid URL {value!r}: bad port") from exc
    return value.strip()


def validate_metrics_url(value: str) -> str:
    """An ``http(s)://host[:port]/path`` URL, kept as given (the path matters)."""
    return _http_url(value, "http://host:9400/metrics")


class RegisteredBackend(BackendSettings):
    """A backend registered at runtime (the admin API, or restored from the state file): the
    config's fields with bounds a request may not exceed, plus ``ttl_s``."""

    max_concurrent: int = Field(4, ge=1, le=10_000)
    gpu_metrics_url: str | None = Field(None, max_length=2048)
    ttl_s: float | None = Field(None, gt=0)


def validate_backend_url(value: str) -> str:
    """Accept ``http(s)://host[:port]`` (an optional path prefix is kept); raise ValueError."""
    return _http_url(value, "http://host:port").rstrip("/")


class Settings(BaseSettings):
    """Everything corral reads at start-up."""

    model_config = SettingsConfigDict(
        env_prefix="CORRAL_",
        env_nested_delimiter="__",
        extra="forbid",
        case_sensitive=False,
    )

    server: ServerSettings = ServerSettings()
    balancer: BalancerSettings = BalancerSettings()
    health: HealthSettings = HealthSettings()
    timeouts: TimeoutSettings = TimeoutSettings()
    queue: QueueSettings = QueueSettings()
    gpu: GpuSettings = GpuSettings()
    auth: AuthSettings = AuthSettings()
    placement: PlacementSettings = PlacementSettings()
    account: AccountSettings = AccountSettings()
    cluster: ClusterSettings = ClusterSettings()
    discovery: list[DiscoverySettings] = []
    backends: list[BackendSettings] = []
    # Secrets: environment (CORRAL_ADMIN_KEY, CORRAL_CLIENT_KEYS) or [auth] files only.
    admin_key: SecretStr | None = None
    client_keys: SecretStr | None = None

    @model_validator(mode="after")
    def _unique_backend_ids(self) -> Settings:
        seen: set[str] = set()
        for backend in self.backends:
            if backend.id in seen:
                raise ValueError(f"duplicate backend id {backend.id!r}")
            seen.add(backend.id)
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The environment overrides the file (passed as init kwargs).
        return (env_settings, init_settings)

    def resolved_client_keys(self) -> dict[bytes, ClientKey]:
        """Client keys from CORRAL_CLIENT_KEYS, else ``auth.client_keys_file``; ValueError."""
        if self.client_keys is not None and self.client_keys.get_secret_value().strip():
            return parse_client_keys(self.client_keys.get_secret_value())
        if self.auth.client_keys_file is not None:
            return parse_client_keys(self.auth.client_keys_file.read_text())
        return {}

    def resolved_admin_key(self) -> str | None:
        """The admin key from the environment, else from ``auth.admin_key_file``."""
        if self.admin_key is not None and self.admin_key.get_secret_value():
            return self.admin_key.get_secret_value()
        if self.auth.admin_key_file is not None:
            text = self.auth.admin_key_file.read_text().strip()
            return text or None
        return None


def _format_loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "config"


def format_validation_error(exc: ValidationError) -> list[str]:
    """One readable line per problem."""
    lines: list[str] = []
    for err in exc.errors():
        where = tuple(err.get("loc", ()))
        loc = _format_loc(where)
        if err.get("type") == "extra_forbidden":
            lines.append(f"{loc}: unknown key")
            continue
        msg = str(err.get("msg", "invalid value"))
        msg = msg.removeprefix("Value error, ")
        # A problem of the whole configuration (no key to name) is told as it is.
        lines.append(f"{loc}: {msg}" if where else msg)
    return lines


def _duplicate_ids(data: dict[str, Any]) -> list[str]:
    """Backend ids given twice, found before validation so that they are reported with the
    other problems, not only once those are fixed."""
    backends = data.get("backends")
    if not isinstance(backends, list):
        return []
    seen: set[str] = set()
    dupes: list[str] = []
    for backend in backends:
        bid = backend.get("id") if isinstance(backend, dict) else None
        if isinstance(bid, str):
            if bid in seen and f"duplicate backend id {bid!r}" not in dupes:
                dupes.append(f"duplicate backend id {bid!r}")
            seen.add(bid)
    return dupes


def load_config(
    path: str | Path | None = None,
    *,
    overrides: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
) -> Settings:
    """Read ``path`` (TOML), apply ``CORRAL_*`` env and explicit overrides; raise ConfigError."""
    data: dict[str, Any] = {}
    if path is not None:
        file = Path(path)
        try:
            with file.open("rb") as fh:
                data = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError([f"{file}: no such file"]) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"{file}: invalid TOML: {exc}"]) from None
        except OSError as exc:
            raise ConfigError([f"{file}: cannot read: {exc.strerror}"]) from None
    problems = [
        f"{key}: secrets are not read from the config file; "
        f"use CORRAL_{key.upper()} or auth.{key}_file"
        for key in _SECRET_KEYS
        if key in data
    ]
    if problems:
        raise ConfigError(problems)
    for section, values in (overrides or {}).items():
        if isinstance(values, dict):
            merged = dict(data.get(section) or {})
            merged.update(values)
            data[section] = merged
        else:
            data[section] = values
    saved_env = None
    if env is not None:
        saved_env = dict(os.environ)
        os.environ.clear()
        os.environ.update(env)
    try:
        settings = Settings(**data)
        if overrides:
            # Command-line flags beat the environment, which beats the file.
            # (The environment was read once already: no prefix matches on this second pass.)
            merged = _merged(settings.model_dump(), overrides)
            settings = Settings(_env_prefix="CORRAL_FLAGS_ONLY_", **merged)
    except ValidationError as exc:
        lines = format_validation_error(exc)
        lines += [d for d in _duplicate_ids(data) if d not in lines]
        raise ConfigError(lines) from None
    finally:
        if saved_env is not None:
            os.environ.clear()
            os.environ.update(saved_env)
    _check_files(settings)
    return settings


def _merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for section, values in overrides.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    return merged


def _check_files(settings: Settings) -> None:
    problems = []
    clients: dict[bytes, ClientKey] | None = None
    try:
        clients = settings.resolved_client_keys()
    except ValueError as exc:
        problems.append(f"client keys: {exc}")
    except OSError:
        pass  # a missing file is reported below
    if clients == {} and settings.auth.model_management == "clients":
        problems.append(
            'auth.model_management: "clients" with no client keys would let anyone pull and '
            'delete models; set CORRAL_CLIENT_KEYS or auth.client_keys_file, or use "admin"'
        )
    try:
        admin = settings.resolved_admin_key()
    except OSError:
        admin = None  # a missing file is reported below
    if admin is not None and not (admin.isascii() and admin.isprintable()):
        problems.append(
            "admin key: only printable ASCII can be sent in an HTTP header; this key could "
            "never match"
        )
    for name in ("admin_key_file", "client_keys_file"):
        file: Path | None = getattr(settings.auth, name)
        if file is not None and not file.is_file():
            problems.append(f"auth.{name}: {file}: no such file")
    if problems:
        raise ConfigError(problems)
