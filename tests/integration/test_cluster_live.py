"""Several corral replicas sharing one real redis-server ([cluster]): slots, state, leader,
outage and ``serve --workers``, end to end on loopback with the simulator as backend."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cluster.conftest import PASSWORD, RedisServer
from tests.helpers import free_port, poll

pytestmark = [pytest.mark.integration, pytest.mark.cluster]

LEASE_S = 1.0
LB = "/api/v1/loadbalancer"
GEN = {"model": "llama3.2", "prompt": "hi", "stream": False}


@pytest.fixture
def redis(redis_server: RedisServer) -> RedisServer:
    """A real redis-server on a free loopback port (tests/conftest.py)."""
    return redis_server


def cluster(redis: RedisServer, name: str = "t") -> dict[str, Any]:
    return {"redis_url": redis.url, "name": name, "lease_s": LEASE_S}


def backend(sim: Any, max_concurrent: int = 2) -> dict[str, Any]:
    # One model at a time: the fleet-wide cap is max_concurrent (see README).
    return {"id": "gpu0", "url": sim.url, "max_concurrent": max_concurrent, "max_loaded_models": 1}


def metric(url: str, name: str) -> float | None:
    text = httpx.get(f"{url}/metrics", timeout=5).text
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return None if found is None else float(found.group(1))


def leading(corral: Any) -> list[Any]:
    """The tasks a replica runs because it leads (placement, replicas, replays)."""
    assert corral.runtime.sync is not None
    return list(corral.runtime.sync.leading)


def healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def generate(url: str) -> int:
    try:
        return httpx.post(f"{url}/api/generate", json=GEN, timeout=30).status_code
    except httpx.HTTPError as exc:
        return -hash(type(exc).__name__) % 1000


def spray(urls: list[str], n: int, workers: int = 12) -> list[int]:
    """``n`` requests spread round-robin over ``urls``, ``workers`` at once: the statuses."""
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(generate, [urls[i % len(urls)] for i in range(n)]))


def test_backend_never_sees_more_than_max_concurrent(
    redis: RedisServer, sim_factory: Any, corral_factory: Any
) -> None:
    """Load spread over three replicas: the backend's own peak stays at max_concurrent."""
    sim = sim_factory(name="a", token_interval_s=0.01, tokens=8, num_parallel=16)
    replicas = [corral_factory([backend(sim)], cluster=cluster(redis)) for _ in range(3)]
    assert all(poll(lambda r=r: healthy(r.url), 10) for r in replicas)
    statuses = spray([r.url for r in replicas], 60)
    assert statuses == [200] * 60
    assert sim.stats()["peak_in_flight"] == 2


def test_state_reaches_the_other_replica_within_a_second(
    redis: RedisServer, sim_factory: Any, corral_factory: Any
) -> None:
    """A strategy PUT, a drain and a registration on A take effect on B within 1 s."""
    a_sim, b_sim = sim_factory(name="a"), sim_factory(name="b")
    a = corral_factory([backend(a_sim)], cluster=cluster(redis))
    b = corral_factory([backend(a_sim)], cluster=cluster(redis))
    with a.client() as ca, b.client() as cb:
        assert ca.put(f"{LB}/strategy", json={"strategy": "round_robin"}).status_code == 200
        assert poll(lambda: cb.get(f"{LB}/strategy").json()["strategy"] == "round_robin", 1)

        assert ca.patch(f"{LB}/backends/gpu0", json={"action": "drain"}).status_code == 200
        assert poll(lambda: b.runtime.registry.get("gpu0").draining, 1)
        ca.patch(f"{LB}/backends/gpu0", json={"action": "enable"})
        assert poll(lambda: not b.runtime.registry.get("gpu0").draining, 1)

        new = {"id": "gpu1", "url": b_sim.url, "max_concurrent": 3, "ttl_s": 30}
        assert ca.post(f"{LB}/backends", json=new).status_code == 201
        assert poll(lambda: "gpu1" in b.runtime.registry, 1)
        assert poll(lambda: b.runtime.registry.get("gpu1").healthy, 1)
        assert b.runtime.registry.get("gpu1").max_concurrent == 3

        assert ca.delete(f"{LB}/backends/gpu1").status_code == 200
        assert poll(lambda: "gpu1" not in b.runtime.registry, 1)


