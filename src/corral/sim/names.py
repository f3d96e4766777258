"""Ollama model names: ``[host/][namespace/]model[:tag]`` with defaults
``registry.ollama.ai``, ``library`` and ``latest``; matching is case-insensitive."""

from __future__ import annotations

import re
from typing import NamedTuple

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"

_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,79}$")
_HOST = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(:[0-9]+)?$")


class Name(NamedTuple):
    """A parsed model name."""

    host: str
    namespace: str
    model: str
    tag: str

    @property
    def short(self) -> str:
        """The shortest display form, as Ollama lists it (``llama3.2:latest``, ``u/m:t``)."""
        if self.host.lower() != DEFAULT_HOST:
            return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"
        if self.namespace.lower() != DEFAULT_NAMESPACE:
            return f"{self.namespace}/{self.model}:{self.tag}"
        return f"{self.model}:{self.tag}"

    @property
    def full(self) -> str:
        """The fully qualified form (``registry.ollama.ai/library/m:tag``) used in some errors."""
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}"

    @property
    def key(self) -> str:
        """The case-insensitive lookup key."""
        return self.short.lower()


def parse_name(raw: str) -> Name | None:
    """Parse a model name; None when it is not a valid Ollama name."""
    if not raw or len(raw) > 350:
        return None
    if raw.rsplit("/", 1)[-1].count(":") >= 2 and raw.lower().endswith(":local"):
        raw = raw[: -len(":local")]  # name:tag:local is the local name:tag
    slash = raw.rfind("/")
    colon = raw.rfind(":")
    tag = DEFAULT_TAG
    rest = raw
    if colon > slash:
        rest, tag = raw[:colon], raw[colon + 1 :]
        if not _PART.match(tag):
            return None
    parts = rest.split("/")
    host, namespace = DEFAULT_HOST, DEFAULT_NAMESPACE
    if len(parts) == 1:
        model = parts[0]
    elif len(parts) == 2:
        namespace, model = parts
    elif len(parts) == 3:
        host, namespace, model = parts
        if not _HOST.match(host):
            return None
    else:
        return None
    if not _PART.match(model) or not _PART.match(namespace):
        return None
    return Name(host, namespace, model, tag)


def short_name(raw: str) -> str:
    """The display form of ``raw``, or ``raw`` itself when it does not parse."""
    name = parse_name(raw)
    return name.short if name else raw


def name_key(raw: str) -> str | None:
    """The lookup key of ``raw``; None when it is not a valid name."""
    name = parse_name(raw)
    return name.key if name else None


def owner_of(raw: str) -> str:
    """The namespace that /v1/models reports as ``owned_by``."""
    name = parse_name(raw)
    return name.namespace if name else DEFAULT_NAMESPACE
