"""[[discovery]]: backends found in DNS join, leave (drained, then removed) and come back;
a failed lookup changes nothing. DNS goes through a stub resolver: no lookup leaves the test."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from structlog.testing import capture_logs

from corral.config import BackendSettings, DiscoverySettings, Target, load_config, parse_target
from corral.errors import ConfigError
from corral.fleet.backends import BackendRegistry, BackendState
from corral.fleet.discovery import Discovery, Endpoint, ResolutionError, SystemResolver
from corral.fleet.gpu.sampler import NullSampler
from corral.runtime import Runtime
from corral.upstream import Upstream
from tests.helpers import FakeClock, FakeTransport, forbid_sockets, until


class StubResolver:
    """Answers from dicts the test edits; a name mapped to an exception raises it."""

    def __init__(self) -> None:
        self.hosts: dict[str, list[str] | Exception] = {}
        self.srv: dict[str, list[tuple[str, int]] | Exception] = {}
        self.asked: list[str] = []

    async def addresses(self, host: str, port: int) -> list[str]:
        self.asked.append(host)
        answer = self.hosts.get(host, ResolutionError(f"{host}: no such name"))
        if isinstance(answer, Exception):
            raise answer
        return list(answer)

    async def services(self, name: str) -> list[tuple[str, int]]:
        self.asked.append(name)
        answer = self.srv.get(name, ResolutionError(f"{name}: no such name"))
        if isinstance(answer, Exception):
            raise answer
        return list(answer)


@pytest.fixture(autouse=True)
def _no_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    forbid_sockets(monkeypatch)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def dns() -> StubResolver:
    return StubResolver()


def discovery(
    registry: BackendRegistry,
    dns: StubResolver,
    clock: FakeClock,
    name: str = "ollama.ai.svc:11434",
    drain_timeout_s: float = 60,
    **fields: Any,
) -> Discovery:
    settings = DiscoverySettings(dns=name, **fields)
    return Discovery(registry, settings, drain_timeout_s=drain_timeout_s, resolver=dns, clock=clock)


def ids(registry: BackendRegistry) -> list[str]:
    return sorted(registry.ids())


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    with capture_logs() as captured:
        yield captured


def events(logs: list[dict[str, Any]], level: str | None = None) -> list[str]:
    return [e["event"] for e in logs if level is None or e["log_level"] == level]


@pytest.mark.parametrize(
    ("dns", "target"),
    [
        ("ollama.ai.svc:11434", Target("ollama.ai.svc", 11434)),
        ("ollama", Target("ollama", 11434)),
        ("_ollama._tcp.ollama.ai.svc", Target("_ollama._tcp.ollama.ai.svc", None)),
        ("[fd00::7]:8080", Target("fd00::7", 8080)),
        ("ollama.ai.svc.cluster.local.:11434", Target("ollama.ai.svc.cluster.local.", 11434)),
    ],
)
def test_the_dns_setting_names_a_host_and_port_or_an_srv_name(dns: str, target: Target) -> None:
    """host:port reads A/AAAA at that port, _service._proto.name reads SRV, a bare name is
    Ollama's port."""
    assert parse_target(dns) == target


@pytest.mark.parametrize("dns", ["ollama:http", "ollama:0", "ollama:70000", ":11434"])
def test_a_bad_dns_setting_is_a_config_error(dns: str) -> None:
    """Told when the configuration is read, as every other config error."""
    with pytest.raises(ConfigError, match=r"discovery\.0\.dns"):
        load_config(None, overrides={"discovery": [{"dns": dns}]}, env={})


