"""A load level and the statistics every output shows for it, each under one name.

A level is a (scenario, lengths, load) point: its runs are the rows of runs.parquet with that
key, one per repeat, and its requests are those of its runs. The console table, `bench.report`,
`bench.compare` and the figures all group, name, sort and plot levels through `Level`, and read
a level's numbers from `level_stats`, so one name never carries two numbers
(docs/metrics.md, "The statistics of a level"):

- TTFT, ITL, TPOT, E2E p50 / p99: over every successful request of every repeat, pooled (ITL:
  every token gap), numpy's linear percentile as for each run's own; TTFO likewise, over those
  that streamed reasoning before their answer (a level without any has no TTFO);
- out tok/s, req/s: the mean over repeats of each run's value, ± their sample standard
  deviation;
- peak MiB: `peak_memory`, the maximum over repeats of the GPU total where NVML measured it,
  else of the server's RSS;
- success: successful requests / requests sent, over every repeat.

Requests sent during a ramp-up (`ramp_up`) are in none of them (`level_requests`).

A comparison tests per-run values instead (one per repeat) and shows them under names of their
own (`bench.comparison.Metric.name`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np
import pandas as pd

from bench.metrics import Distribution

# What level_stats reads; bench.figures.Build checks a build has them.
RUN_COLUMNS = (
    "run_id",
    "level",
    "scenario",
    "input_tokens",
    "output_tokens",
    "concurrency",
    "request_rate",
    "status",
    "client_bound",
    "output_throughput",
    "request_throughput",
    "peak_gpu_memory_mib_total",
    "peak_rss_mib",
)
REQUEST_COLUMNS = (
    "run_id",
    "level",
    "scenario",
    "ok",
    "ramp_up",
    "ttft_ms",
    "ttfo_ms",
    "itl_ms",
    "tpot_ms",
    "e2e_ms",
)


def load_text(concurrency: int | None, request_rate: float | None) -> str:
    """The load alone: "c=8" (closed loop, users); "2/s ≤8" (open loop, with its cap on
    requests in flight where one is set; the rate as written)."""
    if request_rate is None:
        return f"c={concurrency}"
    cap = f" ≤{concurrency}" if concurrency else ""
    return f"{request_rate:g}/s{cap}"


def label(
    input_tokens: int, output_tokens: int, concurrency: int | None, request_rate: float | None
) -> str:
    """A level within its scenario: "64/128 c=8", "64/128 2/s ≤8" (config.LoadLevel's too)."""
    return f"{input_tokens}/{output_tokens} {load_text(concurrency, request_rate)}"


@dataclass(frozen=True)
class Level:
    """The key of a load level, equal across builds whatever their level indices."""

    scenario: str
    input_tokens: int
    output_tokens: int
    concurrency: int | None  # closed loop: users; open loop: cap on in flight (None = no cap)
    request_rate: float | None  # None = closed loop

    @property
    def load(self) -> str:
        return load_text(self.concurrency, self.request_rate)

    @property
    def label(self) -> str:
        return label(self.input_tokens, self.output_tokens, self.concurrency, self.request_rate)

    @property
    def name(self) -> str:
        """The label with its scenario, for outputs that hold several: "short_qa 64/128 c=1"."""
        return f"{self.scenario} {self.label}"

    @property
    def x(self) -> float:
        """The load axis of figures: request rate in open loop, users in closed loop."""
        return self.request_rate if self.request_rate is not None else float(self.concurrency or 0)

    @property
    def in_words(self) -> str:
        """The load for a sentence: "8 concurrent users", "2 req/s"."""
        if self.request_rate is not None:
            return f"{self.request_rate:g} req/s"
        users = self.concurrency or 0
        return f"{users} concurrent user{'s' * (users != 1)}"

    @property
    def sweep(self) -> tuple[str, int, int, bool]:
        """The levels of one sweep share this: scenario, lengths and kind of load."""
        return (self.scenario, self.input_tokens, self.output_tokens, self.request_rate is None)

    def sort_key(self) -> tuple[str, int, int, bool, float, float]:
        """Scenario, then lengths, then closed before open loop, then rising load."""
        cap = math.inf if self.concurrency is None else float(self.concurrency)
        return (*self.sweep[:3], self.request_rate is not None, self.x, cap)


def _null(value: Any) -> bool:
    return value is None or bool(pd.isna(value))


def levels_of(runs: pd.DataFrame) -> dict[Level, pd.DataFrame]:
    """runs.parquet rows grouped by level, in `Level.sort_key` order. Nulls are keys too: an
    open loop has no concurrency (or its in-flight cap)."""
    if runs.empty:
        return {}
    keys = ["scenario", "input_tokens", "output_tokens", "concurrency", "request_rate"]
    out = {}
    for key, frame in runs.groupby(keys, dropna=False, sort=False):
        scenario, n_in, n_out, concurrency, rate = cast(tuple[Any, ...], key)
        level = Level(
            scenario=str(scenario),
            input_tokens=int(n_in),
            output_tokens=int(n_out),
            concurrency=None if _null(concurrency) else int(concurrency),
            request_rate=None if _null(rate) else float(rate),
        )
        out[level] = frame
    return dict(sorted(out.items(), key=lambda item: item[0].sort_key()))


def steady(requests: pd.DataFrame) -> pd.DataFrame:
    """The requests outside any ramp-up (`ramp_up`; null in files older than the column, and
    absent from an empty frame): what every statistic and figure is of."""
    if "ramp_up" not in requests:
        return requests
    return requests[~requests["ramp_up"].eq(True)]


def level_requests(requests: pd.DataFrame, level_runs: pd.DataFrame) -> pd.DataFrame:
    """The steady-state requests of a level's runs: those sent during a ramp-up (`ramp_up`;
    null in files older than the column) are left out, as from each run's own row. Joined on
    the run (run_id, scenario, level), not on the load: per-request lengths vary around the
    level's (range_ratio), and one scenario may sweep lengths at one load."""
    keys = ["run_id", "scenario", "level"]
    return steady(requests).merge(level_runs[keys].drop_duplicates(), on=keys)


# ---- the statistics of a level -----------------------------------------------------------


@dataclass(frozen=True)
class MeanSd:
    """A per-run value over the repeats of a level."""

    mean: float
    sd: float  # sample standard deviation (n - 1); 0 for a single repeat


@dataclass(frozen=True)
class PeakMemory:
    mib: float
    kind: Literal["GPU", "RSS"]  # GPU: the total of every GPU (NVML); RSS: the server's tree


def run_peaks(runs: pd.DataFrame) -> tuple[Literal["GPU", "RSS"], list[float]] | None:
    """Each run's peak memory under the one rule: the GPU total where any run measured one,
    else the server's RSS (CPU); None when neither was measured."""
    gpu = runs["peak_gpu_memory_mib_total"].astype(float).dropna()
    if len(gpu):
        return "GPU", gpu.tolist()
    rss = runs["peak_rss_mib"].astype(float).dropna()
    return ("RSS", rss.tolist()) if len(rss) else None


def peak_memory(runs: pd.DataFrame) -> PeakMemory | None:
    """A level's peak memory: the maximum over its runs of `run_peaks`."""
    peaks = run_peaks(runs)
    return None if peaks is None else PeakMemory(max(peaks[1]), peaks[0])


@dataclass(frozen=True)
class LevelStats:
    """What every output shows for a level (the module's table defines each)."""

    level: Level
    repeats: int
    sent: int
    completed: int
    ttft_ms: Distribution  # pooled over the level's successful requests
    ttfo_ms: Distribution  # pooled over those with reasoning before the answer; often empty
    itl_ms: Distribution  # pooled over their token gaps
    tpot_ms: Distribution
    e2e_ms: Distribution
    output_throughput: MeanSd
    request_throughput: MeanSd
    peak_memory: PeakMemory | None
    client_bound: int  # repeats whose client event loop lagged
    partial: int  # repeats that stopped early

    @property
    def failed(self) -> int:
        return self.sent - self.completed

    @property
    def has_ttfo(self) -> bool:
        """Whether any request of the level streamed reasoning before its answer."""
        return self.ttfo_ms.p50 is not None

    @property
    def success_rate(self) -> float:
        return self.completed / self.sent if self.sent else math.nan


def _mean_sd(values: pd.Series[Any]) -> MeanSd:
    v = values.astype(float).dropna().to_numpy()
    if not v.size:
        return MeanSd(math.nan, math.nan)
    return MeanSd(float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0)


def _pooled(ok: pd.DataFrame, column: str) -> Distribution:
    return Distribution.of(ok[column].dropna().astype(float).tolist())


def _pooled_itl(ok: pd.DataFrame) -> Distribution:
    gaps = [np.asarray(v, dtype=np.float64) for v in ok["itl_ms"] if v is not None]
    return Distribution.of(np.concatenate(gaps).tolist() if gaps else [])


def level_stats(runs: pd.DataFrame, requests: pd.DataFrame) -> list[LevelStats]:
    """Every level of runs.parquet rows (one build: one or more runs concatenated) with its
    requests.parquet rows, in `Level.sort_key` order."""
    out = []
    for level, level_runs in levels_of(runs).items():
        reqs = level_requests(requests, level_runs)
        ok = reqs[reqs["ok"].astype(bool)]
        out.append(
            LevelStats(
                level=level,
                repeats=len(level_runs),
                sent=len(reqs),
                completed=len(ok),
                ttft_ms=_pooled(ok, "ttft_ms"),
                ttfo_ms=_pooled(ok, "ttfo_ms"),
                itl_ms=_pooled_itl(ok),
                tpot_ms=_pooled(ok, "tpot_ms"),
                e2e_ms=_pooled(ok, "e2e_ms"),
                output_throughput=_mean_sd(level_runs["output_throughput"]),
                request_throughput=_mean_sd(level_runs["request_throughput"]),
                peak_memory=peak_memory(level_runs),
                client_bound=int(level_runs["client_bound"].astype(bool).sum()),
                partial=int((level_runs["status"] != "complete").sum()),
            )
        )
    return out
