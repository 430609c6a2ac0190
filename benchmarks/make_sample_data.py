"""Write the sample inputs of scenario=dataset and scenario=trace_replay, deterministically.

    .venv/bin/python benchmarks/make_sample_data.py [--out scenarios/data]

conversations.json: 256 synthetic ShareGPT conversations (prompts of 4 to ~300 words and replies
of 8 to ~400, log-normally spread as chat lengths are, some with more turns), for demos and
tests without downloading ShareGPT. trace.jsonl: 40 requests in Mooncake's trace format over
about 10 s, in a few sessions whose requests share leading hash blocks, as multi-turn chats do.
The same command always writes the same bytes (tests check the committed files against it).
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "scenarios" / "data"
SEED = 0
_WORDS = (
    "the a model server request token batch cache prefix latency queue memory kernel layer "
    "attention decode prefill user answer question explain why how what when which long short "
    "fast slow first next time data file run test result value number list table graph speed "
    "load level rate engine block page share group text word line write read send stream "
    "compare measure build change improve check report error limit bound size weight matrix "
    "vector sum mean median tail spread sample trace replay time scale and of to in is for on "
    "with as by at from it be this that are not can will should would could please"
).split()


def _sentence(rng: random.Random, words: int) -> str:
    text = " ".join(rng.choice(_WORDS) for _ in range(words))
    return text[0].upper() + text[1:] + "."


def _text(rng: random.Random, words: int) -> str:
    parts, left = [], words
    while left > 0:
        n = min(left, rng.randint(5, 18))
        parts.append(_sentence(rng, n))
        left -= n
    return " ".join(parts)


def _length(rng: random.Random, median: float, sigma: float, low: int, high: int) -> int:
    return max(low, min(high, round(median * math.exp(rng.gauss(0.0, sigma)))))


def conversations(n: int = 256, seed: int = SEED) -> list[dict[str, object]]:
    rng = random.Random(seed)
    out: list[dict[str, object]] = []
    for i in range(n):
        turns = []
        for _ in range(1 if rng.random() < 0.8 else rng.randint(2, 3)):
            turns.append({"from": "human", "value": _text(rng, _length(rng, 24, 0.9, 4, 300))})
            turns.append({"from": "gpt", "value": _text(rng, _length(rng, 40, 0.8, 8, 400))})
        out.append({"id": f"synthetic-{i}", "conversations": turns})
    return out


def trace(n: int = 40, seed: int = SEED) -> list[dict[str, object]]:
    """Sessions of growing context: each turn resends the session's blocks and adds its own."""
    rng = random.Random(seed)
    rows: list[dict[str, object]] = []
    sessions: list[list[int]] = []
    next_id, t_ms = 0, 0
    for _ in range(n):
        if not sessions or (rng.random() < 0.35 and len(sessions) < 8):
            sessions.append([])
        blocks = rng.choice(sessions)
        if len(blocks) >= 3:  # the context is full: a new chat in its place
            blocks.clear()
        fresh = rng.randint(1, 2)
        blocks.extend(range(next_id, next_id + fresh))
        next_id += fresh
        last = rng.randint(64, 512)  # the newest block is partly filled
        rows.append(
            {
                "timestamp": t_ms,
                "input_length": 512 * (len(blocks) - 1) + last,
                "output_length": rng.randint(8, 64),
                "hash_ids": list(blocks),
            }
        )
        t_ms += round(rng.expovariate(4.0) * 1000)
    return rows


def write(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    conv = out / "conversations.json"
    # One conversation a line: still one JSON list, and a readable diff.
    conv.write_text("[\n" + ",\n".join(json.dumps(c) for c in conversations()) + "\n]\n")
    tr = out / "trace.jsonl"
    tr.write_text("".join(json.dumps(row) + "\n" for row in trace()))
    return [conv, tr]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help="folder to write to")
    for path in write(parser.parse_args().out):
        print(f"{path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