async def test_pods_that_appear_are_added_with_the_entrys_settings(
    dns: StubResolver, clock: FakeClock, logs: list[dict[str, Any]]
) -> None:
    """Each address is one backend at the port, configured from the [[discovery]] entry, with
    its DCGM exporter URL filled in; none is registered (so none goes to the state file)."""
    dns.hosts["ollama.ai.svc"] = ["10.0.0.7", "10.0.0.8"]
    registry = BackendRegistry(clock=clock)
    d = discovery(
        registry,
        dns,
        clock,
        max_concurrent=2,
        max_loaded_models=1,
        gpu_metrics_url="http://{host}:9400/metrics",
    )
    await d.refresh()
    assert ids(registry) == ["ollama-10-0-0-7-11434", "ollama-10-0-0-8-11434"]
    b = registry.get("ollama-10-0-0-7-11434")
    assert b.url == "http://10.0.0.7:11434"
    assert (b.max_concurrent, b.max_loaded_models) == (2, 1)
    assert b.gpu_metrics_url == "http://10.0.0.7:9400/metrics"
    assert not b.registered
    assert not b.dynamic
    assert not b.healthy  # it takes requests once the health checker's probe succeeded
    assert events(logs).count("discovered backend added") == 2


async def test_ids_are_stable_and_valid_backend_ids(dns: StubResolver, clock: FakeClock) -> None:
    """The same address gets the same id every round and in another corral; IPv6 too; every
    id passes BackendSettings' own rules."""
    dns.hosts["ollama-long-service-name-for-gpus.ai.svc"] = [
        "fd00:1234:5678:9abc:def0:1234:5678:9abc"
    ]
    registry = BackendRegistry(clock=clock)
    name = "ollama-long-service-name-for-gpus.ai.svc:65535"
    d = discovery(registry, dns, clock, name=name)
    await d.refresh()
    await d.refresh()
    [only] = registry.ids()
    again = discovery(BackendRegistry(), dns, clock, name=name)
    await again.refresh()
    assert again.registry.ids() == [only]
    assert only == "ollama-long-servic-fd00-1234-5678-9abc-def0-1234-5678-9abc-65535"
    BackendSettings(id=only, url="http://[fd00::1]:1")  # valid: no ValidationError
    assert registry.get(only).url == "http://[fd00:1234:5678:9abc:def0:1234:5678:9abc]:65535"


async def test_a_pod_that_vanishes_is_drained_then_removed_when_idle(
    dns: StubResolver, clock: FakeClock, logs: list[dict[str, Any]]
) -> None:
    """Gone from DNS with a request in flight: drained (no new requests), kept until that
    request ends, then removed."""
    dns.hosts["ollama.ai.svc"] = ["10.0.0.7", "10.0.0.8"]
    registry = BackendRegistry(clock=clock)
    d = discovery(registry, dns, clock)
    await d.refresh()
    busy = registry.get("ollama-10-0-0-8-11434")
    registry.reserve(busy)
    dns.hosts["ollama.ai.svc"] = ["10.0.0.7"]
    await d.refresh()
    assert busy.draining
    assert "ollama-10-0-0-8-11434" in registry
    assert not registry.get("ollama-10-0-0-7-11434").draining
    registry.release(busy)
    await d.refresh()
    assert ids(registry) == ["ollama-10-0-0-7-11434"]
    assert events(logs) == [
        "discovered backend added",
        "discovered backend added",
        "discovered backend left DNS; drained",
        "discovered backend removed",
    ]


async def test_an_idle_pod_that_vanishes_goes_at_once(dns: StubResolver, clock: FakeClock) -> None:
    dns.hosts["ollama.ai.svc"] = ["10.0.0.7", "10.0.0.8"]
    registry = BackendRegistry(clock=clock)
    d = discovery(registry, dns, clock)
    await d.refresh()
    dns.hosts["ollama.ai.svc"] = ["10.0.0.8"]
    await d.refresh()
    assert ids(registry) == ["ollama-10-0-0-8-11434"]


