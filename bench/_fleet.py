"""corral in front of simulated backends, all subprocesses: the owner scale.py and soak.py
share (balance.py's ``Bench`` plus simulators started together and a corral from a config)."""

from __future__ import annotations

import os

from _procs import Proc, free_port, http, wait_until
from affinity import BACKEND_TOML, _ready
from balance import PY, Bench

SERVER_TOML = """\
[server]
host = "127.0.0.1"
port = {port}
log_level = "warning"
log_format = "json"

[gpu]
enabled = false

[placement]
enabled = false
"""


class Fleet(Bench):
    """Starts ``sim0``..``simN-1`` (``self.sims``: name -> URL) and corral; stops them all."""

    def sim_options(self) -> list[str]:
        """The simulators' options beyond port and name."""
        return []

    def sim_argv(self, name: str, port: int) -> list[str]:
        return [
            *[PY, "-m", "corral.sim", "--port", str(port), "--name", name],
            *self.sim_options(),
        ]

    def start_sims(self, count: int) -> None:
        """Start them all, then wait for each (they start in parallel)."""
        started = []
        for i in range(count):
            name, port = f"sim{i}", free_port()
            started.append((name, port, self.spawn(name, self.sim_argv(name, port))))
        for name, port, proc in started:
            url = f"http://127.0.0.1:{port}"
            wait_until(lambda u=url: http("GET", u + "/api/version") == 200, proc, name)
            self.sims[name] = url

    def start_corral(
        self, name: str, sections: str, backends: dict[str, str], slots: int
    ) -> tuple[Proc, str]:
        """corral with ``SERVER_TOML``, ``sections`` (more TOML) and ``backends`` (id -> URL,
        ``slots`` each), once every backend is healthy."""
        port = free_port()
        text = SERVER_TOML.format(port=port) + sections
        for bid, url in backends.items():
            text += BACKEND_TOML.format(id=bid, url=url, slots=slots)
        conf = self.dir / f"{name}.toml"
        conf.write_text(text)
        # No CORRAL_* from the caller's environment: the config file is the whole truth.
        env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
        proc = self.spawn(name, [PY, "-m", "corral", "serve", "--config", str(conf)], env)
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _ready(url, len(backends), 0), proc, f"{name} backends")
        return proc, url
