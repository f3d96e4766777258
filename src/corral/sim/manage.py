"""Ollama's model-management and listing routes: /, /api/version, /api/tags, /api/ps,
/api/show, /api/pull, /api/push, /api/create, /api/copy, /api/delete, /api/blobs/{digest}."""

from __future__ import annotations

import asyncio
import hashlib
import re
from collections.abc import Callable
from typing import Any

from corral.sim.config import SimModel
from corral.sim.core import Sim
from corral.sim.names import name_key, parse_name, short_name
from corral.sim.store import show_json
from corral.sim.wire import (
    NDJSON_TYPE,
    TEXT_TYPE,
    Exchange,
    HTTPError,
    check_types,
    decode_body,
    dumps,
)

NO_MANIFEST = "pull model manifest: file does not exist"
_DIGEST = re.compile(r"^sha256[:-]([0-9a-fA-F]{64})$")
# The small layers of a GGUF model (template, license, params, config) and their sizes.
_SMALL_LAYERS = (("template", 1429), ("license", 7711), ("params", 96), ("config", 561))


async def root(sim: Sim, ex: Exchange) -> None:
    """HEAD|GET /: the liveness answer."""
    await ex.respond(200, b"Ollama is running", TEXT_TYPE)


async def version(sim: Sim, ex: Exchange) -> None:
    """HEAD|GET /api/version."""
    await ex.json({"version": sim.config.version})


async def tags(sim: Sim, ex: Exchange) -> None:
    """HEAD|GET /api/tags (``models`` is ``[]`` when empty, never null)."""
    await ex.json({"models": sim.store.tags()})


async def ps(sim: Sim, ex: Exchange) -> None:
    """GET /api/ps."""
    await ex.json({"models": sim.scheduler.ps()})


def _name_field(body: dict[str, Any], struct: str) -> str:
    check_types(
        body,
        struct,
        {
            "model": "string",
            "name": "string",
            "stream": "bool",
            "insecure": "bool",
            "verbose": "bool",
        },
    )
    value: str = body.get("model") or body.get("name") or ""
    return value


async def show(sim: Sim, ex: Exchange) -> None:
    """POST /api/show."""
    body = decode_body(ex.raw, "ShowRequest")
    raw = _name_field(body, "ShowRequest")
    ex.record.model = raw
    if not raw:
        raise HTTPError(400, "model is required")
    found = sim.find(raw)
    if found is None:
        raise HTTPError(404, f"model '{short_name(raw)}' not found")
    await ex.json(show_json(found[1], bool(body.get("verbose"))))


async def _progress(
    sim: Sim,
    ex: Exchange,
    lines: list[dict[str, Any]],
    stream: bool,
    error: str | None = None,
    commit: Callable[[], None] | None = None,
) -> None:
    """Stream progress objects then ``error`` if any; without streaming answer only the last
    object, or a 500 with the error (Ollama's ``waitForStream``). ``commit`` runs just before
    the last line, so a client gone earlier leaves nothing half-done."""
    delay = sim.config.pull_delay_s
    if not stream:
        if delay > 0:
            await asyncio.sleep(delay * len(lines))
        if error is not None:
            raise HTTPError(500, error)
        if commit is not None:
            commit()
        await ex.json(lines[-1])
        return
    for i, obj in enumerate(lines):
        if i and delay > 0:
            await asyncio.sleep(delay)
        if i == len(lines) - 1 and commit is not None and error is None:
            commit()
        await ex.emit(dumps(obj) + b"\n", NDJSON_TYPE)
    if error is None:
        await ex.end()
    elif not ex.started:
        raise HTTPError(500, error)
    else:
        ex.record.error = error
        await ex.end(dumps({"error": error}) + b"\n")


def _layers(model: SimModel) -> list[tuple[str, int]]:
    """(digest, size) of each layer: the weights, then the small ones."""

    def digest(kind: str) -> str:
        return "sha256:" + hashlib.sha256(f"{model.name}/{kind}".encode()).hexdigest()

    small = sum(size for _, size in _SMALL_LAYERS)
    weights = max(1, model.size_bytes - small)
    return [(digest("weights"), weights)] + [(digest(k), s) for k, s in _SMALL_LAYERS]


