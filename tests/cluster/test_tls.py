"""``rediss://``: a cluster's Redis over TLS, with a password, as a managed Redis serves it.

A redis-server with a TLS port only (its certificate signed by a CA made here with the
``openssl`` command, for IP 127.0.0.1), reached with ``rediss://`` and the CA named in the
URL (``?ssl_ca_certs=``), which the Redis client reads as a connection option.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from corral.cluster import Cluster
from tests.cluster.conftest import PASSWORD, REDIS_SERVER, RedisServer, settings
from tests.helpers import until

OPENSSL = shutil.which("openssl")


def make_certificates(directory: Path) -> tuple[Path, Path, Path]:
    """A CA, and a server certificate and key it signed for IP 127.0.0.1."""

    def run(*args: str) -> None:
        assert OPENSSL is not None
        subprocess.run([OPENSSL, *args], cwd=directory, check=True, capture_output=True)

    curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("req", "-x509", *curve, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
        "-subj", "/CN=corral test CA")  # fmt: skip
    run("req", *curve, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-out", "server.pem", "-days", "1", "-extfile", "san.ext")  # fmt: skip
    return directory / "ca.pem", directory / "server.pem", directory / "server.key"


class TlsRedisServer(RedisServer):
    """redis-server with its TLS port only (no plain port), clients not asked for a
    certificate."""

    def __init__(self, executable: str, directory: Path) -> None:
        super().__init__(executable)
        self.ca, self.cert, self.key = make_certificates(directory)

    @property
    def url(self) -> str:
        return f"rediss://:{self.password}@127.0.0.1:{self.port}/0?ssl_ca_certs={self.ca}"

    def listen_args(self) -> list[str]:
        return [
            "--port", "0",
            "--tls-port", str(self.port),
            "--tls-cert-file", str(self.cert),
            "--tls-key-file", str(self.key),
            "--tls-ca-cert-file", str(self.ca),
            "--tls-auth-clients", "no",
        ]  # fmt: skip

    def connect(self) -> socket.socket:
        context = ssl.create_default_context(cafile=str(self.ca))
        raw = socket.create_connection(("127.0.0.1", self.port), timeout=0.5)
        try:
            return context.wrap_socket(raw, server_hostname="127.0.0.1")
        except OSError:
            raw.close()
            raise


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[TlsRedisServer]:
    if REDIS_SERVER is None or OPENSSL is None:
        pytest.skip("needs redis-server and the openssl command")
    server = TlsRedisServer(REDIS_SERVER, tmp_path)
    try:
        server.start()
    except AssertionError:
        server.stop()
        pytest.skip("this redis-server does not serve TLS (built without it)")
    yield server
    server.stop()


async def test_rediss_url_shares_state_over_tls(tls_redis: TlsRedisServer) -> None:
    """Two replicas reach the Redis over TLS, share a change within a second and hold one
    slot fleet-wide; the password is in no log line."""
    replicas = [Cluster(settings(tls_redis.url)) for _ in range(2)]
    tasks = []
    try:
        with capture_logs() as logs:
            for cluster in replicas:
                assert await cluster.connect(), "the replica did not reach Redis over TLS"
                tasks.append(asyncio.create_task(cluster.run()))
            a, b = replicas
            await a.set_state("drains", "gpu0", True)
            await until(lambda: b.state("drains").get("gpu0") is True, 1.0)
            lease = await a.acquire("gpu0", 1)
            assert lease is not None
            assert await b.acquire("gpu0", 1) is None  # the one slot is held fleet-wide
            await a.release(lease)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for cluster in replicas:
            await cluster.close()
    assert "cluster joined" in [entry["event"] for entry in logs]
    assert PASSWORD not in repr(logs)


async def test_rediss_without_the_ca_serves_on_the_local_view(tls_redis: TlsRedisServer) -> None:
    """A certificate the replica cannot verify is an unreachable Redis: the replica does
    not join and still grants slots on its local view."""
    url = tls_redis.url.split("?", 1)[0]  # no ssl_ca_certs: the test CA is not trusted
    cluster = Cluster(settings(url))
    try:
        assert not await cluster.connect()
        assert not cluster.up
        lease = await cluster.acquire("gpu0", 1)
        assert lease is not None
        assert await cluster.acquire("gpu0", 1) is None  # the limit still holds locally
        await cluster.release(lease)
    finally:
        await cluster.close()
