"""Findings from a run's measurements: why the server was not busier, and what to turn.

`diagnose` applies each rule of RULES to every load level of a stored run, pooling the samples
inside the level's windows (one per repeat: its first request's send to its last byte, on the
run's clock). A rule that fires gives a `Finding` with the figures that fired it and the knobs to
turn: vLLM's flag names where the engine is the cause, the harness's own keys where the load or
the client is. A rule without enough samples at a level (a server without /metrics, a machine
without NVML, a level too short for the scrape interval) is listed as not evaluated, with why,
so that no finding is never mistaken for health. docs/metrics.md ("Diagnosis") lists the rules;
every threshold is a field of `Thresholds`.

`python -m bench.diagnose run=DIR` (bench/diagnose.py) prints the findings and writes them as
DIR/diagnosis.json.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bench.levels import Level, levels_of
from bench.store import StoredRun
from bench.telemetry import KV_USAGE, PREEMPTIONS, RUNNING, WAITING

Floats = npt.NDArray[np.float64]

DIAGNOSIS_FILE = "diagnosis.json"
TIMELINE_FILE = "timeline.png"


@dataclass(frozen=True)
class Thresholds:
    """Every number a rule compares with (docs/metrics.md, "Diagnosis")."""

    # What a rule needs at a level before it says anything: server scrapes (or NVML samples)
    # inside the level's windows, and requests with what the rule reads.
    min_scrapes: int = 3
    min_requests: int = 3
    # under_fed: nothing waits (waiting > 0 in at most this share of scrapes) and the server
    # has room: GPU utilisation below this mean; without NVML, running below this share of the
    # batch ceiling on average, or no request in flight for more than this share of the time.
    idle_waiting_share: float = 0.05
    low_gpu_util_pct: float = 50.0
    low_running_share: float = 0.5
    idle_share: float = 0.2
    # The batch ceiling where the run's config does not set runtime.max_num_seqs: the bundled
    # engine's default --max-num-seqs (runtime/config.py EngineConfig), as vLLM's was.
    default_max_num_seqs: int = 256
    # batch_cap: running at its maximum in at least this share of scrapes, while requests
    # wait in at least this share.
    pinned_share: float = 0.5
    queued_share: float = 0.5
    # kv_pressure: KV cache usage at or above kv_full in at least kv_full_share of scrapes, or
    # at least min_preemptions preemptions during the level.
    kv_full: float = 0.9
    kv_full_share: float = 0.25
    min_preemptions: int = 1
    # queue_dominated_ttft: the server's queue time exceeds its prefill time for at least this
    # share of successful requests.
    queue_share: float = 0.5
    # tp_imbalance: the most used GPU's peak memory over the least used one's above this.
    memory_imbalance: float = 1.10
    # bursty_delivery: over requests of at least burst_min_tokens tokens, a token arrives in a
    # burst when its gap to the previous one is below burst_gap_ratio × the request's step
    # time; fires when at least burst_share of the level's tokens do.
    burst_min_tokens: int = 8
    burst_gap_ratio: float = 0.2
    burst_share: float = 0.5

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if name.endswith("_share") and not 0 <= value <= 1:
                raise ValueError(f"thresholds.{name}: expected a share in [0, 1], got {value}")
            if name.startswith("min_") and value < 1:
                raise ValueError(f"thresholds.{name}: expected an integer >= 1, got {value}")
        if self.memory_imbalance < 1:
            value = self.memory_imbalance
            raise ValueError(f"thresholds.memory_imbalance: expected a ratio >= 1, got {value}")


@dataclass(frozen=True)
class Finding:
    rule: str  # a key of RULES
    title: str
    level: str  # the level's label ("64/128 c=8"), with its scenario where the run holds several
    windows: list[list[float]]  # [start_s, end_s] of each repeat the level covers
    evidence: dict[str, float]  # the figures that fired the rule
    detail: str  # a sentence with those figures
    knobs: list[str]  # what to turn, each "knob: how"


@dataclass(frozen=True)
class Skipped:
    """A rule that could not be evaluated at a level, and why."""

    rule: str
    level: str
    reason: str


@dataclass(frozen=True)
class Diagnosis:
    run_ids: list[str]
    findings: list[Finding]  # in level order, then RULES order
    evaluated: dict[str, list[str]]  # per level, the rules that had what they need
    not_evaluated: list[Skipped]
    thresholds: Thresholds

    def rules_evaluated(self) -> list[str]:
        """The rules evaluated at one level or more, in RULES order."""
        done = {rule for rules in self.evaluated.values() for rule in rules}
        return [rule for rule in RULES if rule in done]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Diagnosis:
        return cls(
            run_ids=list(data["run_ids"]),
            findings=[Finding(**f) for f in data["findings"]],
            evaluated={k: list(v) for k, v in data["evaluated"].items()},
            not_evaluated=[Skipped(**s) for s in data["not_evaluated"]],
            thresholds=Thresholds(**data["thresholds"]),
        )


# ---- windows -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Window:
    """One repeat of a level: its first request's send (or intended send, whichever is
    earlier) to its last byte, in seconds on its run's clock."""

    run_id: str
    repeat: int
    start_s: float
    end_s: float


