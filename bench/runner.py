"""One benchmark run: target up, warm-up, every repeat of every load level, records down.

Repeats are the outer loop (repeat 0 of every level, then repeat 1, ...), so slow drift of the
machine spreads over all levels instead of biasing the last one. The machine's speed is probed
(bench/probe.py) before the server starts and after it stops, outside every measured level,
and stored with each run row.

A capacity search (scenario.search, bench/capacity.py) measures one probe at a time instead,
every round of it before the next, since each probe's load depends on the ones before; the run
directory then also holds capacity.json, rewritten after every round.

Ctrl-C, SIGTERM and SIGHUP stop a run early and alike (bench/stop_signals.py): what finished is
kept and the run is partial; one that had measured nothing raises Interrupted.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from bench import capacity, client, environment, metrics, probe, resume, workers, workload
from bench.config import BenchConfig, ConfigError, LoadLevel, WorkloadConfig
from bench.load import LevelOutcome
from bench.progress import LiveProgress
from bench.records import SCHEMA_VERSION, RequestRecord, RunRecord, TelemetryRecord
from bench.stop_signals import Interrupted, StopSignals
from bench.store import RunStore, check_results_dir
from bench.targets import Server, TargetError, refusal_hint, serve
from bench.telemetry import RUNNING, WAITING, Sample, Sampler, scrape_server

REPO_DIR = Path(__file__).resolve().parent.parent
log = logging.getLogger(__name__)


class WarmupError(RuntimeError):
    """Every warm-up request failed: the measured run would only record failures."""


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    status: str  # complete | partial
    reason: str | None  # why a partial run stopped
    runs: list[RunRecord]
    requests: list[RequestRecord]
    capacity: capacity.Capacity | None  # a capacity search's answer (also in capacity.json)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000.0


def _record(
    r: client.RequestResult,
    spec: workload.RequestSpec,
    level: LoadLevel,
    repeat: int,
    run_id: str,
    scenario: str,
    origin_s: float,
    worker: int,
) -> RequestRecord:
    first = r.first_token_s
    n_out = r.output_tokens or 0
    tpot = (r.end_s - first) / (n_out - 1) if r.ok and first is not None and n_out > 1 else None
    server = r.server_timings or {}
    return RequestRecord(
        schema_version=SCHEMA_VERSION,
        run_id=run_id,
        scenario=scenario,
        repeat=repeat,
        level=level.index,
        input_tokens=spec.input_tokens,
        output_tokens_requested=spec.output_tokens,
        concurrency=level.concurrency,
        request_rate=level.request_rate,
        index=spec.index,
        group_id=spec.group_id,
        group_position=spec.group_position,
        ramp_up=spec.ramp_up,
        request_id=r.request_id,
        worker=worker,
        ok=r.ok,
        error=r.error,
        error_message=r.error_message,
        http_status=r.http_status,
        prompt_tokens=r.prompt_tokens,
        output_tokens=r.output_tokens,
        reasoning_tokens=r.reasoning_tokens,
        output_tokens_source=r.output_tokens_source,
        token_attribution=r.token_attribution,
        events=len(r.event_s),
        scheduled_s=r.scheduled_s - origin_s,
        sent_s=r.sent_s - origin_s,
        first_token_s=None if first is None else first - origin_s,
        end_s=r.end_s - origin_s,
        send_lag_ms=(r.sent_s - r.scheduled_s) * 1000.0,
        ttft_ms=_ms(None if first is None else first - r.sent_s),
        ttfo_ms=_ms(None if r.first_output_s is None else r.first_output_s - r.sent_s),
        tpot_ms=_ms(tpot),
        e2e_ms=_ms(r.end_s - r.sent_s) if r.ok else None,
        ttft_from_scheduled_ms=_ms(None if first is None else first - r.scheduled_s),
        e2e_from_scheduled_ms=_ms(r.end_s - r.scheduled_s) if r.ok else None,
        itl_ms=[g * 1000.0 for g in r.itl_s()],
        event_ms=[(t - r.sent_s) * 1000.0 for t in r.event_s],
        event_tokens=r.event_tokens,
        server_queue_ms=server.get("queue_ms"),
        server_prefill_ms=server.get("prefill_ms"),
        server_decode_ms=server.get("decode_ms"),
        server_e2e_ms=server.get("e2e_ms"),
    )


def _workload_hash(cfg: BenchConfig, digest: str) -> str:
    t = cfg.target
    request_shape = [digest, t.endpoint, t.ignore_eos, dict(t.extra_body)]
    return hashlib.sha256(json.dumps(request_shape, sort_keys=True).encode()).hexdigest()


def _prompt_ids(
    cfg: WorkloadConfig, server: Server, tokenizer: workload.Tokenizer | None
) -> WorkloadConfig:
    """The prompt token id range, within the model's vocabulary where the server's model card
    (else target.tokenizer) tells its size."""
    vocab = server.vocab_size or (tokenizer.vocab_size if tokenizer is not None else None)
    if vocab is None:
        return cfg
    fitted = workload.within_vocabulary(cfg, vocab)
    if fitted != cfg:
        log.info(
            "prompt token ids drawn from [%d, %d): %s has a vocabulary of %d ids "
            "(workload.token_id_high=%d)",
            fitted.token_id_low,
            fitted.token_id_high,
            server.model,
            vocab,
            cfg.token_id_high,
        )
    return fitted


class _Run:
    """The state shared by the levels of one run."""

    def __init__(
        self,
        cfg: BenchConfig,
        server: Server,
        sampler: Sampler,
        before: probe.Probe,
        resumed: resume.Resumed | None,
    ) -> None:
        self.cfg, self.server, self.sampler, self.resumed = cfg, server, sampler, resumed
        self.probe_before = before
        self.tokenizer = workload.load_tokenizer(cfg.target.tokenizer)
        text = cfg.workload.prompt_format == "text" or (
            cfg.workload.prompt_format == "auto" and cfg.target.endpoint == "chat"
        )
        ids = _prompt_ids(cfg.workload, server, self.tokenizer)
        self.workload = workload.build(cfg.scenario, ids, cfg.seed, text, self.tokenizer)
        self.batch = functools.partial(
            workload.level_batch, cfg.scenario, ids, cfg.seed, text, self.tokenizer
        )
        self.workload_hash = _workload_hash(cfg, self.workload.digest)
        self.env = environment.fingerprint(REPO_DIR)
        if resumed is None:
            stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
            self.run_id = f"{stamp}-{cfg.scenario.name}-{uuid.uuid4().hex[:6]}"
            self.store = RunStore(cfg.results_dir, self.run_id)
            self.origin_s = time.perf_counter()
        else:  # the same directory and run id; times go on after the kept rows'
            self.run_id = resumed.run_id
            self.store = RunStore(resumed.run_dir.parent, self.run_id, resumed.kept)
            self.origin_s = time.perf_counter() - resumed.after_s
        self.target = dataclasses.replace(cfg.target, base_url=server.base_url, model=server.model)
        self.search: capacity.Search | None = None  # a capacity search, once it has begun

    def worker_setup(self) -> workers.Setup:
        sc = self.cfg.scenario
        biggest = max((lv.concurrency or 0 for lv in sc.levels()), default=0) or None
        if sc.search == "concurrency":
            biggest = int(self.cfg.capacity.max_load)
        return workers.Setup(
            self.target, self.cfg.target.tokenizer, self.cfg.client.request_timeout_s, biggest
        )

    async def level(
        self,
        pool: workers.Workers,
        specs: list[workload.RequestSpec],
        level: LoadLevel,
        on_result: workers.OnResult,
    ) -> tuple[LevelOutcome, list[workers.WorkerLevel]]:
        sc = self.cfg.scenario
        return await workers.run_level_on(
            pool,
            specs,
            level,
            on_result,
            conversations=sc.turns > 1,
            ramp_up_s=sc.ramp_up_s,
            think_time_s=sc.think_time_s,
            max_consecutive_connection_errors=self.cfg.client.max_consecutive_connection_errors,
        )

    def run_record(
        self,
        level: LoadLevel,
        repeat: int,
        outcome: LevelOutcome,
        requests: list[RequestRecord],
        ends: list[workers.WorkerLevel],
        num_requests: int,
    ) -> RunRecord:
        cfg = self.cfg
        m = metrics.summarize(requests, outcome.ended_s - outcome.started_s, cfg.slo)
        lags = [metrics.Distribution.of([s * 1000.0 for _, s in e.lag]) for e in ends]
        send_lags = [
            metrics.Distribution.of([r.send_lag_ms for r in requests if r.worker == e.worker])
            for e in ends
        ]
        peaks = self.sampler.peaks_since(outcome.started_s)
        gpus = sorted(
            (int(k[3:].split(".")[0]), v) for k, v in peaks.items() if k.startswith("gpu")
        )
        started = datetime.now(UTC).timestamp() - (time.perf_counter() - outcome.started_s)
        ended = started + (outcome.ended_s - outcome.started_s)
        lag_max = max((s for e in ends for _, s in e.lag), default=None)
        d = {
            f"{name}_{stat}": getattr(getattr(m, name), stat)
            for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")
            for stat in ("mean", "p50", "p90", "p99")
        }
        return RunRecord(
            schema_version=SCHEMA_VERSION,
            run_id=self.run_id,
            scenario=cfg.scenario.name,
            repeat=repeat,
            level=level.index,
            input_tokens=level.input_tokens,
            output_tokens=level.output_tokens,
            concurrency=level.concurrency,
            request_rate=level.request_rate,
            status="partial" if outcome.stopped_early else "complete",
            stopped_early=outcome.stopped_early,
            started_at=datetime.fromtimestamp(started, UTC).isoformat(),
            ended_at=datetime.fromtimestamp(ended, UTC).isoformat(),
            monotonic_origin_s=self.origin_s,
            duration_s=m.duration_s,
            num_requests=num_requests,
            sent=m.sent,
            completed=m.completed,
            failed=m.failed,
            success_rate=m.success_rate,
            errors_json=json.dumps(m.errors, sort_keys=True),
            total_input_tokens=m.total_input_tokens,
            total_output_tokens=m.total_output_tokens,
            output_throughput=m.output_throughput,
            request_throughput=m.request_throughput,
            total_token_throughput=m.total_token_throughput,
            goodput=m.goodput,
            **d,
            ttfo_ms_p50=m.ttfo_ms.p50,
            ttfo_ms_p99=m.ttfo_ms.p99,
            ttft_from_scheduled_ms_p50=m.ttft_from_scheduled_ms.p50,
            ttft_from_scheduled_ms_p99=m.ttft_from_scheduled_ms.p99,
            e2e_from_scheduled_ms_p50=m.e2e_from_scheduled_ms.p50,
            e2e_from_scheduled_ms_p99=m.e2e_from_scheduled_ms.p99,
            send_lag_ms_p50=m.send_lag_ms.p50,
            send_lag_ms_p99=m.send_lag_ms.p99,
            # With several workers, the worst worker's: each one's lag delays its own streams.
            loop_lag_ms_p50=max((d.p50 for d in lags if d.p50 is not None), default=None),
            loop_lag_ms_p99=max((d.p99 for d in lags if d.p99 is not None), default=None),
            loop_lag_ms_max=None if lag_max is None else lag_max * 1000.0,
            client_bound=any((d.p99 or 0.0) > cfg.client.lag_threshold_ms for d in lags),
            workers=len(ends),
            worker_loop_lag_ms_p99=[d.p99 or 0.0 for d in lags],
            worker_send_lag_ms_p99=[d.p99 or 0.0 for d in send_lags],
            worker_clock_offset_ms=[e.clock.offset_s * 1e3 for e in ends],
            worker_clock_uncertainty_ms=[e.clock.uncertainty_s * 1e3 for e in ends],
            peak_gpu_memory_mib=[v for _, v in gpus],
            peak_gpu_memory_mib_total=sum(v for _, v in gpus) if gpus else None,
            peak_rss_mib=peaks.get("process.rss_mib"),
            load_time_s=self.server.load_time_s,
            load_breakdown_json=(
                None
                if self.server.load_breakdown is None
                else json.dumps(self.server.load_breakdown, sort_keys=True)
            ),
            engine_kernels_json=(
                None if self.server.kernels is None else json.dumps(self.server.kernels)
            ),
            target_kind=cfg.target.kind,
            base_url=self.server.base_url,
            model=self.server.model,
            endpoint=cfg.target.endpoint,
            workload_hash=self.workload_hash,
            config_hash=resume.config_hash(cfg),
            config_yaml=cfg.resolved_yaml,
            git_commit=self.env.git_commit,
            git_dirty=self.env.git_dirty,
            hardware_key=self.env.hardware_key(),
            environment_json=self.env.to_json(),
            probe_before_json=self.probe_before.to_json(),
            probe_after_json=None,  # set when the session ends (_run)
        )

    def telemetry_samples(self, samples: list[Sample]) -> None:
        self.store.telemetry.extend(
            TelemetryRecord(
                SCHEMA_VERSION, self.run_id, s.t_s - self.origin_s, s.source, s.metric, s.value
            )
            for s in samples
        )

    def telemetry_lag(self, ends: list[workers.WorkerLevel]) -> None:
        self.store.telemetry.extend(
            TelemetryRecord(
                SCHEMA_VERSION,
                self.run_id,
                t - self.origin_s,
                "client" if len(ends) == 1 else f"client{e.worker}",
                "loop_lag_ms",
                v * 1e3,
            )
            for e in ends
            for t, v in e.lag
        )


class BusyServerError(TargetError):
    """The server was already serving requests before the run sent any."""


def _check_idle(cfg: BenchConfig, server: Server) -> None:
    """A server the harness did not start may be shared (another job of a sweep, another
    user), whose requests would be in this run's latency: refuse one that is busy before the
    run has sent anything, where its /metrics tells (vLLM's running and waiting gauges)."""
    if cfg.target.managed or cfg.client.allow_busy_server:
        return
    gauges = {s.metric: s.value for s in scrape_server(f"{server.base_url}/metrics", 2.0)}
    running, waiting = gauges.get(RUNNING, 0.0), gauges.get(WAITING, 0.0)
    if running or waiting:
        raise BusyServerError(
            f"the server at {server.base_url} is already serving {running:.0f} requests "
            f"({waiting:.0f} waiting) before this run sent any: another job or user shares "
            "it, and its requests would be in this run's latency. Give each job its own "
            "server, run the jobs one after another, or set client.allow_busy_server=true "
            "to measure anyway"
        )


async def _warmup(run: _Run, pool: workers.Workers) -> None:
    specs = run.workload.warmup
    if not specs:
        return
    users = min(len(specs), max(lv.concurrency or 1 for lv in run.cfg.scenario.levels()))
    level = LoadLevel(-1, specs[0].input_tokens, specs[0].output_tokens, users, None)
    failures: list[client.RequestResult] = []

    def keep(_: workload.RequestSpec, r: client.RequestResult, worker: int) -> None:
        if not r.ok:
            failures.append(r)

    await run.level(pool, specs, level, keep)
    if len(failures) == len(specs):
        first = failures[0]
        status = f"HTTP {first.http_status}: " if first.http_status else ""
        raise WarmupError(
            f"all {len(specs)} warm-up requests failed ({first.error}: {status}"
            f"{first.error_message}). {refusal_hint(first.http_status, first.error_message)}"
        )


async def _level(
    run: _Run,
    pool: workers.Workers,
    level: LoadLevel,
    repeat: int,
    specs: list[workload.RequestSpec],
    progress: LiveProgress,
) -> tuple[LevelOutcome, list[RequestRecord], RunRecord]:
    """One repeat of a level: its outcome, its requests and its row."""
    requests: list[RequestRecord] = []
    interrupted = False

    def keep(spec: workload.RequestSpec, r: client.RequestResult, worker: int) -> None:
        if interrupted:  # a request that outlived the interruption: not part of the level
            return
        rec = _record(
            r, spec, level, repeat, run.run_id, run.cfg.scenario.name, run.origin_s, worker
        )
        requests.append(rec)
        run.store.requests.append(rec)  # on disk at the next flush, even if the level dies
        progress.request_done(r.ok)

    started_s = time.perf_counter()
    try:
        outcome, ends = await run.level(pool, specs, level, keep)
    except asyncio.CancelledError as exc:  # a stop signal: what finished is a partial level
        interrupted = True
        reason = str(exc.args[0]) if exc.args else "cancelled"
        stopped = LevelOutcome(
            started_s=started_s, ended_s=time.perf_counter(), stopped_early=reason
        )
        run.store.runs.append(run.run_record(level, repeat, stopped, requests, [], len(specs)))
        raise
    run.telemetry_lag(ends)
    row = run.run_record(level, repeat, outcome, requests, ends, len(specs))
    run.store.runs.append(row)
    return outcome, requests, row


def _stopped(run: _Run, outcome: LevelOutcome) -> str | None:
    """Why the run must stop after a level: the server exited, or the level stopped early."""
    code = run.server.exit_code()
    if code is not None:
        return f"the server exited with code {code}"
    return outcome.stopped_early


async def _measure(run: _Run, progress: LiveProgress) -> str | None:
    """Run every level of every repeat; returns why it stopped early, or None."""
    sc = run.cfg.scenario
    _check_idle(run.cfg, run.server)
    async with workers.started(run.cfg, run.worker_setup(), run.tokenizer) as pool:
        await _warmup(run, pool)
        if sc.search:
            return await _search(run, pool, progress)
        done = run.resumed.done if run.resumed else frozenset()
        for repeat in range(sc.repeats):
            for level in sc.levels():
                if (repeat, level.index) in done:
                    continue
                progress.start_level(
                    f"rep {repeat + 1}/{sc.repeats}  {level.label}", sc.num_requests
                )
                specs = run.workload.batches[level.index, repeat]
                outcome, _, _ = await _level(run, pool, level, repeat, specs, progress)
                run.store.flush()
                if reason := _stopped(run, outcome):
                    return reason
    return None


async def _search(run: _Run, pool: workers.Workers, progress: LiveProgress) -> str | None:
    """A capacity search: round after round at the load bench.capacity chooses."""
    search = run.search = capacity.search_for(run.cfg)
    while (load := search.next_load()) is not None:
        level, repeat = search.level(load), search.rounds(load)
        n = search.round_size(load)
        progress.start_level(f"probe {level.index + 1} round {repeat + 1}  {level.label}", n)
        specs = run.batch(level, repeat, n)
        outcome, requests, row = await _level(run, pool, level, repeat, specs, progress)
        run.store.flush()
        if reason := _stopped(run, outcome):
            return reason
        search.add_round(load, requests, row)
        capacity.write(search.result(complete=False), run.store.dir)
        progress.log(f"probe {level.index + 1} {level.label}: {search.probe_line(load)}")
    return None


def run(cfg: BenchConfig) -> RunResult:
    """Run the configured scenario against the configured target; see the module docstring."""
    levels = cfg.scenario.levels()
    resumed = resume.load(cfg) if cfg.resume else None
    pairs = len(levels) * cfg.scenario.repeats - (len(resumed.done) if resumed else 0)
    if resumed and not pairs:
        raise ConfigError(f"resume={cfg.resume}: every level of that run is complete")
    # A capacity search decides as it goes how much it sends.
    total = None if cfg.scenario.search else pairs * cfg.scenario.num_requests
    biggest = max((lv.output_tokens for lv in levels), default=0)
    # A capacity search's size is not known ahead: its largest probe's rounds, as a guess.
    planned = total or int(cfg.capacity.max_load) * cfg.capacity.requests_per_user * 4
    check_results_dir(cfg.results_dir, planned, biggest)
    with StopSignals() as signals:
        try:
            return _run(cfg, signals, total, resumed)
        except Interrupted as exc:  # exit code 2, as for any run that measured nothing
            raise Interrupted(f"{exc} before any request was measured") from None


def _run(
    cfg: BenchConfig, signals: StopSignals, total: int | None, resumed: resume.Resumed | None
) -> RunResult:
    before = probe.measure()  # before the server exists: nothing else of the run competes
    with serve(cfg.target) as server:
        pids = [server.process.pid] if server.process else []
        metrics_url = f"{server.base_url}/metrics" if cfg.scrape_server_metrics else None
        scrape_s = cfg.server_metrics_interval_s
        with Sampler(cfg.telemetry_interval_s, pids, metrics_url, scrape_s) as sampler:
            state = _Run(cfg, server, sampler, before, resumed)
            try:
                with LiveProgress(total, cfg.progress) as progress:
                    progress.log(f"run {state.run_id}: writing to {state.store.dir}")
                    if resumed:
                        progress.log(
                            f"resumed: {len(resumed.done)} level repeats already complete, "
                            f"{total // cfg.scenario.num_requests if total else 0} to run"
                        )
                    progress.log(f"machine speed: {before.summary()}")
                    reason = asyncio.run(signals.measure(_measure(state, progress)))
            except Interrupted as exc:  # the signal came before the event loop ran `measure`
                reason = str(exc)
            finally:
                sampler.stop()
                state.telemetry_samples(sampler.samples())
                if state.store.requests:  # a run that measured nothing leaves no directory
                    state.store.flush()
    if reason is not None and reason == signals.reason and not state.store.requests:
        raise Interrupted(reason)
    if state.store.runs and signals.reason is None:  # a signal asks to stop, not to probe
        # The server has stopped, so the after probe sees the machine as the before probe did.
        after = probe.measure().to_json()
        state.store.runs = [
            dataclasses.replace(r, probe_after_json=after) for r in state.store.runs
        ]
        state.store.flush()
    answer = None
    if state.search is not None and state.search.probes:
        answer = state.search.result(complete=reason is None)
        capacity.write(answer, state.store.dir)
    runs, requests = state.store.runs, state.store.requests
    if resumed:  # the whole run, the kept rows first, as its files hold it
        runs = [RunRecord(**r) for r in resumed.kept["runs"].to_pylist()] + runs
        requests = [RequestRecord(**r) for r in resumed.kept["requests"].to_pylist()] + requests
    return RunResult(
        state.store.dir,
        "complete" if reason is None else "partial",
        reason,
        runs,
        requests,
        answer,
    )
