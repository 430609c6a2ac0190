from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from bench.sse import SseParser

STREAM = b': keep-alive\n\ndata: {"a": 1}\n\ndata: {"b": 2}\r\n\r\nevent: ping\n\ndata: [DONE]\n\n'


@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_events_are_the_same_however_the_bytes_are_split(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(STREAM)]
    parser = SseParser()
    events = []
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        events += parser.feed(STREAM[a:b], float(i))
    assert [e.data for e in events] == ['{"a": 1}', '{"b": 2}', "[DONE]"]
    assert parser.pending == b""


def test_an_event_is_stamped_with_the_arrival_of_its_last_byte() -> None:
    parser = SseParser()
    assert parser.feed(b'data: {"a"', 1.0) == []
    (event,) = parser.feed(b": 1}\n\ndata: x", 2.5)
    assert event.arrived_s == 2.5
    assert parser.pending == b"data: x"


def test_multiline_data_is_joined() -> None:
    (event,) = SseParser().feed(b"data: a\ndata: b\n\n", 0.0)
    assert event.data == "a\nb"
