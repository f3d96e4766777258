"""What a placement costs, in seconds of waiting, on the fleet as it is.

Ollama schedules each server on its own (its ``server/sched.go``): it keeps at most
``OLLAMA_MAX_LOADED_MODELS`` models (3 by default) and as many as fit in VRAM; a request for a
model it does not hold waits for a load; when a load needs room it unloads an idle model (by
keep-alive, then by file name: an order corral cannot see, so corral assumes the worst of
them), and when every loaded model is busy it waits for the first in that order to go idle.
Requests for loaded models go straight to their runner, but every request that needs a load
waits in one queue, one load at a time. So a cold load costs more than its own load time:

- **the request's own wait**: loads already under way there, the wait for a busy model to go
  idle when the server is full, then the load (size / the backend's measured load speed);
- **the stall**: while it waits for a busy model, requests for that model keep it busy, and
  whatever else needs a load there waits behind;
- **the evictions**: a model used there recently will be asked for again, and then it has to
  be loaded back;
- **the sharing**: models on one GPU take turns on its compute (only one model's requests
  batch together), so a model added where others are busy runs slower, and so do they.

Against that stands waiting for a backend that already holds the model: the requests queued
for it, plus this one, times the time a request holds a slot, over the holders' slots.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from corral.balancer.demand import Demand
from corral.fleet import inventory
from corral.fleet.backends import BackendState


@dataclass(frozen=True, slots=True)
class LoadCost:
    """Loading a model on ``backend``: the expected seconds lost, this request's and others'."""

    backend: BackendState
    total_s: float  # own_s + reloads its evictions cost others + sharing the GPU's compute
    own_s: float  # this request's wait: loads ahead, a busy model going idle, the load
    evicts: tuple[str, ...] = ()
    evicts_in_demand: bool = False
    blocked: bool = False  # the server is full of busy models: it waits for one to go idle
    partial: bool = False  # even after evicting every idle model it does not fit in VRAM


def vram_of(entry: dict[str, Any] | None) -> int:
    value = (entry or {}).get("size_vram")
    return value if isinstance(value, int) and value > 0 else 0


class Costs:
    """Prices the choices the router weighs, from :class:`Demand` and the backends' state."""

    def __init__(self, demand: Demand) -> None:
        self.demand = demand

    def stall_s(self, b: BackendState, model: str | None, now: float) -> float:
        """Seconds left of loads under way on ``b`` (other than ``model``'s): a request that
        needs a load there waits for them (Ollama loads one model at a time)."""
        left = 0.0
        for key, since in b.loading.items():
            if key == model:
                continue
            size = b.model_sizes.get(key)
            left = max(left, since + self.demand.load_s(b.id, size) - now)
        return left

    def load_left_s(self, b: BackendState, model: str, now: float) -> float:
        """Seconds until ``model``'s load on ``b`` (started by corral) is expected to end."""
        since = b.loading.get(model)
        if since is None:
            return 0.0
        return since + self.demand.load_s(b.id, _size(b, model)) - now

    def holder_wait_s(self, holders: list[BackendState], model: str, now: float) -> float:
        """Expected wait for a slot on a backend holding ``model`` (every slot taken): the
        requests queued for it and this one, each holding a slot for the mean service time."""
        slots = sum(b.max_concurrent for b in holders)
        if not slots:
            return float("inf")
        service = sum(self.demand.service_s(b.id, model) for b in holders) / len(holders)
        return (self.demand.queued(model) + 1) * service / slots

    def needs_copy(self, holders: list[BackendState], model: str) -> bool:
        """Demand for ``model`` exceeded what its holders serve, averaged over the window: the
        requests in flight for it there and queued for it, against the holders' slots not
        taken by their other models, with at least one request waiting on average."""
        demand = self.demand
        wanted = demand.queued_avg(model)
        room = 0.0
        for b in holders:
            wanted += demand.concurrency(b.id, model)
            others = sum(demand.concurrency(b.id, k) for k in demand.models_on(b.id) if k != model)
            room += max(0.0, b.max_concurrent - others)
        return wanted >= room + 1.0

    def harm_s(self, b: BackendState, model: str, size: int | None) -> float:
        """What unloading ``model`` from ``b`` costs whoever asks for it there next: a reload,
        weighted by how recently and how much it was used there."""
        demand = self.demand
        weight = demand.recency(b.id, model) * max(1.0, demand.concurrency(b.id, model))
        return weight * demand.load_s(b.id, size) if weight else 0.0

    def load(
        self,
        b: BackendState,
        model: str,
        size: int | None,
        now: float,
        max_loaded: int,
        *,
        steered: bool = False,
    ) -> LoadCost:
        """The cost of sending a request for ``model`` (``size`` bytes) to ``b``, which does not
        hold it (or holds it with another context length: it reloads). ``steered``: corral
        unloads the victims itself first, the least harmful ones (else Ollama picks them in
        an order corral cannot see, so the worst is assumed)."""
        demand = self.demand
        resident = b.resident
        present = set(resident) | set(b.loading)
        replacing = model in resident
        count = len(present) - (1 if model in present else 0)
        need_count = max(0, count + 1 - max_loaded) if max_loaded > 0 else 0
        free = b.vram_free_bytes
        if free is not None and replacing:
            free += vram_of(resident.get(model))
        need_bytes = max(0, (size or 0) - free) if free is not None else 0
        busy = demand.busy(b.id)
        harms = {
            k: self.harm_s(b, k, _size(b, k))
            for k in resident
            if k != model and k not in busy and k not in b.loading
        }
        victims: list[str] = [model] if replacing else []
        freed = 0
        sign = 1 if steered else -1
        for key in sorted(harms, key=lambda k: sign * harms[k]):
            if len(victims) - replacing >= need_count and freed >= need_bytes:
                break
            victims.append(key)
            freed += vram_of(resident.get(key))
        blocked = partial = False
        wait_idle = 0.0
        if len(victims) - replacing < need_count or freed < need_bytes:
            waiting_on = [k for k in present if k != model and k in busy]
            if waiting_on and len(victims) - replacing < need_count:
                blocked = True
                first = min(waiting_on, key=lambda k: demand.service_s(b.id, k))
                wait_idle = demand.service_s(b.id, first) / (1 + busy[first])
                victims.append(first)
            elif freed < need_bytes:
                partial = True  # Ollama offloads part of it to the CPU
        load_s = demand.load_s(b.id, size)
        own = self.stall_s(b, model, now) + wait_idle + load_s
        harm = sum(self.harm_s(b, v, _size(b, v)) for v in victims)
        in_demand = any(demand.in_demand(b.id, v) for v in victims)
        # Models on one GPU take turns on its compute (only one model's requests batch): with
        # j other models busy there, its requests run about j+1 times slower, and theirs too.
        sharing = sum(
            1
            for k in demand.models_on(b.id)
            if k != model
            and k not in victims
            and (demand.in_flight(b.id, k) or demand.concurrency(b.id, k) >= 0.5)
        )
        return LoadCost(
            b,
            own + harm + sharing * demand.service_s(b.id, model),
            own,
            tuple(victims),
            in_demand,
            blocked,
            partial,
        )


def _size(b: BackendState, key: str) -> int | None:
    entry = b.resident.get(key)
    size = entry.get("size") if entry else None
    return size if isinstance(size, int) and size > 0 else b.model_sizes.get(key)


def holding(b: BackendState, model: str, num_ctx: int | None) -> str | None:
    """How ``b`` holds ``model`` for a request asking ``num_ctx`` (None: the default):
    "gpu"/"partial"/"cpu" as Ollama's ``/api/ps`` rule says, "loading" while corral's cold
    request loads it, "other_ctx" when its runner has another context length (Ollama
    reloads it for this request), None when it is not loaded there."""
    if model in b.loading:
        return "loading"
    entry = b.resident.get(model)
    if entry is None:
        return None
    if num_ctx is not None:
        ctx = entry.get("context_length")
        if isinstance(ctx, int) and ctx != num_ctx and b.loaded_ctx.get(model) != num_ctx:
            return "other_ctx"
    return inventory.residency(entry.get("size"), entry.get("size_vram"))
