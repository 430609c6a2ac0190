"""A bounded soak of the bundled engine behind its server: hundreds of mixed requests, hostile
and abandoned ones among them, and afterwards nothing may be left behind.

The tiny model is served in-process so that the engine itself can be inspected once idle: no
sequence left in its scheduler, every KV block free by the block manager's own accounting, the
server's event loop back to the tasks it had before, and this process's memory (server, engine
and client together) about where it was after the warm-up round. The KV cache is small enough
that full batches preempt, so blocks are also handed back and forth under load.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import json
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
import psutil
import pytest

from tests.runtime.test_server import Served, get, wait_until

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from runtime.engine import Engine

NUM_REQUESTS = 600
WARMUP_REQUESTS = 96
CONCURRENCY = 32
HOSTILE_SHARE = 0.15
DROP_SHARE = 0.15
RSS_GROWTH_BOUND_MIB = 150.0
# A round takes seconds; one the engine cannot finish (leaked blocks stall admission) would
# otherwise hang until pytest's timeout.
ROUND_TIMEOUT_S = 60.0
IDLE_TIMEOUT_S = 15.0
HANDLER = "RequestHandler.start"  # aiohttp's task for one connection

WORDS = "the model serves a request from the queue while each block of the cache waits".split()

# Bodies the server must refuse with a 4xx and an OpenAI error object, whatever the endpoint.
# Each is (path, raw body, content type).
OK = {"prompt": "The server", "max_tokens": 4}
CHAT_OK = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}


def _json(body: object) -> bytes:
    return json.dumps(body).encode()


HOSTILE: list[tuple[str, bytes, str]] = [
    ("completions", b'{"prompt": "The server", ', "application/json"),  # cut short
    ("completions", b"\xff\xfe{\x00", "application/json"),  # not UTF-8
    ("completions", b"[1, 2, 3]", "application/json"),
    ("completions", b"", "application/json"),
    ("completions", b"prompt=The+server&max_tokens=4", "application/x-www-form-urlencoded"),
    ("completions", b'{"prompt": "x", "temperature": NaN}', "application/json"),
    ("completions", b"[" * 100_000, "application/json"),  # deeper than json's recursion
    # JSON's escape for a lone UTF-16 surrogate: valid JSON, but no text a tokenizer takes.
    ("completions", b'{"prompt": "\\ud800", "max_tokens": 4}', "application/json"),
    ("chat/completions", b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
     "application/json"),
    ("completions", _json({"prompt": [5] * 400_000, "max_tokens": 4}), "application/json"),
    ("completions", _json({**OK, "max_tokens": -5}), "application/json"),
    ("completions", _json({**OK, "max_tokens": 0}), "application/json"),
    ("completions", _json({**OK, "max_tokens": "4"}), "application/json"),
    ("completions", _json({**OK, "max_tokens": 2.5}), "application/json"),
    ("completions", _json({**OK, "max_tokens": 10**9}), "application/json"),
    ("completions", _json({**OK, "max_tokens": 10**40}), "application/json"),
    ("completions", _json({"prompt": [5, 99_999], "max_tokens": 4}), "application/json"),
    ("completions", _json({"prompt": [5, -1], "max_tokens": 4}), "application/json"),
    ("completions", _json({"prompt": [5, "six"], "max_tokens": 4}), "application/json"),
    ("completions", _json({"prompt": "", "max_tokens": 4}), "application/json"),
    ("completions", _json({"prompt": [], "max_tokens": 4}), "application/json"),
    ("completions", _json({"max_tokens": 4}), "application/json"),
    ("completions", _json({"prompt": [7] * 300, "max_tokens": 4}), "application/json"),
    ("completions", _json({"prompt": ["a", "b"], "max_tokens": 4}), "application/json"),
    ("completions", _json({**OK, "temperature": "hot"}), "application/json"),
    ("completions", _json({**OK, "temperature": -1}), "application/json"),
    ("completions", _json({**OK, "top_p": 0}), "application/json"),
    ("completions", _json({**OK, "top_k": -7}), "application/json"),
    ("completions", _json({**OK, "seed": 2**70}), "application/json"),
    ("completions", _json({**OK, "n": 3}), "application/json"),
    ("completions", _json({**OK, "logit_bias": {"5": 100}}), "application/json"),
    ("completions", _json({**OK, "stop": ""}), "application/json"),
    ("completions", _json({**OK, "stop_token_ids": [-3]}), "application/json"),
    ("completions", _json({**OK, "stream": "yes"}), "application/json"),
    ("completions", _json({**OK, "stream_options": {"include_usage": True}}), "application/json"),
    ("completions", _json({**OK, "model": "gpt-4"}), "application/json"),
    ("chat/completions", _json({"max_tokens": 4}), "application/json"),
    ("chat/completions", _json({"messages": "Hello", "max_tokens": 4}), "application/json"),
    ("chat/completions", _json({"messages": [], "max_tokens": 4}), "application/json"),
    ("chat/completions", _json({"messages": [{"content": "hi"}]}), "application/json"),
    ("chat/completions", _json({"messages": [{"role": "user", "content": 5}]}), "application/json"),
    ("chat/completions", _json({**CHAT_OK, "max_completion_tokens": -1}), "application/json"),
    ("chat/completions", _json({**CHAT_OK, "max_tokens": 10**6}), "application/json"),
    ("chat/completions", _json({**CHAT_OK, "response_format": {"type": "json_object"}}),
     "application/json"),
]  # fmt: skip


@dataclass(frozen=True)
class Spec:
    kind: str  # "normal" | "hostile" | "drop"
    path: str
    body: bytes
    content_type: str = "application/json"
    stream: bool = False
    max_tokens: int = 0  # a normal request's exact output length (it ignores EOS)


@dataclass
class Tally:
    statuses: Counter[int]
    kinds: Counter[str]
    failures: list[str]  # what went wrong, one line per request


def _mix(n: int, seed: int) -> list[Spec]:
    """n requests: about HOSTILE_SHARE hostile, DROP_SHARE dropped after their first chunk,
    the rest completions and chats, streamed or not, greedy or seeded, each asking for an exact
    number of tokens. Some normal ones carry fields the server ignores or a text/plain content
    type on a JSON body: it accepts both, as vLLM does."""
    rng = random.Random(seed)
    hostile = itertools.cycle(HOSTILE)  # in turn, so that every case comes up
    specs = []
    for _ in range(n):
        roll = rng.random()
        chat, stream = rng.random() < 0.4, rng.random() < 0.5
        path = "chat/completions" if chat else "completions"
        text = " ".join(rng.choices(WORDS, k=rng.randint(2, 24)))
        prompt: dict[str, Any]
        if chat:
            prompt = {"messages": [{"role": "user", "content": text}]}
        elif rng.random() < 0.7:
            prompt = {"prompt": text}
        else:
            prompt = {"prompt": [rng.randrange(3, 2048) for _ in range(rng.randint(1, 40))]}
        if roll < HOSTILE_SHARE:
            hostile_path, raw, content_type = next(hostile)
            specs.append(Spec("hostile", hostile_path, raw, content_type))
            continue
        if roll < HOSTILE_SHARE + DROP_SHARE:
            body = {**prompt, "max_tokens": 128, "stream": True, "ignore_eos": True}
            specs.append(Spec("drop", path, _json(body), stream=True))
            continue
        max_tokens = rng.randint(1, 32)
        body = {**prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        sampling = rng.random()
        if sampling < 0.5:
            body.update(temperature=0.8, top_p=0.9, top_k=50, seed=rng.randrange(2**32))
        elif sampling < 0.55:
            body["temperature"] = 1e-300  # logits / this overflow: must not break the sampler
        else:
            body["temperature"] = 0.0
        content_type = "application/json"
        if rng.random() < 0.1:
            body["x_unknown_field"] = {"ignored": True}
            body["user"] = "soak"
        elif rng.random() < 0.05:
            content_type = "text/plain"
        specs.append(Spec("normal", path, _json(body), content_type, stream, max_tokens))
    return specs


async def _sse_payloads(response: aiohttp.ClientResponse) -> list[str]:
    payloads = []
    async for line in response.content:
        text = line.decode().strip()
        if text.startswith("data:"):
            payloads.append(text[len("data:") :].strip())
    return payloads


def _error_body_problem(body: Any) -> str | None:
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or set(error) != {"message", "type", "param", "code"}:
        return f"not an OpenAI error body: {body!r}"[:300]
    if not isinstance(error["message"], str) or not isinstance(error["type"], str):
        return f"error without a message and type: {error!r}"[:300]
    return None


async def _one(session: aiohttp.ClientSession, url: str, spec: Spec, tally: Tally) -> None:
    headers = {"Content-Type": spec.content_type}
    async with session.post(f"{url}/v1/{spec.path}", data=spec.body, headers=headers) as response:
        tally.statuses[response.status] += 1
        tally.kinds[spec.kind] += 1
        where = f"{spec.kind} {spec.path} {spec.body[:120]!r}: HTTP {response.status}"
        if spec.kind == "hostile":
            if not 400 <= response.status < 500:
                tally.failures.append(where)
            elif problem := _error_body_problem(await response.json(content_type=None)):
                tally.failures.append(f"{where}: {problem}")
            return
        if response.status != 200:
            tally.failures.append(f"{where}: {(await response.read())[:300]!r}")
            return
        if spec.kind == "drop":
            # Gone after the first chunk: closing drops the connection instead of reusing it.
            first = await response.content.readline()
            if not first.startswith(b"data:"):
                tally.failures.append(f"{where}: first line {first!r}")
            response.close()
            return
        if spec.stream:
            payloads = await _sse_payloads(response)
            if payloads[-1:] != ["[DONE]"] or payloads.count("[DONE]") != 1:
                tally.failures.append(f"{where}: stream ends {payloads[-3:]!r}")
                return
            events = [json.loads(p) for p in payloads[:-1]]
            if errors := [e for e in events if "error" in e]:
                tally.failures.append(f"{where}: error event {errors[0]!r}")
                return
            usage, finish = events[-1]["usage"], events[-2]["choices"][0]["finish_reason"]
        else:
            body = await response.json()
            usage, finish = body["usage"], body["choices"][0]["finish_reason"]
        if usage["completion_tokens"] != spec.max_tokens or finish != "length":
            tally.failures.append(f"{where}: {usage['completion_tokens']} tokens, {finish}")


async def _send_all(url: str, specs: list[Spec]) -> Tally:
    tally = Tally(Counter(), Counter(), [])
    queue: asyncio.Queue[Spec] = asyncio.Queue()
    for spec in specs:
        queue.put_nowait(spec)

    async def user(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            spec = queue.get_nowait()
            try:
                await _one(session, url, spec, tally)
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as exc:
                tally.failures.append(f"{spec.kind} {spec.path} {spec.body[:120]!r}: {exc!r}")

    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    async with aiohttp.ClientSession(connector=connector) as session:
        users = asyncio.gather(*(user(session) for _ in range(CONCURRENCY)))
        try:
            await asyncio.wait_for(users, ROUND_TIMEOUT_S)
        except TimeoutError:
            tally.failures.append(f"the round did not finish within {ROUND_TIMEOUT_S} s")
    return tally


class LoopServed(Served):
    """`Served` that can also list the tasks on its event loop."""

    def loop_tasks(self) -> list[str]:
        async def names() -> list[str]:
            me = asyncio.current_task()
            tasks = [t for t in asyncio.all_tasks() if t is not me]
            return sorted(getattr(t.get_coro(), "__qualname__", repr(t)) for t in tasks)

        return asyncio.run_coroutine_threadsafe(names(), self._loop).result(IDLE_TIMEOUT_S)


@dataclass(frozen=True)
class Soaked:
    served: LoopServed
    engine: Engine


@pytest.fixture(scope="module")
def soaked() -> Iterator[Soaked]:
    from transformers import AutoTokenizer

    from runtime.config import EngineConfig
    from runtime.engine import Engine

    # 24 blocks of 16 tokens: 16 sequences of up to ~170 tokens need far more, so full batches
    # preempt and blocks change hands under load.
    cfg = EngineConfig(model="tiny", max_model_len=256, num_kv_blocks=24, max_num_seqs=16)
    engine = Engine(cfg)
    tok: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(engine.path, local_files_only=True)
    served = LoopServed(lambda: (engine, tok), name="tiny")
    served.wait_healthy(60)
    yield Soaked(served, engine)
    served.close()


def _settle(soaked: Soaked) -> list[str]:
    """Wait until the engine is idle and every connection's handler has ended (the client has
    closed them all); returns the tasks left on the server's loop."""
    scheduler = soaked.engine.scheduler
    wait_until(lambda: not scheduler.has_work and not soaked.engine.seqs, IDLE_TIMEOUT_S)
    with contextlib.suppress(AssertionError):  # the caller reports the tasks left
        wait_until(lambda: HANDLER not in soaked.served.loop_tasks(), IDLE_TIMEOUT_S)
    return soaked.served.loop_tasks()


