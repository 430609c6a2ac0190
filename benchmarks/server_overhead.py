"""What the HTTP side costs the engine: output tokens/s at high concurrency, offline vs served.

Same engine settings, same requests, interleaved rounds: the engine stepping alone in this
process (`Engine.generate`, no HTTP), then served by `python -m runtime serve` (engine in a
thread beside the aiohttp loop) to N concurrent clients, streaming and not. The clients run in
this process, the server in its own. If served throughput stays close to offline, the engine
thread is not starved by the loop and a separate engine process would buy nothing but IPC.

    python benchmarks/server_overhead.py [--concurrency 64] [--output-tokens 128] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import socket
import statistics
import subprocess
import sys
import time
import urllib.request

import aiohttp
from rich.console import Console
from rich.table import Table

from runtime.config import EngineConfig
from runtime.engine import Engine
from runtime.sequence import SamplingParams

PROMPT_TOKENS = 64


def _engine_flags(cfg: EngineConfig) -> list[str]:
    return [
        "--model", cfg.model, "--max-num-seqs", str(cfg.max_num_seqs),
        "--max-model-len", str(cfg.max_model_len), "--num-kv-blocks", str(cfg.num_kv_blocks),
        "--log-level", "warning",
    ]  # fmt: skip


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 2048) for _ in range(PROMPT_TOKENS)] for _ in range(n)]


def _offline(engine: Engine, prompts: list[list[int]], out: int) -> float:
    params = SamplingParams(max_tokens=out, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    outputs = engine.generate(prompts, params)
    return sum(map(len, outputs)) / (time.perf_counter() - start)


async def _served(base_url: str, prompts: list[list[int]], out: int, stream: bool) -> float:
    async def one(session: aiohttp.ClientSession, prompt: list[int]) -> int:
        body: dict[str, object] = {
            "prompt": prompt, "max_tokens": out, "temperature": 0, "ignore_eos": True,
            "stream": stream,
        }  # fmt: skip
        if stream:
            body["stream_options"] = {"include_usage": True}
        async with session.post(f"{base_url}/v1/completions", json=body) as resp:
            resp.raise_for_status()
            if not stream:
                return int((await resp.json())["usage"]["completion_tokens"])
            tokens = 0
            async for line in resp.content:
                if line.startswith(b"data: {") and b'"choices":[]' in line:
                    tokens = int(line.split(b'"completion_tokens":')[1].split(b",")[0])
            return tokens

    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        start = time.perf_counter()
        counts = await asyncio.gather(*(one(session, p) for p in prompts))
        elapsed = time.perf_counter() - start
    assert all(c == out for c in counts), counts
    return sum(counts) / elapsed


def _wait_healthy(url: str, proc: subprocess.Popen[bytes]) -> None:
    for _ in range(600):
        if proc.poll() is not None:
            sys.exit(f"the server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    sys.exit("the server did not become healthy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--output-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    n, out = args.concurrency, args.output_tokens
    blocks = n * -(-(PROMPT_TOKENS + out) // 16) + 16
    cfg = EngineConfig(model=args.model, max_num_seqs=n, max_model_len=PROMPT_TOKENS + out,
                       num_kv_blocks=blocks)  # fmt: skip
    prompts = _prompts(n)
    engine = Engine(cfg)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "runtime", "serve", "--port", str(port), *_engine_flags(cfg)]
    proc = subprocess.Popen(cmd)
    figures: dict[str, list[float]] = {"offline": [], "served, streaming": [],
                                       "served, not streaming": []}  # fmt: skip
    try:
        _wait_healthy(url, proc)
        asyncio.run(_served(url, prompts[:2], 4, True))  # warm the server's paths
        for _ in range(args.rounds):
            # The server idles while the offline engine runs, and the other way round.
            figures["offline"].append(_offline(engine, prompts, out))
            figures["served, streaming"].append(asyncio.run(_served(url, prompts, out, True)))
            figures["served, not streaming"].append(asyncio.run(_served(url, prompts, out, False)))
    finally:
        proc.terminate()
        proc.wait()
    base = statistics.median(figures["offline"])
    table = Table(title=f"{args.model}: {n} requests at once, {PROMPT_TOKENS} in / {out} out, "
                  f"median of {args.rounds} interleaved rounds")  # fmt: skip
    for column in ("mode", "out tok/s", "min .. max", "vs offline"):
        table.add_column(column, justify="left" if column == "mode" else "right")
    for mode, values in figures.items():
        med = statistics.median(values)
        table.add_row(mode, f"{med:,.0f}", f"{min(values):,.0f} .. {max(values):,.0f}",
                      f"{med / base:.2f}x")  # fmt: skip
    Console().print(table)


if __name__ == "__main__":
    main()
