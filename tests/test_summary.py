"""The results table printed at the end of a run: every figure whole, levels by their load."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import numpy as np
from rich.console import Console

from bench.config import LoadLevel
from bench.records import RequestRecord, RunRecord
from bench.summary import print_summary
from tests.synthetic import request_record, run_record

REPEATS, PER_RUN = 5, 20


@dataclass(frozen=True)
class Figures:
    """One level's figures as the table should show them: (p50, p99) per latency."""

    concurrency: int
    ttft_ms: tuple[float, float]
    itl_ms: tuple[float, float]
    tpot_ms: tuple[float, float]
    e2e_ms: tuple[float, float]
    output_throughput: tuple[float, ...]  # one per repeat
    peak_mib: float


# The concurrency scenario on the bundled engine, 2 cores, as `make baseline` measures it.
CONCURRENCY = [
    Figures(
        concurrency=1,
        ttft_ms=(14.7, 40.9),
        itl_ms=(3.01, 9.5),
        tpot_ms=(3.21, 4.64),
        e2e_ms=(426, 606),
        output_throughput=(309.2, 250, 380, 280, 330),
        peak_mib=614,
    ),
    Figures(
        concurrency=2,
        ttft_ms=(17.4, 64.0),
        itl_ms=(3.39, 15.14),
        tpot_ms=(3.61, 8.72),
        e2e_ms=(475, 1171),
        output_throughput=(512.1, 400, 650, 480, 530),
        peak_mib=614,
    ),
    Figures(
        concurrency=4,
        ttft_ms=(35.9, 210.6),
        itl_ms=(4.94, 25.81),
        tpot_ms=(5.36, 20.13),
        e2e_ms=(714, 2636),
        output_throughput=(722.2, 500, 990, 700, 700),
        peak_mib=614,
    ),
    Figures(
        concurrency=8,
        ttft_ms=(67.6, 141.5),
        itl_ms=(6.25, 19.36),
        tpot_ms=(6.49, 9.69),
        e2e_ms=(891, 1340),
        output_throughput=(1125.6, 900, 1350, 1000, 1300),
        peak_mib=614,
    ),
]


def _records(levels: list[Figures]) -> tuple[list[RunRecord], list[RequestRecord]]:
    """Runs and requests whose pooled p50 and p99 are exactly the figures' pairs: the first 60%
    of a level's requests take the p50 value, the rest the p99 value."""
    runs, requests = [], []
    for level, f in enumerate(levels):
        for repeat in range(REPEATS):
            run = run_record(
                scenario="concurrency",
                level=level,
                repeat=repeat,
                concurrency=f.concurrency,
                output_throughput=f.output_throughput[repeat],
                request_throughput=8.79,
                peak_rss_mib=f.peak_mib,
            )
            runs.append(run)
            for i in range(PER_RUN):
                k = int(repeat * PER_RUN + i >= 0.6 * REPEATS * PER_RUN)
                request = request_record(
                    scenario="concurrency",
                    level=level,
                    repeat=repeat,
                    index=i,
                    concurrency=f.concurrency,
                    ttft_ms=f.ttft_ms[k],
                    tpot_ms=f.tpot_ms[k],
                    e2e_ms=f.e2e_ms[k],
                    itl_ms=[f.itl_ms[k]] * 3,
                )
                requests.append(request)
    return runs, requests


def _expected(f: Figures) -> list[str]:
    tps = np.array(f.output_throughput)
    return [
        *(f"{v:,.1f}" for v in f.ttft_ms),
        *(f"{v:,.2f}" for v in (*f.itl_ms, *f.tpot_ms)),
        *(f"{v:,.0f}" for v in f.e2e_ms),
        f"{tps.mean():,.1f}",
        f"± {tps.std(ddof=1):,.1f}",
        f"{f.peak_mib:,.0f} RSS",
    ]


def _render(levels: list[Figures], width: int) -> str:
    console = Console(width=width, record=True, file=io.StringIO())
    print_summary(*_records(levels), console=console)
    return console.export_text()


def _whole(figure: str, text: str) -> bool:
    """`figure` appears with no digit, comma or point glued to either side."""
    return re.search(rf"(?<![\d.,]){re.escape(figure)}(?![\d.,])", text) is not None


def test_the_standard_scenario_fits_80_columns_with_every_figure_whole() -> None:
    text = _render(CONCURRENCY, 80)
    assert "…" not in text
    assert max(len(line) for line in text.splitlines()) <= 80
    missing = [x for f in CONCURRENCY for x in _expected(f) if not _whole(x, text)]
    assert missing == []


def test_figures_too_wide_for_the_terminal_are_printed_whole_not_cut() -> None:
    huge = Figures(
        concurrency=1,
        ttft_ms=(10_345.6, 20_987.4),
        itl_ms=(1_025.81, 2_048.33),
        tpot_ms=(120.13, 999.99),
        e2e_ms=(123_456, 234_567),
        output_throughput=(12_345.6, 11_000, 13_000, 12_000, 12_500),
        peak_mib=61_400,
    )
    text = _render([huge], 60)
    assert "…" not in text
    missing = [x for x in _expected(huge) if not _whole(x, text)]
    assert missing == []


def test_levels_are_labelled_by_lengths_and_load_as_the_progress_labels_them() -> None:
    text = _render(CONCURRENCY, 80)
    labels = [LoadLevel(i, 64, 128, f.concurrency, None).label for i, f in enumerate(CONCURRENCY)]
    rows = [line.split() for line in text.splitlines()]
    starts = [" ".join(words[:2]) for words in rows if words]
    assert all(label in starts for label in labels)
    # No row starts with a bare level index.
    assert not any(re.fullmatch(r"\d+", words[0]) for words in rows if words)


def test_the_title_names_the_scenario() -> None:
    assert "concurrency:" in _render(CONCURRENCY, 80).splitlines()[0]


def test_failed_requests_and_client_bound_repeats_are_called_out() -> None:
    runs, requests = _records(CONCURRENCY[:1])
    runs[0] = run_record(**{**vars(runs[0]), "client_bound": True})
    requests[0] = request_record(**{**vars(requests[0]), "ok": False})
    console = Console(width=80, record=True, file=io.StringIO())
    print_summary(runs, requests, console)
    text = " ".join(console.export_text().split())
    assert "99/100" in text and "1 failed" in text
    assert "client-bound" in text and f"{LoadLevel(0, 64, 128, 1, None).label} in 1 of 5" in text
