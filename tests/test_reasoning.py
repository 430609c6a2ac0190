"""Reasoning models: reasoning deltas are output tokens, TTFO marks the first answer token.

The parser is driven with canned streams from a local server; the timing with the reference
server's `--reasoning-tokens`, against its truth log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from rich.console import Console

from bench import client, report, store
from bench.compose import compose
from bench.config import LoadLevel, SloConfig, TargetConfig
from bench.levels import level_stats
from bench.metrics import summarize
from bench.records import REQUESTS_SCHEMA, RUNS_SCHEMA, RequestRecord, to_table
from bench.refserver import TruthRecord, read_truth_log
from bench.runner import _record
from bench.summary import table
from bench.workload import RequestSpec
from tests.conftest import RefServer, best_of
from tests.synthetic import request_record, run_record

StartServer = Callable[..., RefServer]
SPEC = RequestSpec(0, "why is the sky blue", 5, 12, 0.0)


def _target(base_url: str, **changes: object) -> TargetConfig:
    target = compose("target=openai", f"target.base_url={base_url}", "target.endpoint=chat").target
    return dataclasses.replace(target, **changes)  # type: ignore[arg-type]


def _delta(cum: int | None = None, /, **delta: str) -> dict[str, Any]:
    chunk: dict[str, Any] = {"object": "chat.completion.chunk", "choices": [{"delta": delta}]}
    if cum is not None:
        chunk["usage"] = {"prompt_tokens": 5, "completion_tokens": cum}
    return chunk


def _final(completion: int, reasoning: int | None = None) -> dict[str, Any]:
    usage: dict[str, Any] = {"prompt_tokens": 5, "completion_tokens": completion}
    if reasoning is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return {"object": "chat.completion.chunk", "choices": [], "usage": usage}


def _replay(chunks: list[dict[str, Any]]) -> client.RequestResult:
    """Stream `chunks` from a local server, a few milliseconds apart, and send one request."""

    async def handler(request: web.BaseRequest) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for chunk in chunks:
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await asyncio.sleep(0.002)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def go() -> client.RequestResult:
        runner = web.ServerRunner(web.Server(handler), access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            url = f"http://127.0.0.1:{runner.addresses[0][1]}"
            async with client.session(1, 30.0) as session:
                return await client.send(session, _target(url), "m", SPEC, 0.0)
        finally:
            await runner.cleanup()

    return asyncio.run(go())


# ---- parsing -----------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_either_reasoning_field_is_read_as_reasoning(field: str) -> None:
    assert client.chunk_text(_delta(**{field: " hmm"})) == client.ChunkText("", " hmm")
    both = _delta(**{field: " so", "content": " yes"})
    assert client.chunk_text(both) == client.ChunkText(" yes", " so")


def test_completions_text_is_never_reasoning() -> None:
    chunk = {"choices": [{"text": " t0", "reasoning_content": "ignored"}]}
    assert client.chunk_text(chunk) == client.ChunkText(" t0", "")


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
def test_reasoning_deltas_are_tokens_and_the_first_answer_event_is_ttfo(field: str) -> None:
    r = _replay(
        [
            _delta(1, role="assistant", **{field: " a"}),
            _delta(2, **{field: " b"}),
            _delta(3, **{field: " c"}),
            _delta(4, content=" x"),
            _delta(5, content=" y"),
            _final(5),
        ]
    )
    assert r.ok and r.event_tokens == [1] * 5 and len(r.itl_s()) == 4
    assert r.first_token_s == r.event_s[0]
    assert r.first_output_s == r.event_s[3]
    assert r.reasoning_tokens == 3  # counted from the events: the usage has no details


def test_the_servers_reasoning_count_wins_over_the_events() -> None:
    r = _replay([_delta(1, reasoning=" a"), _delta(2, content=" x"), _final(2, reasoning=4)])
    assert r.reasoning_tokens == 4


def test_hidden_reasoning_is_counted_without_a_ttfo() -> None:
    # Reasoning the server counts but never streams: the first token is the first answer token.
    r = _replay([_delta(1, content=" x"), _delta(2, content=" y"), _final(2, reasoning=7)])
    assert (r.reasoning_tokens, r.first_output_s) == (7, None)


def test_a_reported_zero_beside_streamed_reasoning_falls_back_to_the_events() -> None:
    r = _replay([_delta(1, reasoning=" a"), _delta(2, content=" x"), _final(2, reasoning=0)])
    assert r.reasoning_tokens == 1


def test_an_event_spanning_the_turn_is_an_answer_event() -> None:
    r = _replay(
        [
            _delta(2, reasoning_content=" a b"),
            _delta(4, reasoning_content=" c", content=" x"),
            _delta(6, content=" y z"),
            _final(6),
        ]
    )
    assert r.event_tokens == [2, 2, 2]
    assert r.first_output_s == r.event_s[1]
    assert r.reasoning_tokens == 2  # the spanning event's reasoning token is not counted


def test_an_event_without_text_goes_with_the_event_before_it() -> None:
    # A reasoning parser that strips `</think>` sends a usage-only increment at the turn.
    r = _replay(
        [
            _delta(1, reasoning=" a"),
            _delta(2),
            _delta(3, content=" x"),
            _final(3),
        ]
    )
    assert r.event_tokens == [1, 1, 1]
    assert r.first_output_s == r.event_s[2]
    assert r.reasoning_tokens == 2


def test_a_stream_without_reasoning_has_no_ttfo_and_no_reasoning_tokens() -> None:
    r = _replay([_delta(1, role="assistant", content=" x"), _delta(2, content=" y"), _final(2)])
    assert r.ok and (r.first_output_s, r.reasoning_tokens) == (None, None)


def test_a_stream_that_ends_inside_its_reasoning_has_no_ttfo() -> None:
    r = _replay([_delta(1, reasoning=" a"), _delta(2, reasoning=" b"), _final(2)])
    assert r.ok and (r.first_output_s, r.reasoning_tokens) == (None, 2)


# ---- against the reference server's truth log --------------------------------------------


def _measure(server: RefServer, target: TargetConfig) -> tuple[RequestRecord, TruthRecord]:
    """One request's record and truth, measured as a run does: on a warm connection."""

    async def go() -> client.RequestResult:
        async with client.session(1, 30.0) as session:
            await client.send(session, target, "refserver", SPEC, 0.0)
            return await client.send(session, target, "refserver", SPEC, 0.0)

    r = asyncio.run(go())
    level = LoadLevel(0, SPEC.input_tokens, SPEC.output_tokens, 1, None)
    record = _record(r, SPEC, level, 0, "run", "reasoning", 0.0, 0)
    truth = {t.request_id: t for t in read_truth_log(server.truth_log)}[r.request_id]
    return record, truth