async def test_a_busy_pod_is_removed_after_the_drain_timeout(
    dns: StubResolver, clock: FakeClock
) -> None:
    """server.drain_timeout_s bounds the wait: then it goes with its requests still running."""
    dns.hosts["ollama.ai.svc"] = ["10.0.0.7", "10.0.0.8"]
    registry = BackendRegistry(clock=clock)
    d = discovery(registry, dns, clock, drain_timeout_s=30)
    await d.refresh()
    registry.reserve(registry.get("ollama-10-0-0-7-11434"))
    dns.hosts["ollama.ai.svc"] = ["10.0.0.8"]
    await d.refresh()
    clock.now += 29
    await d.refresh()
    assert "ollama-10-0-0-7-11434" in registry
    clock.now += 1
    await d.refresh()
    assert ids(registry) == ["ollama-10-0-0-8-11434"]


async def test_a_drained_pod_goes_as_soon_as_its_last_request_ends(
    dns: StubResolver, clock: FakeClock
) -> None:
    """While run() runs, a freed slot removes an idle drained backend without waiting for the
    next round."""
    dns.hosts["ollama.ai.svc"] = ["10.0.0.7", "10.0.0.8"]
    registry = BackendRegistry(clock=clock)
    d = discovery(registry, dns, clock, interval_s=3600)
    await d.refresh()
    busy = registry.get("ollama-10-0-0-7-11434")
    registry.reserve(busy)
    dns.hosts["ollama.ai.svc"] = ["10.0.0.8"]
    await d.refresh()
    task = asyncio.create_task(d.run())
    try:
        await asyncio.sleep(0)
        assert busy.id in registry
        registry.release(busy)
        await until(lambda: busy.id not in registry)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert d.rounds == 2  # run() did not resolve again: refresh() had run


async def test_a_pod_that_comes_back_before_removal_is_enabled(
    dns: StubResolver, clock: FakeClock, logs: list[dict[str, Any]]
) -> None:
    dns.hosts["ollama.ai.svc"] = ["10.0.0.7"]
    registry = BackendRegistry(clock=clock)
    d = discovery(registry, dns, clock)
    await d.refresh()
    b = registry.get("ollama-10-0-0-7-11434")
    registry.reserve(b)
    dns.hosts["ollama.ai.svc"] = ["10.0.0.9"]
    await d.refresh()
    assert b.draining
    dns.hosts["ollama.ai.svc"] = ["10.0.0.7", "10.0.0.9"]
    await d.refresh()
    assert registry.get(b.id) is b  # the same backend: its state and counters kept
    assert not b.draining
    assert "discovered backend back in DNS" in events(logs)
    clock.now += 3600
    registry.release(b)
    await d.refresh()
    assert ids(registry) == ["ollama-10-0-0-7-11434", "ollama-10-0-0-9-11434"]


async def test_a_pod_removed_then_seen_again_is_added_anew(
    dns: StubResolver, clock: FakeClock
) -> None:
    dns.hosts["ollama.ai.svc"] = ["10.0.0.7"]
    registry = BackendRegistry(clock=clock)
    d = discovery(registry, dns, clock)
    await d.refresh()
    dns.hosts["ollama.ai.svc"] = ["10.0.0.8"]
    await d.refresh()
    dns.hosts["ollama.ai.svc"] = ["10.0.0.7", "10.0.0.8"]
    await d.refresh()
    assert ids(registry) == ["ollama-10-0-0-7-11434", "ollama-10-0-0-8-11434"]
    assert not registry.get("ollama-10-0-0-7-11434").draining


async def test_a_backend_an_admin_drained_stays_drained_when_it_comes_back(
    dns: StubResolver, clock: FakeClock
) -> None:
    dns.hosts["ollama.ai.svc"] = ["10.0.0.7", "10.0.0.8"]
    registry = BackendRegistry(clock=clock)
    d = discovery(registry, dns, clock)
    await d.refresh()
    b = registry.get("ollama-10-0-0-7-11434")
    registry.drain(b.id)  # PATCH {"action": "drain"}
    registry.reserve(b)
    dns.hosts["ollama.ai.svc"] = ["10.0.0.8"]
    await d.refresh()
    dns.hosts["ollama.ai.svc"] = ["10.0.0.7", "10.0.0.8"]
    await d.refresh()
    assert b.draining