_RUN_KEY = ["run_id", "scenario", "level", "repeat"]


def level_windows(runs: pd.DataFrame, requests: pd.DataFrame) -> dict[Level, list[Window]]:
    """Every level's windows, in `Level.sort_key` order; a repeat without requests has none.
    Requests join their run on (run_id, scenario, level, repeat)."""
    spans = {
        tuple(key): (min(g["sent_s"].min(), g["scheduled_s"].min()), g["end_s"].max())
        for key, g in requests.groupby(_RUN_KEY)
    }
    out = {}
    for level, level_runs in levels_of(runs).items():
        keys = level_runs[_RUN_KEY].drop_duplicates().itertuples(index=False, name=None)
        out[level] = [
            Window(str(key[0]), int(key[3]), float(spans[key][0]), float(spans[key][1]))
            for key in keys
            if key in spans
        ]
    return out


# ---- what the rules read of one level ----------------------------------------------------


class _Unevaluable(Exception):
    """A rule lacks what it reads at this level; the message says what."""


def _share(mask: npt.NDArray[np.bool_]) -> float:
    return float(mask.mean()) if mask.size else math.nan


@dataclass(frozen=True, eq=False)
class _LevelData:
    level: Level
    windows: list[Window]
    runs: pd.DataFrame  # the level's runs.parquet rows
    requests: pd.DataFrame  # the requests of its runs
    inside: pd.DataFrame  # telemetry rows inside its windows
    telemetry: pd.DataFrame  # its runs' whole telemetry: a counter's value before a window
    thresholds: Thresholds

    def values(self, metric: str, source: str = "server") -> Floats:
        rows = self.inside[(self.inside["source"] == source) & (self.inside["metric"] == metric)]
        return rows["value"].to_numpy(dtype=np.float64)

    def server(self, metric: str) -> Floats:
        """The scrapes of a server gauge in the level's windows; raises _Unevaluable with too
        few of them."""
        values = self.values(metric)
        self._enough(metric, len(values))
        return values

    def publishes(self, *metrics: str) -> bool:
        """Whether the run has any sample of these metrics, inside the windows or not."""
        return bool(self.telemetry["metric"].isin(metrics).any())

    def _enough(self, metric: str, n: int) -> None:
        need = self.thresholds.min_scrapes
        if n >= need:
            return
        if not self.publishes(metric):
            raise _Unevaluable(f"the server publishes no {metric}")
        raise _Unevaluable(f"{n} scrapes of {metric} in the level's windows; the rule needs {need}")

    def kv_usage(self) -> Floats:
        """KV cache usage (0..1) under vLLM's current name, else its older one."""
        for name in KV_USAGE:
            values = self.values(name)
            if len(values):
                return values
        return np.empty(0)

    def gpu_util(self) -> Floats:
        inside = self.inside
        gpu = inside["source"].str.startswith("gpu") & (inside["metric"] == "gpu_util_pct")
        return inside.loc[gpu, "value"].to_numpy(dtype=np.float64)

    def preemptions(self) -> float | None:
        """How far the preemption counter rose inside the windows; None where it has fewer
        than min_scrapes scrapes in them. Each window counts from the counter's last value
        before it opened (its first inside, where none came before)."""
        if len(self.values(PREEMPTIONS)) < self.thresholds.min_scrapes:
            return None
        counter = self.telemetry[self.telemetry["metric"] == PREEMPTIONS].sort_values("t_s")
        total = 0.0
        for w in self.windows:
            series = counter[counter["run_id"] == w.run_id]
            before = series[series["t_s"] <= w.end_s]
            opened = before[before["t_s"] <= w.start_s]
            inside = before[before["t_s"] >= w.start_s]
            if inside.empty:
                continue
            base = opened["value"].iloc[-1] if len(opened) else inside["value"].iloc[0]
            # max: a server restarted between repeats starts its counter again from zero
            total += max(0.0, float(inside["value"].iloc[-1]) - float(base))
        return total

    def idle_share(self) -> float:
        """The share of the windows' time with no request of the level in flight."""
        total = idle = 0.0
        for w in self.windows:
            rows = self.requests[
                (self.requests["run_id"] == w.run_id) & (self.requests["repeat"] == w.repeat)
            ]
            busy, reach = 0.0, w.start_s
            for sent, end in sorted(zip(rows["sent_s"], rows["end_s"], strict=True)):
                start = max(float(sent), reach)
                if end > start:
                    busy, reach = busy + float(end) - start, float(end)
            total += w.end_s - w.start_s
            idle += max(0.0, w.end_s - w.start_s - busy)
        return idle / total if total > 0 else math.nan

    @property
    def bundled(self) -> bool:
        """Whether the bundled engine served the level: its batch limit is then known."""
        return bool((self.runs["target_kind"] == "bundled").all())

    def batch_limit(self) -> tuple[int, bool] | None:
        """The bundled engine's --max-num-seqs and whether it is the default; None for other
        servers, whose limit is not in the run's config."""
        if not self.bundled:
            return None
        set_to = self.max_num_seqs()
        return (self.thresholds.default_max_num_seqs, True) if set_to is None else (set_to, False)

    def max_num_seqs(self) -> int | None:
        """runtime.max_num_seqs as the run's config set it (bundled engine), else None."""
        if not self.bundled:
            return None
        for text in self.runs["config_yaml"].dropna():
            try:
                value = OmegaConf.select(OmegaConf.create(str(text)), "runtime.max_num_seqs")
            except (OmegaConfBaseException, ValueError):
                continue
            if value is not None:
                return int(value)
        return None

    def ok_requests(self) -> pd.DataFrame:
        return self.requests[self.requests["ok"].astype(bool)]


