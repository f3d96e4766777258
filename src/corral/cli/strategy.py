"""``corral strategy [NAME]``: show or switch a running corral's balancing strategy."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from corral.cli.client import API, DEFAULT_URL, KeyOpt, UrlOpt, call
from corral.cli.render import JsonOpt, say


def strategy(
    name: Annotated[
        str | None, typer.Argument(help="New strategy; omit to show the current one.")
    ] = None,
    url: UrlOpt = DEFAULT_URL,
    admin_key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show or switch the balancing strategy at runtime."""
    if name is None:
        data = call(url, admin_key, "GET", f"{API}/strategy")
    else:
        data = call(url, admin_key, "PUT", f"{API}/strategy", {"strategy": name})
    if as_json:
        print(json.dumps(data))
    else:
        say(data.get("message") or data["strategy"])