@pytest.mark.parametrize(
    "failure",
    [
        ResolutionError("ollama.ai.svc: no such name"),
        ResolutionError("ollama.ai.svc: no answer within 5s"),
        [],  # an empty answer: a DNS hiccup must not empty the fleet
    ],
    ids=["nxdomain", "timeout", "empty"],
)
async def test_a_failed_lookup_keeps_the_fleet_and_is_logged_once(
    dns: StubResolver,
    clock: FakeClock,
    logs: list[dict[str, Any]],
    failure: list[str] | Exception,
) -> None:
    """Several failed rounds: no backend drained or removed, one warning for the episode, one
    line when DNS answers again; the next episode is told again."""
    dns.hosts["ollama.ai.svc"] = ["10.0.0.7", "10.0.0.8"]
    registry = BackendRegistry(clock=clock)
    d = discovery(registry, dns, clock)
    await d.refresh()
    dns.hosts["ollama.ai.svc"] = failure
    for _ in range(5):
        clock.now += 10
        await d.refresh()
    assert ids(registry) == ["ollama-10-0-0-7-11434", "ollama-10-0-0-8-11434"]
    assert not any(b.draining for b in registry.all())
    warnings = events(logs, "warning")
    assert warnings == ["DNS lookup failed; discovered backends kept as they are"]
    assert d.failures == 5
    dns.hosts["ollama.ai.svc"] = ["10.0.0.7", "10.0.0.8"]
    await d.refresh()
    assert "DNS lookup works again" in events(logs, "info")
    dns.hosts["ollama.ai.svc"] = failure
    await d.refresh()
    assert len(events(logs, "warning")) == 2


async def test_srv_records_name_targets_and_ports(dns: StubResolver, clock: FakeClock) -> None:
    """Each SRV target is resolved to its addresses, each at the record's port."""
    dns.srv["_ollama._tcp.ollama.ai.svc"] = [
        ("ollama-0.ollama.ai.svc.cluster.local", 11434),
        ("ollama-1.ollama.ai.svc.cluster.local", 11435),
    ]
    dns.hosts["ollama-0.ollama.ai.svc.cluster.local"] = ["10.0.0.7"]
    dns.hosts["ollama-1.ollama.ai.svc.cluster.local"] = ["10.0.0.8"]
    registry = BackendRegistry(clock=clock)
    d = discovery(registry, dns, clock, name="_ollama._tcp.ollama.ai.svc")
    await d.refresh()
    assert {b.id: b.url for b in registry.all()} == {
        "ollama-10-0-0-7-11434": "http://10.0.0.7:11434",
        "ollama-10-0-0-8-11435": "http://10.0.0.8:11435",
    }
    dns.hosts["ollama-1.ollama.ai.svc.cluster.local"] = ResolutionError("timeout")
    await d.refresh()  # one target failed: the round changes nothing
    assert len(registry) == 2
    dns.hosts["ollama-1.ollama.ai.svc.cluster.local"] = ["10.0.0.8"]
    dns.srv["_ollama._tcp.ollama.ai.svc"] = [("ollama-1.ollama.ai.svc.cluster.local", 11435)]
    await d.refresh()
    assert ids(registry) == ["ollama-10-0-0-8-11435"]


async def test_a_dual_stack_pod_is_one_backend(dns: StubResolver, clock: FakeClock) -> None:
    """A and AAAA records of the same pods: the IPv4 addresses only, or each GPU would count
    twice; an IPv6-only name uses its IPv6 addresses."""
    dns.hosts["ollama.ai.svc"] = ["10.0.0.7", "fd00::7", "fe80::1%eth0"]
    dns.hosts["v6.ai.svc"] = ["fd00::8"]
    registry = BackendRegistry(clock=clock)
    await discovery(registry, dns, clock).refresh()
    await discovery(registry, dns, clock, name="v6.ai.svc:11434").refresh()
    assert ids(registry) == ["ollama-10-0-0-7-11434", "v6-fd00--8-11434"]
    assert registry.get("v6-fd00--8-11434").url == "http://[fd00::8]:11434"