def _level_data(
    level: Level,
    runs: pd.DataFrame,
    windows: list[Window],
    stored: StoredRun,
    thresholds: Thresholds,
) -> _LevelData:
    requests = stored.requests.merge(runs[_RUN_KEY].drop_duplicates(), on=_RUN_KEY)
    run_ids = {w.run_id for w in windows}
    telemetry = stored.telemetry[stored.telemetry["run_id"].isin(run_ids)]
    mask = np.zeros(len(telemetry), dtype=bool)
    for w in windows:
        t = telemetry["t_s"]
        mask |= ((telemetry["run_id"] == w.run_id) & (t >= w.start_s) & (t <= w.end_s)).to_numpy()
    return _LevelData(level, windows, runs, requests, telemetry[mask], telemetry, thresholds)


# ---- the rules ---------------------------------------------------------------------------


def _num(value: float) -> str:
    """A figure in a sentence: three significant digits, whole numbers from 100 up (as the
    reports write them): 5.95, 429, 31,204."""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


@dataclass(frozen=True)
class _Fired:
    title: str
    evidence: dict[str, float]
    detail: str
    knobs: list[str]


def _load_knobs(level: Level, lower: bool) -> list[str]:
    """The harness's keys that set this level's offered load."""
    how = "lower it" if lower else "raise it"
    if level.request_rate is None:
        return [f"scenario.concurrency: {how} (concurrent users, closed loop)"]
    knobs = [f"scenario.request_rate: {how} (requests per second, open loop)"]
    if level.concurrency is not None and not lower:
        knobs.append("scenario.max_concurrency: raise the cap on requests in flight")
    return knobs


