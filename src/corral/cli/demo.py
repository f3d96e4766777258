"""``corral demo``: corral in front of two simulated GPUs, all in one process."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import httpx
import uvicorn
from rich.console import Console

from corral.config import load_config
from corral.logs import configure_logging
from corral.server import build_server

console = Console()


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _sim_server(
    name: str, port: int, ttft_s: float, token_interval_s: float, gpu_name: str, vram_gib: int
) -> uvicorn.Server:
    from corral.sim import SimConfig, create_sim_app
    from corral.sim.config import GIB

    sim = create_sim_app(
        SimConfig(
            name=name,
            ttft_s=ttft_s,
            token_interval_s=token_interval_s,
            num_parallel=4,
            vram_bytes=vram_gib * GIB,
            gpu_name=gpu_name,
        )
    )
    config = uvicorn.Config(
        sim,
        host="127.0.0.1",
        port=port,
        loop="none",
        http="httptools",
        access_log=False,
        log_level="warning",
        lifespan="off",
    )
    return uvicorn.Server(config)


async def _wait_started(server: uvicorn.Server, task: asyncio.Task[None]) -> None:
    while not server.started:
        if task.done():
            raise SystemExit(f"a demo server failed to start: {task.exception()!r}")
        await asyncio.sleep(0.02)


def _banner(url: str, fast: int, slow: int) -> None:
    console.print(f"\n[bold green]corral is running at {url}[/bold green]", highlight=False)
    console.print(
        f"in front of two simulated GPUs: gpu0 (a fast 80 GB GPU, 127.0.0.1:{fast}) and "
        f"gpu1 (a slow 24 GB GPU, 127.0.0.1:{slow}); their GPU stats come from each "
        "simulator's DCGM-exporter page\n",
        highlight=False,
    )
    console.print("Try it:", style="bold")
    commands = [
        f"curl {url}/api/generate"
        + ' -d \'{"model": "llama3.2", "prompt": "Why is the sky blue?"}\'',
        f"OLLAMA_HOST={url} .venv/bin/python -c "
        "\"import ollama; print(ollama.chat(model='llama3.2', "
        "messages=[{'role': 'user', 'content': 'hi'}]).message.content)\"",
        f"CORRAL_URL={url} .venv/bin/corral status",
        f".venv/bin/corral gpus --url {url}",
        f"curl {url}/metrics",
        f"open {url}/ui in a browser: the status page\n",
    ]
    for command in commands:
        # Whole lines (the terminal wraps them; rich does not break them), so that each can be
        # copied and pasted as it is.
        console.print(f"  {command}", highlight=False, markup=False, soft_wrap=True)


async def _demo(port: int, strategy: str) -> None:
    if not _port_free(port):
        raise SystemExit(
            f"port {port} is taken (is Ollama running?); try: corral demo --port {port + 100}"
        )
    fast_port, slow_port = _free_port(), _free_port()
    settings = load_config(
        None,
        overrides={
            "server": {"host": "127.0.0.1", "port": port, "log_level": "warning"},
            "balancer": {"strategy": strategy},
            "health": {"interval_s": 2},
            "gpu": {"poll_s": 1},
            "backends": [
                {
                    "id": "gpu0",
                    "url": f"http://127.0.0.1:{fast_port}",
                    "max_concurrent": 4,
                    "gpu_metrics_url": f"http://127.0.0.1:{fast_port}/_sim/dcgm",
                },
                {
                    "id": "gpu1",
                    "url": f"http://127.0.0.1:{slow_port}",
                    "max_concurrent": 2,
                    "gpu_metrics_url": f"http://127.0.0.1:{slow_port}/_sim/dcgm",
                },
            ],
        },
    )
    configure_logging("warning", "console")
    servers = [
        _sim_server(
            "gpu0-fast",
            fast_port,
            ttft_s=0.05,
            token_interval_s=0.02,
            gpu_name="Simulated H100 80GB",
            vram_gib=80,
        ),
        _sim_server(
            "gpu1-slow",
            slow_port,
            ttft_s=0.3,
            token_interval_s=0.08,
            gpu_name="Simulated L4 24GB",
            vram_gib=24,
        ),
    ]
    corral = build_server(settings)
    corral.config.loop = "none"
    tasks = []
    for server in [*servers, corral]:
        task = asyncio.create_task(server.serve())
        tasks.append(task)
        await _wait_started(server, task)
    url = f"http://127.0.0.1:{port}"
    _banner(url, fast_port, slow_port)
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        prompts = ["Why is the sky blue?", "Name a colour.", "Say hi."] * 2
        await asyncio.gather(
            *(
                client.post(
                    "/api/generate", json={"model": "llama3.2", "prompt": p, "stream": False}
                )
                for p in prompts
            )
        )
        loads = (await client.get("/api/v1/loadbalancer/loads")).json()
    from corral.cli.render import load_table

    console.print(load_table(loads))
    console.print("\nPress Ctrl-C to stop.", style="dim")
    try:
        await tasks[-1]
    finally:
        for server in servers:
            server.should_exit = True
        with contextlib.suppress(Exception):
            await asyncio.gather(*tasks[:-1])


def run_demo(port: int = 11434, strategy: str = "least_connections") -> None:
    import uvloop

    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(_demo(port, strategy))