def test_ttfo_is_ttft_plus_the_reasoning_tokens_time(refserver: StartServer) -> None:
    server = refserver("--ttft-ms", "20", "--itl-ms", "10", "--reasoning-tokens", "5")
    target = _target(server.url)

    def errors_ms(m: tuple[RequestRecord, TruthRecord]) -> tuple[float, float, float]:
        """The TTFO error; the error of TTFO - TTFT, which has no uplink in it (the client's
        share alone); and how far the server's own TTFO - TTFT strayed from its schedule."""
        record, truth = m
        assert record.ttft_ms is not None and record.ttfo_ms is not None
        assert truth.ttfo_s is not None
        true_gap_ms = (truth.ttfo_s - truth.ttft_s) * 1e3
        return (
            record.ttfo_ms - truth.ttfo_s * 1e3,
            (record.ttfo_ms - record.ttft_ms) - true_gap_ms,
            true_gap_ms - 5 * 10.0,  # token 5, the first answer token, is due 5 gaps after token 0
        )

    # The harness's single-user budget (docs/metrics.md): TTFT error under 2 ms, and the gap
    # between two tokens within ITL's 0.5 ms per token, here over one gap of five tokens. The
    # server's timers may fire a little late (bench/refserver.py), and a shared machine can
    # stall either process for a moment: best of three.
    def within(m: tuple[RequestRecord, TruthRecord]) -> bool:
        ttfo, gap, schedule = errors_ms(m)
        return abs(ttfo) < 2.0 and abs(gap) < 1.0 and abs(schedule) < 3.0

    record, truth = best_of(3, lambda: _measure(server, target), within)
    ttfo_error, gap_error, schedule_error = errors_ms((record, truth))
    assert abs(ttfo_error) < 2.0 and abs(gap_error) < 1.0 and abs(schedule_error) < 3.0
    assert (record.reasoning_tokens, record.output_tokens, truth.reasoning_tokens) == (5, 12, 5)
    assert record.itl_ms and len(record.itl_ms) == 11  # reasoning gaps are ITL too


def test_reasoning_split_inside_an_event_is_counted_by_the_server(
    refserver: StartServer,
) -> None:
    args = ("--ttft-ms", "5", "--itl-ms", "1", "--tokens-per-event", "4", "--reasoning-tokens", "5")
    server = refserver(*args)
    record, truth = _measure(server, _target(server.url))
    assert record.event_tokens == [4, 4, 4]
    # Event 1 carries reasoning token 4 and answer tokens 5-7: it is the first answer event.
    assert record.ttfo_ms == pytest.approx(record.event_ms[1])
    assert truth.ttfo_s == truth.event_writes[1] - truth.received
    assert record.reasoning_tokens == 5  # usage.completion_tokens_details