async def test_a_clash_with_a_configured_backend_is_skipped_and_told_once(
    dns: StubResolver, clock: FakeClock, logs: list[dict[str, Any]]
) -> None:
    """A configured backend at the same URL is not doubled, nor taken over: discovery leaves it
    alone when that address leaves DNS."""
    configured = BackendState(id="gpu0", url="http://10.0.0.7:11434")
    registry = BackendRegistry([configured], clock=clock)
    dns.hosts["ollama.ai.svc"] = ["10.0.0.7", "10.0.0.8"]
    d = discovery(registry, dns, clock)
    await d.refresh()
    await d.refresh()
    assert ids(registry) == ["gpu0", "ollama-10-0-0-8-11434"]
    assert events(logs, "warning") == [
        "discovered address skipped: another backend has its id or URL"
    ]
    dns.hosts["ollama.ai.svc"] = ["10.0.0.8"]
    await d.refresh()
    assert registry.get("gpu0") is configured
    assert not configured.draining


def test_a_bad_gpu_metrics_template_is_a_config_error() -> None:
    entry = {"dns": "ollama:11434", "gpu_metrics_url": "{host}:9400"}
    with pytest.raises(ConfigError, match=r"discovery\.0\.gpu_metrics_url"):
        load_config(None, overrides={"discovery": [entry]}, env={})


# The system resolver, with the lookups stubbed -----------------------------------------------