def _under_fed(lv: _LevelData) -> _Fired | None:
    t = lv.thresholds
    waiting = lv.server(WAITING)
    queued = _share(waiting > 0)
    if queued > t.idle_waiting_share:
        return None
    idle = lv.idle_share()
    evidence = {"waiting_share": queued, "scrapes": len(waiting), "idle_share": idle}
    gpu = lv.gpu_util()
    if len(gpu) >= t.min_scrapes:  # the GPU says how busy it is; without NVML, the batch does
        util = float(gpu.mean())
        if util >= t.low_gpu_util_pct:
            return None
        evidence["gpu_util_pct_mean"] = util
        room = f"the GPUs averaged {util:.0f}% utilisation"
    else:
        # Another server's batch limit is unknown: only its idle time can show room.
        limit = lv.batch_limit()
        ceiling = None if limit is None else limit[0]
        running = lv.values(RUNNING)
        mean = float(running.mean()) if len(running) >= t.min_scrapes else math.nan
        small = ceiling is not None and mean < t.low_running_share * ceiling  # False for nan
        if not (small or idle > t.idle_share):
            return None
        whose = "the default --max-num-seqs" if limit and limit[1] else "--max-num-seqs"
        parts = [f"the server was idle (no request in flight) {idle:.0%} of the time"]
        if math.isfinite(mean) and ceiling is not None:
            evidence |= {"running_mean": mean, "max_num_seqs": ceiling}
            parts.append(f"ran {_num(mean)} requests on average, of the {ceiling} {whose} allows")
        room = " and ".join(parts)
    return _Fired(
        title="Under-fed: the server had room to spare and nothing waited",
        evidence=evidence,
        detail=(
            f"Requests waited in {queued:.0%} of {len(waiting)} scrapes, and {room}: the "
            "offered load, not the server, limits throughput."
        ),
        knobs=_load_knobs(lv.level, lower=False),
    )


def _not_kv_pressure(lv: _LevelData) -> tuple[bool, Floats]:
    """Whether the KV cache is known not to be what holds requests back, and its usage."""
    t = lv.thresholds
    kv = lv.kv_usage()
    full = len(kv) >= t.min_scrapes and _share(kv >= t.kv_full) >= t.kv_full_share
    preempted = lv.preemptions() or 0.0
    return not full and preempted < t.min_preemptions, kv


def _batch_cap(lv: _LevelData) -> _Fired | None:
    t = lv.thresholds
    running, waiting = lv.server(RUNNING), lv.server(WAITING)
    ceiling = float(running.max())
    pinned, queued = _share(running == ceiling), _share(waiting > 0)
    if ceiling < 1 or pinned < t.pinned_share or queued < t.queued_share:
        return None
    free, kv = _not_kv_pressure(lv)
    if not free:
        return None  # kv_pressure's finding: the cache, not the batch limit, caps the batch
    limit = lv.batch_limit()
    evidence = {
        "ceiling": ceiling,
        "pinned_share": pinned,
        "waiting_share": queued,
        "waiting_mean": float(waiting.mean()),
    }
    cap = f"{ceiling:.0f}"
    if limit is not None:
        value, default = limit
        evidence["max_num_seqs"] = value
        flag = f"--max-num-seqs {value}" + (", the default" if default else "")
        cap += f" (= {flag})" if value == ceiling else f" ({flag})"
    if len(kv):
        evidence["kv_usage_max"] = float(kv.max())
        memory = f"KV cache usage peaked at {kv.max():.0%}, so memory is not what holds them back"
    else:
        memory = "the server publishes no KV cache usage"
    return _Fired(
        title=f"Batch capped at {ceiling:.0f} running requests while others wait",
        evidence=evidence,
        detail=(
            f"Running requests sat at their maximum, {cap}, in {pinned:.0%} of {len(running)} "
            f"scrapes while requests waited in {queued:.0%} ({_num(waiting.mean())} on average); "
            f"{memory}."
        ),
        knobs=[
            "--max-num-seqs: raise it (runtime.max_num_seqs with target=bundled) so more "
            "requests share each step",
            "--max-num-batched-tokens: raise it with --max-num-seqs, so the larger batch's "
            "prefills fit a step",
        ],
    )


