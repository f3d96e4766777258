"""Config loading: TOML + CORRAL_ env, and one clear line per problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.config import load_config
from corral.errors import ConfigError
from tests.helpers import REPO_ROOT


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "corral.toml"
    path.write_text(text)
    return path


def test_defaults_match_the_product_contract() -> None:
    """With no file, defaults are those PRODUCT.md promises."""
    s = load_config(None, env={})
    assert (s.server.host, s.server.port, s.server.max_body_mb) == ("127.0.0.1", 11434, 20)
    assert s.balancer.strategy == "least_connections"
    assert s.balancer.max_attempts == 3
    assert (s.health.interval_s, s.health.timeout_s, s.health.fall, s.health.rise) == (5, 2, 3, 2)
    assert (s.timeouts.connect_s, s.timeouts.first_token_s, s.timeouts.idle_s) == (3, 300, 120)
    assert (s.queue.max_size, s.queue.timeout_s) == (512, 60)


def test_toml_backends_and_env_override(tmp_path: Path) -> None:
    """The file sets backends; CORRAL_BALANCER__STRATEGY overrides the file."""
    path = write(
        tmp_path,
        '[balancer]\nstrategy = "round_robin"\n'
        '[[backends]]\nid = "gpu0"\nurl = "http://127.0.0.1:11435"\ngpu = 0\n',
    )
    s = load_config(path, env={"CORRAL_BALANCER__STRATEGY": "least_response_time"})
    assert s.balancer.strategy == "least_response_time"
    assert [b.id for b in s.backends] == ["gpu0"]
    assert s.backends[0].max_concurrent == 4


def test_every_problem_gets_one_line(tmp_path: Path) -> None:
    """Unknown strategy, duplicate id, bad URL, negative timeout and unknown key all reported."""
    path = write(
        tmp_path,
        '[balancer]\nstrategy = "fastest"\n[timeouts]\nconnect_s = -1\n[server]\nprot = 1\n'
        '[[backends]]\nid = "a"\nurl = "ftp://x"\n',
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    text = "\n".join(info.value.problems)
    assert "balancer.strategy: unknown strategy 'fastest'" in text
    assert "least_connections" in text
    assert "timeouts.connect_s" in text
    assert "server.prot: unknown key" in text
    assert "backends.0.url" in text
    assert len(info.value.problems) == 4


def test_duplicate_backend_ids_rejected(tmp_path: Path) -> None:
    """Two backends with one id stop start-up."""
    path = write(
        tmp_path,
        '[[backends]]\nid = "a"\nurl = "http://127.0.0.1:1"\n'
        '[[backends]]\nid = "a"\nurl = "http://127.0.0.1:2"\n',
    )
    with pytest.raises(ConfigError, match="duplicate backend id 'a'"):
        load_config(path, env={})


def test_secrets_never_from_the_file(tmp_path: Path) -> None:
    """An admin key in the TOML is refused; the environment provides it."""
    with pytest.raises(ConfigError, match="CORRAL_ADMIN_KEY"):
        load_config(write(tmp_path, 'admin_key = "x"\n'), env={})
    s = load_config(None, env={"CORRAL_ADMIN_KEY": "s3cret"})
    assert s.resolved_admin_key() == "s3cret"


def test_admin_key_file(tmp_path: Path) -> None:
    """auth.admin_key_file is read (stripped); a missing file is a config error."""
    key = tmp_path / "admin.key"
    key.write_text("from-file\n")
    path = write(tmp_path, f'[auth]\nadmin_key_file = "{key}"\n')
    assert load_config(path, env={}).resolved_admin_key() == "from-file"
    key.unlink()
    with pytest.raises(ConfigError, match="no such file"):
        load_config(path, env={})


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    """Broken TOML and a missing file are one clear line each."""
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(write(tmp_path, "[server\n"), env={})
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "nope.toml", env={})


def test_example_config_is_valid() -> None:
    """config.example.toml (every key documented) loads as it ships."""
    example = REPO_ROOT / "config.example.toml"
    s = load_config(example, env={})
    assert len(s.backends) >= 2


def test_flags_beat_the_environment_which_beats_the_file(tmp_path: Path) -> None:
    """`corral serve --port 9000` wins over CORRAL_SERVER__PORT, which wins over the TOML."""
    file = tmp_path / "corral.toml"
    file.write_text('[server]\nport = 7000\nhost = "127.0.0.1"\n')
    env = {"CORRAL_SERVER__PORT": "8080", "CORRAL_SERVER__HOST": "0.0.0.0", "CORRAL_ADMIN_KEY": "k"}
    assert load_config(file, env={}).server.port == 7000
    assert load_config(file, env=env).server.port == 8080
    flagged = load_config(file, overrides={"server": {"port": 9000}}, env=env)
    assert (flagged.server.port, flagged.server.host) == (9000, "0.0.0.0")
    assert flagged.resolved_admin_key() == "k"


def test_clients_may_not_manage_models_without_client_keys() -> None:
    """auth.model_management = "clients" with no client keys would open pull and delete to
    anyone: refused at start, in one line."""
    with pytest.raises(ConfigError) as refused:
        load_config(None, overrides={"auth": {"model_management": "clients"}}, env={})
    [line] = refused.value.problems
    assert line.startswith('auth.model_management: "clients" with no client keys')
    keyed = load_config(
        None,
        overrides={"auth": {"model_management": "clients"}},
        env={"CORRAL_CLIENT_KEYS": "client-key-1"},
    )
    assert keyed.auth.model_management == "clients"


def test_an_admin_key_no_header_can_carry_is_refused() -> None:
    """A non-ASCII (or control-character) admin key could never match a request: refused."""
    for key in ("clé-secrète-123", "tab\there-1234"):
        with pytest.raises(ConfigError) as refused:
            load_config(None, env={"CORRAL_ADMIN_KEY": key})
        assert refused.value.problems == [
            "admin key: only printable ASCII can be sent in an HTTP header; this key could "
            "never match"
        ]
    assert load_config(None, env={"CORRAL_ADMIN_KEY": "ascii-key-123"}).resolved_admin_key()


def test_trusted_proxies_must_be_addresses() -> None:
    with pytest.raises(ConfigError) as refused:
        load_config(None, overrides={"server": {"trusted_proxies": ["10.0.0.0/8", "nginx"]}})
    assert refused.value.problems == ["server.trusted_proxies: 'nginx' is not an address or CIDR"]


def test_the_redis_url_may_come_from_the_environment_and_is_never_shown() -> None:
    """CORRAL_CLUSTER__REDIS_URL (from a Kubernetes Secret, say) sets [cluster] redis_url;
    its password never appears when the settings are printed."""
    url = "redis://:s3cret-pass@127.0.0.1:6379/0"
    settings = load_config(None, env={"CORRAL_CLUSTER__REDIS_URL": url})
    assert settings.cluster.redis_url is not None
    assert settings.cluster.redis_url.get_secret_value() == url
    assert "s3cret-pass" not in repr(settings)
    assert "s3cret-pass" not in str(settings.model_dump())