async def test_the_system_resolver_reads_getaddrinfo_in_a_thread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[Any, ...]] = []

    def getaddrinfo(host: str, port: int, *args: Any, **kw: Any) -> list[Any]:
        calls.append((host, port))
        tcp = (socket.SOCK_STREAM, socket.IPPROTO_TCP, "")
        return [
            (socket.AF_INET, *tcp, ("10.0.0.7", port)),
            (socket.AF_INET6, *tcp, ("fd00::7", port, 0, 0)),
            (socket.AF_INET, *tcp, ("10.0.0.7", port)),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    assert await SystemResolver().addresses("ollama.test", 11434) == ["10.0.0.7", "fd00::7"]
    assert calls == [("ollama.test", 11434)]


async def test_the_system_resolver_turns_lookup_errors_into_resolution_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def nxdomain(*args: Any, **kw: Any) -> list[Any]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", nxdomain)
    with pytest.raises(ResolutionError, match="Name or service not known"):
        await SystemResolver().addresses("nowhere.test", 11434)


async def test_a_hung_lookup_times_out_and_is_not_started_twice(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """getaddrinfo cannot be cancelled: a round that comes while it still runs waits for the
    same lookup instead of starting another thread."""
    import threading

    release = threading.Event()
    started: list[str] = []

    def hang(host: str, port: int, *args: Any, **kw: Any) -> list[Any]:
        started.append(host)
        release.wait(5)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.7", port))]

    monkeypatch.setattr(socket, "getaddrinfo", hang)
    resolver = SystemResolver(timeout_s=0.05)
    for _ in range(2):
        with pytest.raises(ResolutionError, match="no answer within"):
            await resolver.addresses("slow.test", 11434)
    release.set()
    assert await resolver.addresses("slow.test", 11434) == ["10.0.0.7"]
    assert started == ["slow.test"]


class _Srv:
    def __init__(self, target: str, port: int) -> None:
        import dns.name

        self.target = dns.name.from_text(target)
        self.port = port


async def test_the_system_resolver_reads_srv_records_with_dnspython() -> None:
    """Relative names are searched in the pod's domains; a "." target (no service) is left
    out; dnspython's errors become ResolutionError."""
    import dns.resolver

    asked: list[tuple[str, str, dict[str, Any]]] = []
    answers: list[Any] = [
        [_Srv("ollama-0.ollama.ai.svc.cluster.local.", 11434), _Srv(".", 0)],
        dns.resolver.NXDOMAIN(),
    ]

    class FakeDns:
        async def resolve(self, name: str, rdtype: str, **kw: Any) -> Any:
            asked.append((name, rdtype, kw))
            answer = answers.pop(0)
            if isinstance(answer, Exception):
                raise answer
            return answer

    resolver = SystemResolver()
    resolver._dns = FakeDns()
    assert await resolver.services("_ollama._tcp.ollama") == [
        ("ollama-0.ollama.ai.svc.cluster.local", 11434)
    ]
    assert asked[0][:2] == ("_ollama._tcp.ollama", "SRV")
    assert asked[0][2]["search"] is True
    with pytest.raises(ResolutionError, match="no such name"):
        await resolver.services("_ollama._tcp.ollama")


# In the runtime: probed like any other backend, then routed to ------------------------------


async def test_the_runtime_discovers_probes_and_routes_to_pods() -> None:
    """With only a [[discovery]] entry, corral starts with the pods DNS names, probes them
    (health checker) and routes requests to them; the state file never lists them."""
    settings = load_config(
        None,
        overrides={
            "server": {"log_level": "warning"},
            "gpu": {"enabled": False},
            "placement": {"enabled": False},
            "discovery": [{"dns": "ollama:11434", "interval_s": 3600}],
        },
        env={},
    )
    fake = FakeTransport().ollama("http://10.0.0.7:11434", "m").ollama("http://10.0.0.8:11434", "m")
    dns = StubResolver()
    dns.hosts["ollama"] = ["10.0.0.7", "10.0.0.8"]
    runtime = Runtime(
        settings, upstream=Upstream(settings.timeouts, transport=fake), gpu_sampler=NullSampler()
    )
    [d] = runtime.discovery
    d.resolver = dns
    await runtime.start()
    try:
        assert ids(runtime.registry) == ["ollama-10-0-0-7-11434", "ollama-10-0-0-8-11434"]
        assert all(b.healthy and b.models == {"m:latest"} for b in runtime.registry.all())
        picked = {runtime.router.pick("m", "m:latest", "chat", session=None).id for _ in "ab"}
        assert picked <= set(runtime.registry.ids())
        assert picked
        # A pod that appears later is probed by the health checker's own rounds.
        fake.ollama("http://10.0.0.9:11434", "m")
        dns.hosts["ollama"] = ["10.0.0.7", "10.0.0.8", "10.0.0.9"]
        await d.refresh()
        new = runtime.registry.get("ollama-10-0-0-9-11434")
        await until(lambda: new.healthy, timeout_s=3)
        assert [r.url for r in fake.requests if "10.0.0.9" in r.url]
    finally:
        await runtime.stop()
    assert runtime.state is None


async def test_discovered_backends_are_not_written_to_the_state_file(tmp_path: Any) -> None:
    state = tmp_path / "state.json"
    settings = load_config(
        None,
        overrides={
            "server": {"state_file": str(state)},
            "gpu": {"enabled": False},
            "discovery": [{"dns": "ollama:11434"}],
        },
        env={},
    )
    runtime = Runtime(settings, upstream=Upstream(settings.timeouts, transport=FakeTransport()))
    [d] = runtime.discovery
    dns = StubResolver()
    dns.hosts["ollama"] = ["10.0.0.7"]
    d.resolver = dns
    await d.refresh()
    assert runtime.registry.ids() == ["ollama-10-0-0-7-11434"]
    assert not state.exists() or '"ollama-10-0-0-7-11434"' not in state.read_text()


def test_endpoint_ids_follow_the_name(clock: FakeClock) -> None:
    """The id's prefix is the service's name (its first label that is not _service/_proto)."""
    d = discovery(BackendRegistry(), StubResolver(), clock, name="_gpu._tcp.my_ollama.ai.svc")
    assert d.backend_id(Endpoint("10.1.2.3", 80)) == "my_ollama-10-1-2-3-80"
    d = discovery(BackendRegistry(), StubResolver(), clock, name="10.0.0.7:11434")
    assert d.backend_id(Endpoint("10.0.0.7", 11434)) == "discovered-10-0-0-7-11434"