async def pull(sim: Sim, ex: Exchange) -> None:
    """POST /api/pull: Ollama's progress sequence, then the model is listed in /api/tags."""
    body = decode_body(ex.raw, "PullRequest")
    raw = _name_field(body, "PullRequest")
    ex.record.model = raw
    name = parse_name(raw)
    if name is None:
        raise HTTPError(400, "invalid model name")
    stream = body.get("stream") is not False
    lines: list[dict[str, Any]] = [{"status": "pulling manifest"}]
    template = sim.registry.get(name.key)
    if template is None:
        await _progress(sim, ex, lines, stream, NO_MANIFEST)
        return
    for i, (digest, total) in enumerate(_layers(template)):
        status = {"status": f"pulling {digest[7:19]}", "digest": digest, "total": total}
        if i == 0:  # the big layer ticks; "completed" is omitted while it is 0
            lines.append(dict(status))
            lines += [{**status, "completed": total * k // 4} for k in (1, 2, 4)]
        else:
            lines.append({**status, "completed": total})
    lines += [
        {"status": "verifying sha256 digest"},
        {"status": "writing manifest"},
        {"status": "success"},
    ]
    pulled = template.renamed(template.name)
    await _progress(sim, ex, lines, stream, commit=lambda: sim.store.add(pulled))


async def push(sim: Sim, ex: Exchange) -> None:
    """POST /api/push: progress for every layer of a local model."""
    body = decode_body(ex.raw, "PushRequest")
    raw = _name_field(body, "PushRequest")
    ex.record.model = raw
    if not raw:
        raise HTTPError(400, "model is required")
    if parse_name(raw) is None:
        raise HTTPError(400, "invalid model name")
    stream = body.get("stream") is not False
    lines: list[dict[str, Any]] = [{"status": "retrieving manifest"}]
    found = sim.find(raw)
    if found is None:
        await _progress(sim, ex, lines, stream, f"open manifest for {raw}: file does not exist")
        return
    for digest, total in _layers(found[1]):
        lines.append({"status": "starting upload", "digest": digest, "total": total})
        lines.append(
            {
                "status": f"pushing {digest[7:19]}",
                "digest": digest,
                "total": total,
                "completed": total,
            }
        )
    lines += [{"status": "pushing manifest"}, {"status": "success"}]
    await _progress(sim, ex, lines, stream)


def _blob_key(raw: str) -> str:
    m = _DIGEST.match(raw)
    if m is None:
        raise HTTPError(400, "invalid digest format")
    return "sha256:" + m.group(1).lower()


async def create(sim: Sim, ex: Exchange) -> None:
    """POST /api/create from an existing model (``from``) or uploaded blobs (``files``)."""
    body = decode_body(ex.raw, "CreateRequest")
    check_types(
        body,
        "CreateRequest",
        {
            "model": "string",
            "name": "string",
            "from": "string",
            "files": "object",
            "stream": "bool",
            "quantize": "string",
            "system": "string",
            "template": "string",
        },
    )
    raw = body.get("model") or body.get("name") or ""
    ex.record.model = raw
    name = parse_name(raw)
    if name is None:
        raise HTTPError(400, "invalid model name")
    source, files = body.get("from") or "", body.get("files") or {}
    if not source and not files:
        raise HTTPError(400, "neither 'from' or 'files' was specified")
    lines: list[dict[str, Any]] = []
    if source:
        found = sim.find(source)
        if found is None:
            raise HTTPError(404, f"model '{source}' not found")
        base = found[1]
        lines.append({"status": f"using existing layer {_layers(base)[0][0]}"})
        model = base.renamed(name.short)
    else:
        lines.append({"status": "parsing GGUF"})
        total = 0
        for digest in files.values():
            key = _blob_key(str(digest))
            if key not in sim.store.blobs:
                raise HTTPError(400, f"blob {key} not found")
            total += sim.store.blobs[key]
            lines.append({"status": f"using existing layer {key}"})
        model = SimModel(name.short, max(total, 1))
    if body.get("quantize"):
        lines.append(
            {
                "status": f"quantizing F16 model to {body['quantize']}",
                "digest": "0",
                "total": model.size_bytes,
                "completed": model.size_bytes,
            }
        )
    for field in ("template", "system", "license", "parameters", "messages"):
        if body.get(field):
            layer = hashlib.sha256(dumps(body[field])).hexdigest()
            lines.append({"status": f"creating new layer sha256:{layer}"})
    lines += [{"status": "writing manifest"}, {"status": "success"}]
    stream = body.get("stream") is not False
    await _progress(sim, ex, lines, stream, commit=lambda: sim.store.add(model))


async def copy(sim: Sim, ex: Exchange) -> None:
    """POST /api/copy: the copy shares the source's manifest (and digest)."""
    body = decode_body(ex.raw, "CopyRequest")
    check_types(body, "CopyRequest", {"source": "string", "destination": "string"})
    source: str = body.get("source") or ""
    dest: str = body.get("destination") or ""
    ex.record.model = source
    if parse_name(source) is None:
        raise HTTPError(400, f'source "{source}" is invalid')
    dest_name = parse_name(dest)
    if dest_name is None:
        raise HTTPError(400, f'destination "{dest}" is invalid')
    found = sim.find(source)
    if found is None:
        raise HTTPError(404, f'model "{source}" not found')
    copied = found[1].renamed(dest_name.short)
    copied.digest = found[1].digest
    sim.store.add(copied)
    await ex.empty()


async def delete(sim: Sim, ex: Exchange) -> None:
    """DELETE /api/delete (a JSON body on DELETE); also unloads the model."""
    body = decode_body(ex.raw, "DeleteRequest")
    raw = _name_field(body, "DeleteRequest")
    ex.record.model = raw
    key = name_key(raw)
    if key is None:
        raise HTTPError(400, f'name "{raw}" is invalid')
    found = sim.find(raw)
    if found is None:
        raise HTTPError(404, f"model '{raw}' not found")
    sim.store.remove(found[1])
    sim.scheduler.expire(found[0])
    await ex.empty()


async def blob(sim: Sim, ex: Exchange) -> None:
    """HEAD|POST /api/blobs/{digest}: existence check, or upload checked against the digest."""
    key = _blob_key(ex.param)
    if ex.method == "HEAD":
        if key in sim.store.blobs:
            await ex.empty()
        else:
            await ex.json({"error": f'blob "{key}" not found'}, 404)
        return
    if key in sim.store.blobs:
        await ex.empty(200)
        return
    got = "sha256:" + hashlib.sha256(ex.raw).hexdigest()
    if got != key:
        raise HTTPError(400, f'digest mismatch, expected "{key}", got "{got}"')
    sim.store.blobs[key] = len(ex.raw)
    await ex.empty(201)
