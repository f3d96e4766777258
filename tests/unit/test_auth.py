"""Client keys: the file/env format, lookups, per-key limits; the admin-key check."""

from __future__ import annotations

from pathlib import Path

import pytest

from corral.auth import ClientAuth, admin_denial, parse_client_keys, presented_key
from corral.config import load_config
from corral.errors import ConfigError
from tests.helpers import FakeClock


def test_entries_with_options_comments_and_commas() -> None:
    keys = parse_client_keys(
        "# team keys\nalpha-key-1 name=alpha priority=high rate=5/s\n"
        "beta-key-22, gamma-key-333 priority=low  # batch jobs\n"
    )
    auth = ClientAuth(keys, None)
    alpha = auth.identify("alpha-key-1")
    assert alpha is not None
    assert (alpha.name, alpha.priority, alpha.rate_per_s) == ("alpha", 2, 5.0)
    beta = auth.identify("beta-key-22")
    assert beta is not None
    assert (beta.name, beta.priority, beta.rate_per_s) == ("key2", None, None)
    assert auth.identify("gamma-key-333").priority == 0  # type: ignore[union-attr]
    assert auth.identify("alpha-key-") is None
    assert auth.identify(None) is None


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("short", "too short"),
        ("long-enough-key bogus=1", "bad option"),
        ("long-enough-key priority=max", "priority must be"),
        ("long-enough-key rate=0", "rate must be"),
        ("long-enough-key rate=fast", "rate must be"),
        ("long-enough-key, long-enough-key", "listed twice"),
    ],
)
def test_bad_entries_are_named_by_number_never_by_key(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error) as info:
        parse_client_keys(text)
    assert "long-enough-key" not in str(info.value)


def test_bad_keys_fail_check_config(tmp_path: Path) -> None:
    """A bad entry is a config error at start-up, one line, no key in it."""
    with pytest.raises(ConfigError) as info:
        load_config(None, env={"CORRAL_CLIENT_KEYS": "secret-value-1 priority=max"})
    assert info.value.problems == [
        "client keys: client key 1: priority must be low, normal, high or urgent"
    ]
    keys = tmp_path / "client.keys"
    keys.write_text("file-key-0001 name=ops\n")
    settings = load_config(None, overrides={"auth": {"client_keys_file": str(keys)}}, env={})
    assert [k.name for k in settings.resolved_client_keys().values()] == ["ops"]


def test_rate_limit_is_a_token_bucket_per_key() -> None:
    clock = FakeClock()
    auth = ClientAuth(parse_client_keys("limited-key-1 name=l rate=2"), None, clock=clock)
    client = auth.identify("limited-key-1")
    assert client is not None
    assert [auth.retry_after(client) for _ in range(3)] == [None, None, 1]
    clock.now += 0.5  # one token back
    assert auth.retry_after(client) is None
    assert auth.retry_after(client) == 1


def test_the_admin_key_is_a_client_without_limits() -> None:
    auth = ClientAuth(parse_client_keys("client-key-1"), "the-admin-key")
    admin = auth.identify("the-admin-key")
    assert admin is not None
    assert admin.rate_per_s is None
    assert auth.retry_after(admin) is None


def test_presented_key_and_admin_denial() -> None:
    assert presented_key("k1", "Bearer k2") == "k1"
    assert presented_key(None, "Bearer  k2 ") == "k2"
    assert presented_key(None, "Basic abc") is None
    assert admin_denial("admin", None, "Bearer admin", "10.0.0.1") is None
    assert admin_denial("admin", "wrong", None, "127.0.0.1") == (401, "unauthorized")
    assert admin_denial(None, None, None, "127.0.0.1") is None
    assert admin_denial(None, None, None, "10.0.0.1")[0] == 403  # type: ignore[index]