def corral_process(
    tmp_path: Path, name: str, sim: Any, redis: RedisServer, *extra: str, toml: str = ""
) -> tuple[subprocess.Popen[bytes], str, int]:
    port = free_port()
    config = tmp_path / f"{name}.toml"
    config.write_text(
        f'[server]\nport = {port}\nlog_level = "warning"\n'
        f"[health]\ninterval_s = 0.2\ntimeout_s = 1\nfall = 2\nrise = 1\n"
        f'[cluster]\nredis_url = "{redis.url}"\nname = "t"\nlease_s = {LEASE_S}\n'
        f'[[backends]]\nid = "gpu0"\nurl = "{sim.url}"\nmax_concurrent = 2\n'
        f"max_loaded_models = 1\n{toml}"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "corral", "serve", "--config", str(config), *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    assert poll(lambda: healthy(url), 20, 0.05), "corral serve did not become ready"
    return proc, url, port


def kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def test_killed_replica_frees_its_slots_within_lease_s(
    tmp_path: Path, redis: RedisServer, sim_factory: Any, corral_factory: Any
) -> None:
    """SIGKILL of a replica holding both slots: the other sees them free within lease_s."""
    sim = sim_factory(name="a", token_interval_s=0.5, tokens=60)
    proc, url, _ = corral_process(tmp_path, "p", sim, redis)
    other = corral_factory([backend(sim)], cluster=cluster(redis))
    pool = ThreadPoolExecutor(2)
    try:
        for _ in range(2):
            pool.submit(generate, url)
        gpu0 = other.runtime.registry.get("gpu0")
        assert poll(lambda: gpu0.elsewhere == 2, 5)
        kill(proc)
        killed = time.monotonic()
        assert poll(lambda: gpu0.elsewhere == 0, LEASE_S + 1.5, 0.01)
        assert time.monotonic() - killed <= LEASE_S + 1.0  # lease_s, plus a heartbeat's news
        sim.config.token_interval_s, sim.config.tokens = 0.0, 4
        assert generate(other.url) == 200
    finally:
        kill(proc)
        pool.shutdown(wait=False, cancel_futures=True)


def test_killed_leader_hands_placement_over(
    tmp_path: Path, redis: RedisServer, sim_factory: Any, corral_factory: Any
) -> None:
    """SIGKILL of the leader: another replica takes the lock and runs placement."""
    sim = sim_factory(name="a")
    placement = '[placement]\npriority_models = ["llama3.2"]\n'
    proc, url, _ = corral_process(tmp_path, "leader", sim, redis, toml=placement)
    try:
        assert poll(lambda: metric(url, "corral_cluster_leader") == 1.0, 5)
        other = corral_factory(
            [backend(sim)], cluster=cluster(redis), placement={"priority_models": ["llama3.2"]}
        )
        assert not other.runtime.cluster.is_leader
        assert not leading(other)  # placement runs on the leader only
        kill(proc)
        assert poll(lambda: other.runtime.cluster.is_leader, LEASE_S + 1.0, 0.01)
        names = {t.get_name() for t in leading(other) if not t.done()}
        assert {"placement", "replays"} <= names
        assert metric(other.url, "corral_cluster_leader") == 1.0
    finally:
        kill(proc)


def test_redis_stopped_mid_load(redis: RedisServer, sim_factory: Any, corral_factory: Any) -> None:
    """Redis stopped under load: no request fails, corral_cluster_up 0; when it restarts the
    replicas resynchronise (a change made meanwhile reaches the other one)."""
    sim = sim_factory(name="a", token_interval_s=0.005, tokens=4)
    a = corral_factory([backend(sim, 4)], cluster=cluster(redis))
    b = corral_factory([backend(sim, 4)], cluster=cluster(redis))
    assert poll(lambda: healthy(a.url) and healthy(b.url), 10)
    urls = [a.url, b.url]
    with ThreadPoolExecutor(1) as load:
        running = load.submit(spray, urls, 150, 6)
        time.sleep(0.3)
        redis.stop()
        assert poll(lambda: metric(a.url, "corral_cluster_up") == 0.0, 3)
        assert poll(lambda: metric(b.url, "corral_cluster_up") == 0.0, 3)
        statuses = running.result(60)
    assert statuses == [200] * 150
    # A change while Redis is away applies locally and is written at the resync.
    with a.client() as ca:
        assert ca.put(f"{LB}/strategy", json={"strategy": "round_robin"}).status_code == 200
    assert b.runtime.router.strategy_name != "round_robin"
    redis.start()
    assert poll(lambda: metric(a.url, "corral_cluster_up") == 1.0, 5)
    assert poll(lambda: b.runtime.router.strategy_name == "round_robin", 5)
    assert spray(urls, 10) == [200] * 10


def test_workers_share_one_port_and_the_slots(
    tmp_path: Path, redis: RedisServer, sim_factory: Any
) -> None:
    """``serve --workers 2``: two processes answer on one port and share the slots."""
    sim = sim_factory(name="a", token_interval_s=0.01, tokens=8, num_parallel=16)
    proc, url, _ = corral_process(tmp_path, "w", sim, redis, "--workers", "2")
    try:
        # Every fresh connection lands on one worker or the other (SO_REUSEPORT).
        def ready_everywhere() -> bool:
            return all(healthy(url) for _ in range(8))

        assert poll(ready_everywhere, 20)
        n = 41  # odd: the two workers' counts cannot be equal
        statuses = spray([url], n)
        assert statuses == [200] * n
        assert sim.stats()["peak_in_flight"] == 2
        # Each worker counts its own requests: fresh connections see two different counts.
        seen = set()
        for _ in range(40):
            with httpx.Client(base_url=url, timeout=5) as c:
                seen.add(c.get(f"{LB}/loads").json()["loads"]["gpu0"]["total_connections"])
            if len(seen) == 2:
                break
        assert len(seen) == 2
        assert sum(seen) == n
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        finally:
            kill(proc)
    assert proc.returncode == 0


def test_workers_refused_without_redis(tmp_path: Path) -> None:
    """``--workers 2`` without [cluster] redis_url: one line on stderr, exit 2."""
    config = tmp_path / "c.toml"
    config.write_text(f"[server]\nport = {free_port()}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    done = subprocess.run(
        [sys.executable, "-m", "corral", "serve", "--config", str(config), "--workers", "2"],
        capture_output=True,
        env=env,
        timeout=30,
    )
    assert done.returncode == 2
    assert done.stderr.decode().strip().count("\n") == 0
    assert "redis_url" in done.stderr.decode()


def test_client_key_rate_is_one_bucket_for_the_fleet(
    tmp_path: Path, redis: RedisServer, sim_factory: Any, corral_factory: Any
) -> None:
    """A key with rate=2 used on A and B in turn: the fleet lets through what one bucket of 2
    (plus its refill) allows, fewer than two replicas' own buckets would; a 429 says when."""
    keys = tmp_path / "keys"
    keys.write_text("slow-key-0123456789 name=slow rate=2\n")
    sim = sim_factory(name="a", tokens=2)
    auth = {"client_keys_file": str(keys)}
    a = corral_factory([backend(sim, 4)], cluster=cluster(redis), auth=auth)
    b = corral_factory([backend(sim, 4)], cluster=cluster(redis), auth=auth)
    assert poll(lambda: healthy(a.url) and healthy(b.url), 10)
    headers = {"Authorization": "Bearer slow-key-0123456789"}
    answers: list[httpx.Response] = []
    with a.client(headers=headers) as ca, b.client(headers=headers) as cb:
        started = time.monotonic()
        for i in range(8):
            answers.append((ca, cb)[i % 2].post("/api/generate", json=GEN))
        elapsed = time.monotonic() - started
    statuses = [r.status_code for r in answers]
    assert set(statuses) <= {200, 429}, statuses
    # One bucket: a burst of 2, refilled at 2 a second (+1 for a token half-refilled).
    allowed = statuses.count(200)
    assert 2 <= allowed <= 2 + int(2 * elapsed) + 1, (statuses, elapsed)
    # Two buckets of their own would have let 4 through, plus each one's refill.
    assert allowed < 4 + int(2 * elapsed), (statuses, elapsed)
    refused = [r for r in answers if r.status_code == 429]
    assert {i % 2 for i, r in enumerate(answers) if r.status_code == 429} == {0, 1}
    for r in refused:
        assert int(r.headers["retry-after"]) >= 1
        assert "slow" in r.text


def test_a_missed_delete_is_owed_fleet_wide_and_replayed_once(
    redis: RedisServer, sim_factory: Any, corral_factory: Any
) -> None:
    """A fleet delete on the leader A while gpu1 is down: B's models view shows what gpu1 owes
    within a second. When gpu1 comes back for B only, B leaves it owed (a follower never
    replays); once A reaches gpu1 too, A alone replays it: gpu1 gets one delete, A's metrics
    count it, B's do not, and both views forget it."""
    from tests.chaos.relay import Relay

    model = "qwen2.5:7b"
    sim, target = sim_factory(name="a"), sim_factory(name="b")
    # Each replica reaches gpu1 by its own network path, cut and restored here (health probes
    # are per replica: each knows what it reaches).
    paths = [Relay(target.port).start(), Relay(target.port).start()]

    def fleet(path: Relay) -> list[dict[str, Any]]:
        return [backend(sim), {"id": "gpu1", "url": path.url, "max_concurrent": 2}]

    def deletes() -> int:
        return int(target.stats()["by_route"].get("/api/delete", 0))

    def owed(client: httpx.Client) -> list[dict[str, Any]]:
        replays: list[dict[str, Any]] = client.get(f"{LB}/models").json()["replays"]
        return replays

    try:
        a = corral_factory(fleet(paths[0]), cluster=cluster(redis))
        assert poll(lambda: a.runtime.cluster.is_leader, 5)
        b = corral_factory(fleet(paths[1]), cluster=cluster(redis))
        assert not b.runtime.cluster.is_leader
        assert metric(a.url, "corral_cluster_leader") == 1.0
        assert metric(b.url, "corral_cluster_leader") == 0.0
        gpu1 = [r.runtime.registry.get("gpu1") for r in (a, b)]
        assert poll(lambda: all(g.healthy for g in gpu1), 5)
        for path in paths:
            path.stop()
        assert poll(lambda: not any(g.healthy for g in gpu1), 5)

        with a.client() as ca, b.client() as cb:
            gone = ca.request("DELETE", "/api/delete", json={"model": model})
            assert (gone.status_code, gone.json()) == (200, {"skipped": ["gpu1"]})
            assert poll(lambda: len(owed(cb)) == 1, 1)
            [entry] = owed(cb)
            assert (entry["backend"], entry["action"], entry["model"]) == ("gpu1", "delete", model)
            assert entry["reason"] == "down"

            paths[1].restore()  # B reaches gpu1 again; A does not yet
            assert poll(lambda: gpu1[1].healthy, 5)

            # Two replay rounds (one a second) in which a replaying follower would act.
            def replayed() -> bool:
                return deletes() > 0 or not owed(ca) or not owed(cb)

            assert not poll(replayed, 2.0), "the follower replayed"

            paths[0].restore()
            assert poll(lambda: not owed(ca) and not owed(cb), 10)
        assert deletes() == 1
        done = 'corral_model_replays_total{action="delete",backend="gpu1",outcome="done"}'
        assert metric(a.url, re.escape(done)) == 1.0
        assert metric(b.url, re.escape(done)) is None
        assert not leading(b)  # the follower runs no replays
    finally:
        for path in paths:
            path.stop()


def test_the_leader_forgets_an_expired_registration(
    redis: RedisServer, sim_factory: Any, corral_factory: Any
) -> None:
    """A backend registered on A with ttl_s and no heartbeat leaves B's list after the ttl,
    and the fleet's shared state forgets it (a replica joining later does not bring it back)."""
    sim, other = sim_factory(name="a"), sim_factory(name="b")
    a = corral_factory([backend(sim)], cluster=cluster(redis))
    b = corral_factory([backend(sim)], cluster=cluster(redis))
    ttl_s = 1.0
    with a.client() as ca, b.client() as cb:

        def listed(client: httpx.Client) -> set[str]:
            backends = client.get(f"{LB}/backends").json()["backends"]
            return {e["instance_id"] for e in backends}

        new = {"id": "gpu1", "url": other.url, "max_concurrent": 2, "ttl_s": ttl_s}
        assert ca.post(f"{LB}/backends", json=new).status_code == 201
        registered = time.monotonic()
        assert poll(lambda: "gpu1" in listed(cb), 1)
        assert poll(lambda: "gpu1" not in listed(cb), ttl_s + 2, 0.05)
        assert time.monotonic() - registered >= ttl_s * 0.9
        assert poll(lambda: "gpu1" not in listed(ca), 1)
    for replica in (a, b):
        assert poll(lambda r=replica: "gpu1" not in r.runtime.cluster.state("backends"), 1)
        assert poll(lambda r=replica: "gpu1" not in r.runtime.cluster.state("heartbeats"), 1)
    late = corral_factory([backend(sim)], cluster=cluster(redis))
    assert "gpu1" not in late.runtime.registry


def test_a_cancelled_stream_gives_its_fleet_wide_slot_back(
    redis: RedisServer, sim_factory: Any, corral_factory: Any
) -> None:
    """A client that goes away mid-stream frees its slot fleet-wide: both replicas' loads show
    0 in flight, and max_concurrent requests are served at once afterwards."""
    sim = sim_factory(name="a", token_interval_s=0.05, tokens=200, num_parallel=8)
    a = corral_factory([backend(sim)], cluster=cluster(redis))
    b = corral_factory([backend(sim)], cluster=cluster(redis))
    assert poll(lambda: healthy(a.url) and healthy(b.url), 10)

    def active(replica: Any) -> int:
        with replica.client() as client:
            return int(client.get(f"{LB}/loads").json()["loads"]["gpu0"]["active_connections"])

    with a.client() as ca, ca.stream("POST", "/api/generate", json={**GEN, "stream": True}) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        next(lines), next(lines)  # two tokens: the slot is held
        assert active(a) == 1
        assert poll(lambda: active(b) == 1, 1)
    # The client is gone (the stream and its connection closed mid-generation).
    assert poll(lambda: active(a) == 0 and active(b) == 0, 3)
    assert poll(lambda: sim.stats()["in_flight"] == 0, 3)
    sim.config.token_interval_s, sim.config.tokens = 0.1, 4
    before = sim.stats()["peak_in_flight"]
    assert before <= 2
    assert spray([a.url, b.url], 4, workers=4) == [200] * 4
    assert sim.stats()["peak_in_flight"] == 2


assert PASSWORD  # the fixtures' password protects every Redis these tests start