def _kv_pressure(lv: _LevelData) -> _Fired | None:
    t = lv.thresholds
    kv, preempted = lv.kv_usage(), lv.preemptions()
    if len(kv) < t.min_scrapes and preempted is None:
        if not lv.publishes(*KV_USAGE, PREEMPTIONS):
            raise _Unevaluable(f"the server publishes no {KV_USAGE[0]} nor {PREEMPTIONS}")
        raise _Unevaluable(
            f"{len(kv)} scrapes of KV cache usage in the level's windows, and too few of "
            f"{PREEMPTIONS}; the rule needs {t.min_scrapes}"
        )
    evidence: dict[str, float] = {}
    said = []
    full = math.nan
    if len(kv) >= t.min_scrapes:
        full = _share(kv >= t.kv_full)
        evidence |= {"kv_full_share": full, "kv_usage_max": float(kv.max())}
        said.append(
            f"KV cache usage was at or above {t.kv_full:.0%} in {full:.0%} of {len(kv)} "
            f"scrapes (peak {kv.max():.0%})"
        )
    if preempted is not None:
        evidence["preemptions"] = preempted
        said.append(
            f"the engine preempted {preempted:.0f} times, recomputing those requests"
            if preempted
            else "the engine did not preempt"
        )
    if not (full >= t.kv_full_share or (preempted or 0) >= t.min_preemptions):
        return None
    return _Fired(
        title="KV cache pressure: the cache ran full" + (", with preemptions" if preempted else ""),
        evidence=evidence,
        detail=" and ".join(said) + ": the KV cache, not the batch limit, caps concurrency.",
        knobs=[
            "--gpu-memory-utilization: raise it, leaving more memory to the KV cache",
            "--num-gpu-blocks-override: more KV blocks (the bundled engine's --num-kv-blocks, "
            "runtime.num_kv_blocks)",
            "--max-model-len: lower it where long contexts are not needed, so more sequences fit",
            "--max-num-seqs: lower it to stop preempting (fewer sequences, each with room to "
            "finish)",
        ],
    )


def _queue_dominated_ttft(lv: _LevelData) -> _Fired | None:
    t = lv.thresholds
    ok = lv.ok_requests()
    timed = ok[ok["server_queue_ms"].notna() & ok["server_prefill_ms"].notna()]
    if len(timed) < t.min_requests:
        raise _Unevaluable(
            "the server reports no queue and prefill times (usage.timings)"
            if timed.empty
            else f"{len(timed)} successful requests with server timings; the rule needs "
            f"{t.min_requests}"
        )
    queue = timed["server_queue_ms"].to_numpy(dtype=np.float64)
    prefill = timed["server_prefill_ms"].to_numpy(dtype=np.float64)
    longer = _share(queue > prefill)
    if longer < t.queue_share:
        return None
    q50, p50 = float(np.median(queue)), float(np.median(prefill))
    return _Fired(
        title="TTFT dominated by queueing: requests wait longer than they compute",
        evidence={"queue_longer_share": longer, "queue_ms_p50": q50, "prefill_ms_p50": p50},
        detail=(
            f"The server queued {longer:.0%} of {len(timed)} successful requests longer than "
            f"it took to prefill them (median queue {_num(q50)} ms vs prefill {_num(p50)} ms): "
            "this load is past the server's capacity."
        ),
        knobs=[
            *_load_knobs(lv.level, lower=True),
            "--tensor-parallel-size: more GPUs per replica, or more replicas, for more capacity",
        ],
    )


