"""corral as ``corral serve`` runs it, but over the aiohttp transport instead of corral.http1:
the ``corral-aiohttp`` target of bench/overhead.py, so the upstream client is chosen by
measurement in the same run.

    python bench/_corral_aiohttp.py --config corral.toml
"""

from __future__ import annotations

import argparse

from corral.app import create_app
from corral.config import load_config
from corral.logs import configure_logging
from corral.server import CorralServer, uvicorn_config
from corral.upstream import AiohttpTransport, Upstream


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", required=True)
    settings = load_config(p.parse_args().config)
    configure_logging(settings.server.log_level, settings.server.log_format)
    upstream = Upstream(settings.timeouts, AiohttpTransport(settings.timeouts.connect_s))
    app = create_app(settings, upstream=upstream)
    CorralServer(uvicorn_config(app, settings), app, None).run()


if __name__ == "__main__":
    main()
