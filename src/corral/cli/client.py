"""The admin API client the client commands share: ``--url``/``--admin-key``, one call to a
running corral's ``/api/v1/loadbalancer``, and polling it for ``--watch``.

Every failure becomes one ``error: ...`` line on stderr and exit code 1: ``fetch`` raises
ApiError with that line, ``call`` prints it and exits (``fail``)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Annotated, Any, NoReturn, TypeVar

import httpx
import typer

from corral.cli.render import err
from corral.errors import CorralError

UrlOpt = Annotated[str, typer.Option("--url", envvar="CORRAL_URL", help="URL of a running corral.")]
KeyOpt = Annotated[
    str | None,
    typer.Option("--admin-key", envvar="CORRAL_ADMIN_KEY", help="Admin key.", show_default=False),
]
DEFAULT_URL = "http://127.0.0.1:11434"
API = "/api/v1/loadbalancer"
KEY_HOW = "pass --admin-key KEY or set CORRAL_ADMIN_KEY"

T = TypeVar("T")


class ApiError(CorralError):
    """Why a call to a running corral failed, worded as the line the user sees."""

    def __init__(self, message: str, *, unreachable: bool = False) -> None:
        super().__init__(message)
        self.unreachable = unreachable


def _client(url: str, key: str | None, timeout_s: float) -> httpx.Client:
    headers = {"X-API-Key": key} if key else {}
    return httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)


def _why(exc: Exception) -> str:
    if isinstance(exc, httpx.UnsupportedProtocol):
        return "the URL must start with http:// or https://"
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer in time ({type(exc).__name__})"
    return str(exc) or type(exc).__name__


def _detail(resp: httpx.Response) -> str | None:
    """The error text of a corral answer (FastAPI's ``detail``), None if it is not one."""
    try:
        body = resp.json()
    except ValueError:
        return None
    if not isinstance(body, dict) or "detail" not in body:
        return None
    detail = body["detail"]
    if isinstance(detail, list):  # request validation: one entry per bad field
        return "; ".join(_invalid_field(d) for d in detail)
    return str(detail)


def _invalid_field(entry: Any) -> str:
    if not isinstance(entry, dict):
        return str(entry)
    where = [str(p) for p in entry.get("loc", []) if p not in ("body", "query", "path")]
    message = str(entry.get("msg", entry))
    return f"{'.'.join(where)}: {message}" if where else message


def fetch(
    url: str,
    key: str | None,
    method: str,
    path: str,
    body: Any = None,
    *,
    params: dict[str, str] | None = None,
    timeout_s: float = 10.0,
) -> Any:
    """One admin API call: its JSON answer, or ApiError with the one line to show."""
    try:
        with _client(url, key, timeout_s) as client:
            resp = client.request(method, path, json=body, params=params)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise ApiError(f"cannot reach corral at {url}: {_why(exc)}", unreachable=True) from None
    if resp.status_code == 401:
        if key:
            raise ApiError(f"401: the admin key was refused (wrong key?); {KEY_HOW}")
        raise ApiError(f"401: this corral needs an admin key; {KEY_HOW}")
    detail = _detail(resp)
    if resp.status_code == 404 and detail in (None, "Not Found"):
        # Not corral's own 404 (an unknown backend): the URL is not a corral, or an older one.
        raise ApiError(f"404: {url} has no {path}: is it a corral (and a recent one)?")
    if resp.status_code >= 400:
        text = detail if detail is not None else (resp.text.strip()[:200] or resp.reason_phrase)
        raise ApiError(f"{resp.status_code}: {text}")
    try:
        return resp.json()
    except ValueError:
        raise ApiError(f"{url}{path} did not answer JSON: is it a corral?") from None


def fail(message: str) -> NoReturn:
    """Print ``error: message`` on stderr and exit 1."""
    err.print(f"error: {message}", markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def call(
    url: str,
    key: str | None,
    method: str,
    path: str,
    body: Any = None,
    timeout_s: float = 10.0,
    params: dict[str, str] | None = None,
) -> Any:
    """``fetch``, printing the error line and exiting 1 when it fails."""
    try:
        return fetch(url, key, method, path, body, params=params, timeout_s=timeout_s)
    except ApiError as exc:
        fail(str(exc))


def poll(get: Callable[[], T], interval_s: float) -> Iterator[T | ApiError]:
    """``get()`` now, then again ``interval_s`` after the caller took each result, until it
    stops: each answer, or the ApiError of a corral it could not reach (to show and retry).
    Any other ApiError (401, ...) is raised."""
    while True:
        try:
            yield get()
        except ApiError as exc:
            if not exc.unreachable:
                raise
            yield exc
        time.sleep(interval_s)