def _client_bound(lv: _LevelData) -> _Fired | None:
    flagged = lv.runs[lv.runs["client_bound"].astype(bool)]
    if flagged.empty:
        return None
    evidence: dict[str, float] = {"repeats": len(flagged), "of_repeats": len(lv.runs)}
    said = []
    for column, what in (("loop_lag_ms_p99", "event-loop lag"), ("send_lag_ms_p99", "send lag")):
        values = flagged[column].astype(float).dropna()
        if len(values):
            evidence[column] = float(values.max())
            said.append(f"{what} p99 up to {_num(values.max())} ms")
    lags = f" ({', '.join(said)})" if said else ""
    return _Fired(
        title="Client-bound: the harness's own event loop lagged",
        evidence=evidence,
        detail=(
            f"{len(flagged)} of {len(lv.runs)} repeats were client-bound{lags}, past "
            "client.lag_threshold_ms: this level's latencies include the client's own delay."
        ),
        knobs=[
            "the harness's machine: run it on a less loaded machine, or not beside the server",
            "client.workers: split the load over more client processes (auto picks enough), or "
            "client.backend=ray for workers on other machines (docs/scale.md)",
        ],
    )


def _tp_imbalance(lv: _LevelData) -> _Fired | None:
    peaks = [np.asarray(v, dtype=np.float64) for v in lv.runs["peak_gpu_memory_mib"]
             if v is not None and len(v)]  # fmt: skip
    gpus = max((len(p) for p in peaks), default=0)
    if gpus < 2:
        raise _Unevaluable("fewer than 2 GPUs measured (NVML)")
    per_gpu = np.vstack([p for p in peaks if len(p) == gpus]).max(axis=0)
    ratio = float(per_gpu.max() / max(float(per_gpu.min()), 1.0))
    if ratio <= lv.thresholds.memory_imbalance:
        return None
    shown = " / ".join(f"{v:,.0f}" for v in per_gpu)
    peaks_mib = {f"gpu{i}_peak_mib": float(v) for i, v in enumerate(per_gpu)}
    return _Fired(
        title=f"Peak memory differs between GPUs by more than "
        f"{lv.thresholds.memory_imbalance - 1:.0%}",
        evidence={"max_over_min": ratio, **peaks_mib},
        detail=(
            f"Peak memory per GPU {shown} MiB (max / min {ratio:.2f}): the model is not split "
            "evenly, or tensor parallelism is not in effect on every GPU."
        ),
        knobs=["--tensor-parallel-size: set it to the number of GPUs the model should span"],
    )


def _step_ms(tokens: float, decode_ms: float, tpot_ms: float) -> float:
    """A request's time per decode step: the server's decode time over its steps where it
    reports one (what the engine did), else the client's TPOT; nan without either."""
    return decode_ms / (tokens - 1) if math.isfinite(decode_ms) else tpot_ms


def _bursts(lv: _LevelData) -> tuple[Floats, Floats, list[int], int]:
    """Over the requests the rule reads: every token's gap to the token before it, its
    request's step time (per gap), the size of every burst, and how many requests."""
    t = lv.thresholds
    ok = lv.ok_requests()
    numbers = ok[["output_tokens", "server_decode_ms", "tpot_ms"]].astype(float).to_numpy()
    gaps: list[Floats] = []
    steps: list[Floats] = []
    sizes: list[int] = []
    for (tokens, decode, tpot), events, counts in zip(
        numbers, ok["event_ms"], ok["event_tokens"], strict=True
    ):
        step = _step_ms(tokens, decode, tpot)
        if not tokens >= t.burst_min_tokens or not step > 0:  # nan fails both
            continue
        # An event carrying k tokens delivers all k at its arrival.
        arrivals = np.repeat(np.asarray(events, np.float64), np.asarray(counts, np.int64))
        gap = np.diff(arrivals)
        if not gap.size:
            continue
        gaps.append(gap)
        steps.append(np.full(gap.size, step))
        # A burst: a token and those arriving close behind it, one after another.
        size = 1
        for close in gap < t.burst_gap_ratio * step:
            if close:
                size += 1
                continue
            if size > 1:
                sizes.append(size)
            size = 1
        if size > 1:
            sizes.append(size)
    if not gaps:
        return np.empty(0), np.empty(0), sizes, 0
    return np.concatenate(gaps), np.concatenate(steps), sizes, len(gaps)


