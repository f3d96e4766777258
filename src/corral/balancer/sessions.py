"""Conversation affinity: requests of one chat go to the backend that holds its prompt cache.

A conversation is named by the client's ``X-Session-ID`` header, else by a hash of its system
prompt(s) and first user turn, which every later turn of the chat repeats. Only later turns
follow their conversation's backend (see :func:`continues`). Ollama keeps the
processed prompt of each parallel slot, so the next turn sent to the same backend skips
re-reading the whole history.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from typing import Any

from corral.fleet.backends import Clock

MAX_SESSIONS = 10_000
SESSION_TTL_S = 1800.0
_CHAT_ROUTES = frozenset({"chat", "v1_chat", "v1_messages"})


def session_key(header: str | None, route: str, data: dict[str, Any]) -> str | None:
    """The conversation a request belongs to, or None (no affinity)."""
    if header:
        return "h:" + header[:256]
    if route not in _CHAT_ROUTES:
        return None
    messages = data.get("messages")
    if not isinstance(messages, list):
        return None
    digest = hashlib.blake2b(digest_size=16)
    user_seen = False
    for message in messages:
        if not isinstance(message, dict):
            return None
        role = message.get("role")
        if role in ("system", "developer") or (role == "user" and not user_seen):
            content = message.get("content")
            text = content if isinstance(content, str) else json.dumps(content, sort_keys=True)
            digest.update(f"{role}\0{text}\0".encode(errors="replace"))
            if role == "user":
                user_seen = True
        if user_seen:
            break
    if not user_seen:
        return None
    return "c:" + digest.hexdigest()


def continues(data: dict[str, Any]) -> bool:
    """The chat already has an answer in it (a later turn): its backend holds its context.

    A first turn has nothing cached anywhere to follow: many users who open with the same
    words share its key but are not one conversation, and are placed as any request is. Its
    backend is remembered once it answered, for the turns that follow."""
    messages = data.get("messages")
    return isinstance(messages, list) and any(
        isinstance(m, dict) and m.get("role") == "assistant" for m in messages
    )


class SessionMap:
    """Conversation → backend id (and the tokens its context held after its last answer),
    least recently used first out, forgotten after a TTL."""

    def __init__(
        self,
        *,
        max_size: int = MAX_SESSIONS,
        ttl_s: float = SESSION_TTL_S,
        clock: Clock = time.monotonic,
    ) -> None:
        self._items: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._tokens: dict[str, int] = {}
        self._max = max_size
        self._ttl = ttl_s
        self._clock = clock

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str) -> str | None:
        found = self._items.get(key)
        if found is None:
            return None
        backend_id, at = found
        if self._clock() - at > self._ttl:
            del self._items[key]
            self._tokens.pop(key, None)
            return None
        return backend_id

    def tokens(self, key: str) -> int:
        """The tokens the conversation's context held after its last answer (0: unknown)."""
        return self._tokens.get(key, 0)

    def note_tokens(self, key: str, tokens: int) -> None:
        """The conversation's last answer left ``tokens`` in its backend's prompt cache."""
        if key in self._items:
            self._tokens[key] = tokens

    def put(self, key: str, backend_id: str) -> None:
        self._items[key] = (backend_id, self._clock())
        self._items.move_to_end(key)
        while len(self._items) > self._max:
            gone, _ = self._items.popitem(last=False)
            self._tokens.pop(gone, None)