def test_without_reasoning_the_record_has_null_ttfo_and_reasoning_tokens(
    refserver: StartServer,
) -> None:
    server = refserver("--ttft-ms", "5", "--itl-ms", "1")
    record, truth = _measure(server, _target(server.url))
    assert record.ok and record.ttft_ms is not None
    assert (record.ttfo_ms, record.reasoning_tokens) == (None, None)
    assert (truth.reasoning_tokens, truth.ttfo_s) == (0, None)


def test_reasoning_tokens_change_nothing_on_the_completions_endpoint(
    refserver: StartServer,
) -> None:
    server = refserver("--ttft-ms", "5", "--itl-ms", "1", "--reasoning-tokens", "5")
    record, truth = _measure(server, _target(server.url, endpoint="completions"))
    assert record.ok and record.output_tokens == 12
    assert (record.ttfo_ms, record.reasoning_tokens, truth.reasoning_tokens) == (None, None, 0)


def test_the_record_carries_the_requests_group(refserver: StartServer) -> None:
    server = refserver("--ttft-ms", "5", "--itl-ms", "1")
    spec = dataclasses.replace(SPEC, group_id=3, group_position=1)

    async def go() -> client.RequestResult:
        async with client.session(1, 30.0) as session:
            return await client.send(session, _target(server.url), "refserver", spec, 0.0)

    level = LoadLevel(0, spec.input_tokens, spec.output_tokens, 1, None)
    record = _record(asyncio.run(go()), spec, level, 0, "run", "groups", 0.0, 0)
    assert (record.group_id, record.group_position) == (3, 1)


# ---- summarised and shown where present --------------------------------------------------


def test_a_runs_ttfo_percentiles_are_over_the_requests_that_have_one() -> None:
    slo = SloConfig(ttft_ms=None, tpot_ms=None, e2e_ms=None, percentile=99.0, success=None)
    reasoned = [request_record(index=i, ttfo_ms=float(10 * i)) for i in range(1, 4)]
    m = summarize([*reasoned, request_record(index=4)], duration_s=1.0, slo=slo)
    assert (m.ttfo_ms.p50, m.ttft_ms.p50) == (20.0, 10.0)
    assert summarize([request_record()], duration_s=1.0, slo=slo).ttfo_ms.p50 is None


def _requests(ttfo_ms: float | None) -> list[RequestRecord]:
    return [request_record(index=i, ttfo_ms=ttfo_ms, reasoning_tokens=None) for i in range(3)]


@pytest.mark.parametrize("ttfo_ms,shown", [(None, False), (42.0, True)])
def test_the_console_table_shows_ttfo_only_when_a_request_has_one(
    ttfo_ms: float | None, shown: bool
) -> None:
    console = Console(file=io.StringIO(), width=200)
    console.print(table([run_record()], _requests(ttfo_ms)))
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert ("TTFO" in text) is shown
    assert ("42.0" in text) is shown


@pytest.mark.parametrize("ttfo_ms,shown", [(None, False), (42.0, True)])
def test_the_report_table_shows_ttfo_only_when_a_request_has_one(
    ttfo_ms: float | None, shown: bool
) -> None:
    runs = to_table([run_record()], RUNS_SCHEMA).to_pandas()
    requests = to_table(_requests(ttfo_ms), REQUESTS_SCHEMA).to_pandas()
    summary = report._summary_table(level_stats(runs, requests))
    assert ("TTFO p50 ms" in summary.header) is shown
    assert len(summary.rows[0]) == len(summary.header)
    if shown:
        assert summary.rows[0][summary.header.index("TTFO p99 ms")] == "42.0"


@pytest.mark.slow
def test_a_run_stores_ttfo_and_reasoning_tokens(tmp_path: Path) -> None:
    from bench.runner import run

    result = run(compose(
        "scenario=short_qa", "target=refserver", "target.endpoint=chat",
        "+target.server_args.reasoning-tokens=3", "scenario.num_requests=4",
        "scenario.repeats=1", "scenario.output_tokens=8", f"results_dir={tmp_path}",
        "progress=false",
    ))  # fmt: skip
    data = store.load(result.run_dir)
    assert (data.requests["reasoning_tokens"] == 3).all()
    # Timing is checked against the truth log above; here, that it reached the files.
    assert (data.requests["ttfo_ms"] > data.requests["ttft_ms"]).all()
    assert data.runs["ttfo_ms_p50"].notna().all() and data.runs["ttfo_ms_p99"].notna().all()