def _bursty_delivery(lv: _LevelData) -> _Fired | None:
    t = lv.thresholds
    gaps, steps, sizes, n = _bursts(lv)
    if n < t.min_requests:
        raise _Unevaluable(
            f"{n} successful requests of {t.burst_min_tokens} or more tokens with a step time; "
            f"the rule needs {t.min_requests}"
        )
    close = gaps < t.burst_gap_ratio * steps
    share = _share(close)
    if share < t.burst_share:
        return None
    apart = float(np.median(gaps[~close])) if (~close).any() else math.nan
    step = float(np.median(steps))
    per_burst = float(np.median(sizes)) if sizes else 1.0
    spacing = f"bursts {_num(apart)} ms apart" if math.isfinite(apart) else "one burst a request"
    return _Fired(
        title="Tokens arrive in bursts, not one decode step apart",
        evidence={
            "burst_share": share,
            "tokens_per_burst_p50": per_burst,
            "burst_gap_ms_p50": apart,
            "step_ms_p50": step,
        },
        detail=(
            f"{share:.0%} of {gaps.size:,} tokens arrived within {t.burst_gap_ratio:g}× the "
            f"step time of the token before (median {_num(per_burst)} tokens per burst, "
            f"{spacing}, against a {_num(step)} ms step): something between the engine and the "
            "client buffers the stream."
        ),
        knobs=[
            "the front end: turn off response buffering in the proxy (nginx: proxy_buffering "
            "off, or the X-Accel-Buffering: no header)",
            "the server's stream interval (vLLM --stream-interval): 1 sends every token",
        ],
    )


Rule = Callable[[_LevelData], _Fired | None]

# Each rule returns a finding, None (it did not fire), or raises _Unevaluable.
RULES: dict[str, Rule] = {
    "under_fed": _under_fed,
    "batch_cap": _batch_cap,
    "kv_pressure": _kv_pressure,
    "queue_dominated_ttft": _queue_dominated_ttft,
    "client_bound": _client_bound,
    "tp_imbalance": _tp_imbalance,
    "bursty_delivery": _bursty_delivery,
}


def _evidence(fired: _Fired) -> dict[str, float]:
    """The figures to four significant digits, what a reader can use; one that could not be
    computed (no gap between bursts when every token came in one) is left out, as strict
    JSON has no NaN."""
    values = ((k, float(v)) for k, v in fired.evidence.items())
    return {k: float(f"{v:.4g}") for k, v in values if math.isfinite(v)}


def diagnose(stored: StoredRun, thresholds: Thresholds = Thresholds()) -> Diagnosis:
    """Every rule at every level of `stored` (one run, or several read by store.load_all)."""
    findings: list[Finding] = []
    evaluated: dict[str, list[str]] = {}
    skipped: list[Skipped] = []
    several = stored.runs["scenario"].nunique() > 1 if len(stored.runs) else False
    windows = level_windows(stored.runs, stored.requests)
    for level, runs in levels_of(stored.runs).items():
        name = level.name if several else level.label
        data = _level_data(level, runs, windows[level], stored, thresholds)
        evaluated[name] = []
        for rule, check in RULES.items():
            try:
                fired = check(data)
            except _Unevaluable as exc:
                skipped.append(Skipped(rule, name, str(exc)))
                continue
            evaluated[name].append(rule)
            if fired is not None:
                findings.append(
                    Finding(
                        rule=rule,
                        title=fired.title,
                        level=name,
                        windows=[[round(w.start_s, 3), round(w.end_s, 3)] for w in data.windows],
                        evidence=_evidence(fired),
                        detail=fired.detail,
                        knobs=fired.knobs,
                    )
                )
    run_ids = sorted({str(r) for r in stored.runs["run_id"]}) if len(stored.runs) else []
    return Diagnosis(run_ids, findings, evaluated, skipped, thresholds)