def _rss_mib() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def _run(url: str, specs: list[Spec]) -> Tally:
    return asyncio.run(_send_all(url, specs))


@pytest.mark.slow
def test_a_soak_of_mixed_hostile_and_dropped_requests_leaves_nothing_behind(
    soaked: Soaked,
) -> None:
    url, engine = soaked.served.url, soaked.engine
    # The warm-up round has the soak's mix, so that every code path, cache and pool has
    # been through once before memory is measured.
    warm = _run(url, _mix(WARMUP_REQUESTS, seed=1))
    assert not warm.failures, "\n".join(warm.failures[:20])
    baseline_tasks = _settle(soaked)
    assert HANDLER not in baseline_tasks, baseline_tasks
    rss_before = _rss_mib()
    preemptions_before = engine.scheduler.num_preemptions

    specs = _mix(NUM_REQUESTS, seed=2)
    start = time.monotonic()
    tally = _run(url, specs)
    wall_s = time.monotonic() - start
    tasks = _settle(soaked)
    rss_after = _rss_mib()

    kinds = Counter(s.kind for s in specs)
    server_errors = sum(n for status, n in tally.statuses.items() if status >= 500)
    print(
        f"\nSOAK: requests={len(specs)} normal={kinds['normal']} hostile={kinds['hostile']} "
        f"({kinds['hostile'] / len(specs):.0%}) disconnects={kinds['drop']} "
        f"concurrency={CONCURRENCY} 5xx={server_errors} "
        f"statuses={dict(sorted(tally.statuses.items()))} "
        f"preemptions={engine.scheduler.num_preemptions - preemptions_before} "
        f"loop_tasks={len(tasks)} (baseline {len(baseline_tasks)}) "
        f"rss_after_warmup={rss_before:.1f}MiB rss_end={rss_after:.1f}MiB "
        f"growth={rss_after - rss_before:+.1f}MiB wall={wall_s:.1f}s"
    )
    assert server_errors == 0, tally.statuses
    assert not tally.failures, "\n".join(tally.failures[:20])
    assert tally.kinds == kinds  # every request got an answer
    assert tally.statuses[200] == kinds["normal"] + kinds["drop"]
    # Nothing left in the engine: no sequence queued or running, every block free by the
    # block manager's own invariants.
    assert not engine.scheduler.waiting and not engine.scheduler.running and not engine.seqs
    engine.blocks.check([])
    assert engine.blocks.num_free_blocks == len(engine.blocks.blocks)
    assert tasks == baseline_tasks, f"stray tasks: {tasks} (baseline {baseline_tasks})"
    assert rss_after - rss_before < RSS_GROWTH_BOUND_MIB
    assert get(url + "/health")[0] == 200
