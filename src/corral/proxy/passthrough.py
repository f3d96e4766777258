"""Routes that are no model's: Ollama's account routes and its experimental web routes, each
passed to one backend as they came and answered as it answers.

- ``/api/me``, ``/api/signout``, ``DELETE /api/user/keys/{key}``, ``/api/status`` act on the
  ollama.com account a backend is signed in with: they go to ``[account] backend`` (else the
  first healthy backend in config order) and need the admin key.
- ``/api/experimental/web_search``, ``web_fetch`` and ``model-recommendations`` go to any
  healthy backend, the least busy with such, behind client keys like inference.
"""

from __future__ import annotations

import time

from corral.asgi import Receive, Scope, Send, request_id
from corral.auth import admin_refusal
from corral.errors import NoBackendError, RequestError, RoutingError, UpstreamError
from corral.fleet.backends import BackendRegistry, BackendState
from corral.proxy.bodies import Bodies, refusal_headers
from corral.proxy.relay import Reply
from corral.proxy.request import Result, forwarded_headers
from corral.upstream import Upstream

ACCOUNT = {"/api/me": ("POST",), "/api/signout": ("POST",), "/api/status": ("GET",)}
ACCOUNT_PREFIX = "/api/user/keys/"  # DELETE /api/user/keys/{key}
WEB = {
    "/api/experimental/web_search": ("POST",),
    "/api/experimental/web_fetch": ("POST",),
    "/api/experimental/model-recommendations": ("GET",),
}


class Passthrough:
    """Forwards a request to one chosen backend and relays its answer."""

    def __init__(
        self,
        registry: BackendRegistry,
        upstream: Upstream,
        *,
        account_backend: str | None,
        admin_key: str | None,
        bodies: Bodies,
    ) -> None:
        self.registry = registry
        self.upstream = upstream
        self.account_backend = account_backend
        self.admin_key = admin_key
        self.bodies = bodies
        self._busy: dict[str, int] = {}

    async def account(self, scope: Scope, receive: Receive, send: Send) -> None:
        """An account route: the admin's, on the account backend."""
        reply = Reply(send, request_id(scope))
        refused = admin_refusal(self.admin_key, scope)
        if refused is not None:
            await reply.error(*refused)
            return
        try:
            backend = self._account()
        except NoBackendError as exc:
            await reply.fail(exc)
            return
        await self._forward(scope, receive, reply, backend)

    async def web(self, scope: Scope, receive: Receive, send: Send) -> None:
        """An experimental web route: any healthy backend, the least busy with such."""
        reply = Reply(send, request_id(scope))
        now = time.monotonic()
        up = [b for b in self.registry.all() if b.available(now)]
        if not up:
            await reply.fail(NoBackendError("no healthy backend available"))
            return
        backend = min(up, key=lambda b: self._busy.get(b.id, 0))
        self._busy[backend.id] = self._busy.get(backend.id, 0) + 1
        try:
            await self._forward(scope, receive, reply, backend)
        finally:
            self._busy[backend.id] -= 1

    def _account(self) -> BackendState:
        backends = self.registry.all()
        if self.account_backend is not None:
            named = next((b for b in backends if b.id == self.account_backend), None)
            if named is None or not named.healthy:
                raise NoBackendError(f"the account backend {self.account_backend!r} is down")
            return named
        found = next((b for b in backends if b.healthy), None)
        if found is None:
            raise NoBackendError("no healthy backend available")
        return found

    async def _forward(
        self, scope: Scope, receive: Receive, reply: Reply, backend: BackendState
    ) -> None:
        started = time.perf_counter()
        held = self.bodies.read(scope, receive)
        try:
            body = await held.take()
        except RequestError as exc:
            await reply.error(exc.status, str(exc), refusal_headers(exc))
            return
        try:
            if body is not None:  # None: the client left
                await self._send_on(scope, reply, backend, body, started)
        finally:
            held.release()

    async def _send_on(
        self, scope: Scope, reply: Reply, backend: BackendState, body: bytes, started: float
    ) -> None:
        path = scope["path"]
        query = scope.get("query_string") or b""
        if query:
            path += "?" + query.decode("latin-1")
        headers = forwarded_headers(scope["headers"], reply.request_id)
        try:
            resp = await self.upstream.open(
                scope["method"], backend.url + path, headers, body if body else None
            )
        except UpstreamError as exc:
            await reply.fail(_unreachable(backend, exc))
            return
        try:
            await reply.relay(resp, backend.id, Result(), started, self.upstream.timeouts.idle_s)
        except UpstreamError as exc:
            await reply.fail(_unreachable(backend, exc))
        finally:
            resp.close()


def _unreachable(backend: BackendState, exc: UpstreamError) -> RoutingError:
    error = RoutingError(f"backend {backend.id} unreachable: {exc}")
    error.status = exc.status
    return error
