"""Conversations (scenario=multi_turn): each user holds a conversation for its turns, every turn
sending the whole history (earlier user turns and the server's actual replies) after a think
time; on the reference server each turn's prompt is exactly the history's words plus its own."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bench import client, runner, workload
from bench.client import RequestResult
from bench.compose import compose
from bench.config import BenchConfig, ConfigError, LoadLevel
from bench.load import run_conversations
from bench.records import RequestRecord
from bench.refserver import read_truth_log
from bench.workload import Exchange, RequestSpec
from tests.conftest import RefServer

StartServer = Callable[..., RefServer]


def _cfg(*overrides: str) -> BenchConfig:
    return compose("scenario=multi_turn", "target.endpoint=chat", *overrides)


def _specs(cfg: BenchConfig) -> list[RequestSpec]:
    return workload.build(cfg.scenario, cfg.workload, cfg.seed, text=True).batches[0, 0]


class _FakeServer:
    """Answers every request after `seconds` with a reply naming its turn; fails those listed."""

    def __init__(self, seconds: float = 0.005, fail: frozenset[tuple[int, int]] = frozenset()):
        self.seconds, self.fail = seconds, fail
        self.sent: list[tuple[RequestSpec, RequestResult]] = []

    async def send(self, spec: RequestSpec, scheduled_s: float) -> RequestResult:
        sent_s = time.perf_counter()
        await asyncio.sleep(self.seconds)
        turn = (spec.group_id or 0, spec.group_position or 0)
        result = RequestResult("id", scheduled_s, sent_s, time.perf_counter())
        if turn in self.fail:
            result.error = "http"
        else:
            result.ok, result.text = True, f" reply {turn[0]}.{turn[1]}"
        self.sent.append((spec, result))
        return result

    def run(self, specs: list[RequestSpec], users: int, think_time_s: float = 0.0) -> None:
        level = LoadLevel(0, 8, 8, users, None)
        asyncio.run(run_conversations(self.send, specs, level, think_time_s, lambda s, r: None, 3))


def test_a_conversations_turns_are_consecutive_requests_of_one_group() -> None:
    specs = _specs(_cfg("scenario.turns=3", "scenario.num_requests=6"))
    assert [(s.group_id, s.group_position) for s in specs] == [
        (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2),
    ]  # fmt: skip
    assert all(len(str(s.prompt).split()) == 64 and not s.history for s in specs)
    assert len({s.prompt for s in specs}) == 6  # every turn a new user message


def test_the_digest_covers_the_conversations_shape() -> None:
    digests = {
        workload.build(c.scenario, c.workload, c.seed, text=True).digest
        for c in (
            _cfg("scenario.turns=4"),
            _cfg("scenario.turns=2"),
            _cfg("scenario.turns=4", "scenario.think_time_s=1.0"),
        )
    }
    assert len(digests) == 3


def test_conversations_need_the_chat_endpoint() -> None:
    with pytest.raises(ConfigError) as err:
        compose("scenario=multi_turn", "target.endpoint=completions")
    assert str(err.value) == (
        "target.endpoint: scenario.turns > 1 needs the chat endpoint; set target.endpoint=chat"
    )


def test_num_requests_counts_the_turns_of_whole_conversations() -> None:
    with pytest.raises(
        ConfigError, match=r"^scenario\.num_requests: .*multiple of .* \(4\), got 30"
    ):
        _cfg("scenario.num_requests=30")


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("scenario.request_rate=2", "scenario.request_rate"),
        ("scenario.prefix_groups=2", "scenario.prefix_groups"),
    ],
)
def test_conversations_are_a_closed_loop_of_their_own_groups(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^scenario\.turns: .*unset {key}$"):
        _cfg(override, "scenario.prefix_tokens=8")


def test_a_think_time_needs_conversations() -> None:
    with pytest.raises(ConfigError, match=r"^scenario\.think_time_s: .*set scenario\.turns > 1"):
        compose("scenario.think_time_s=0.5")


def test_the_chat_body_sends_the_history_as_alternating_messages() -> None:
    target = _cfg().target
    spec = RequestSpec(0, "third", 1, 4, 0.0, history=(Exchange("a", " r0"), Exchange("b", " r1")))
    assert client.request_body(target, "m", spec)["messages"] == [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": " r0"},
        {"role": "user", "content": "b"},
        {"role": "assistant", "content": " r1"},
        {"role": "user", "content": "third"},
    ]


def test_each_turn_sends_every_earlier_turn_and_reply_before_its_own() -> None:
    specs = _specs(_cfg("scenario.turns=3", "scenario.num_requests=12"))
    server = _FakeServer()
    server.run(specs, users=2)
    assert sorted(s.index for s, _ in server.sent) == list(range(12))
    prompts = {(s.group_id, s.group_position): s.prompt for s in specs}
    for spec, _ in server.sent:
        c, t = spec.group_id, spec.group_position
        assert c is not None and t is not None
        assert spec.history == tuple(Exchange(prompts[c, k], f" reply {c}.{k}") for k in range(t))


def test_the_next_turn_is_due_the_think_time_after_the_reply() -> None:
    specs = _specs(_cfg("scenario.turns=3", "scenario.num_requests=6"))
    server = _FakeServer()
    server.run(specs, users=2, think_time_s=0.05)
    by_turn = {(s.group_id, s.group_position): r for s, r in server.sent}
    for (c, t), result in by_turn.items():
        if t:
            previous = by_turn[c, t - 1]
            assert result.scheduled_s == previous.end_s + 0.05
            assert result.sent_s >= result.scheduled_s


def test_a_failed_turn_ends_its_conversation() -> None:
    specs = _specs(_cfg("scenario.turns=4", "scenario.num_requests=8"))
    server = _FakeServer(fail=frozenset({(0, 1)}))
    server.run(specs, users=1)
    assert [(s.group_id, s.group_position) for s, _ in server.sent] == [
        (0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (1, 3),
    ]  # fmt: skip


def test_the_reply_text_is_the_answer_without_reasoning(refserver: StartServer) -> None:
    url = refserver("--ttft-ms", "1", "--itl-ms", "1", "--reasoning-tokens", "2").url
    target = dataclasses.replace(
        compose("target=openai", f"target.base_url={url}").target, endpoint="chat"
    )

    async def go() -> RequestResult:
        async with client.session(1, 30.0) as session:
            return await client.send(
                session, target, "refserver", RequestSpec(0, "hi", 1, 5, 0.0), 0.0
            )

    result = asyncio.run(go())
    assert result.ok and result.text == " t2 t3 t4"


@pytest.mark.slow
def test_a_conversation_run_sends_each_turn_its_whole_history(
    refserver: StartServer, tmp_path: Path
) -> None:
    server = refserver("--ttft-ms", "5", "--itl-ms", "1")
    cfg = compose(
        "scenario=multi_turn", "target=openai", f"target.base_url={server.url}",
        "target.endpoint=chat", f"results_dir={tmp_path}", "progress=false",
        "scenario.repeats=1", "scenario.warmup_requests=0", "scenario.concurrency=2",
        "scenario.num_requests=12", "scenario.turns=3", "scenario.input_tokens=20",
        "scenario.output_tokens=7", "scenario.think_time_s=0.2",
    )  # fmt: skip
    result = runner.run(cfg)
    rows: dict[tuple[int, int], RequestRecord] = {}
    for r in result.requests:
        assert r.group_id is not None and r.group_position is not None
        rows[r.group_id, r.group_position] = r
    assert sorted(rows) == [(c, t) for c in range(4) for t in range(3)]
    # The server's own count of every prompt: the user turns so far and every reply before.
    truth = {t.request_id: t.prompt_tokens for t in read_truth_log(server.truth_log)}
    for (_, turn), r in rows.items():
        assert r.ok and r.output_tokens == 7
        assert truth[r.request_id] == r.prompt_tokens == 20 * (turn + 1) + 7 * turn
    for (c, turn), r in rows.items():
        if turn:
            assert r.sent_s - rows[c, turn - 1].end_s >= 0.2
