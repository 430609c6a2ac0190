"""Incremental Server-Sent Events parsing that keeps the arrival time of the bytes.

Each event is stamped with the time its terminating blank line arrived: the moment the client
could first have acted on it. Parsing happens after the timestamp, so its cost never shows up
as latency.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class SseEvent:
    data: str  # the joined `data:` lines
    arrived_s: float  # time.perf_counter() when the event's last byte arrived


@dataclass
class SseParser:
    _buffer: bytes = field(default=b"")

    def feed(self, chunk: bytes, arrived_s: float) -> list[SseEvent]:
        """Add bytes; return the events they complete."""
        # Normalise line endings so one delimiter search serves all servers; the buffer is
        # included because a CRLF may be split across two chunks.
        self._buffer = (self._buffer + chunk).replace(b"\r\n", b"\n")
        events: list[SseEvent] = []
        while True:
            end = self._buffer.find(b"\n\n")
            if end < 0:
                return events
            block, self._buffer = self._buffer[:end], self._buffer[end + 2 :]
            data = [
                line[5:].removeprefix(b" ")
                for line in block.split(b"\n")
                if line.startswith(b"data:")
            ]
            if data:  # comments (": ping") and event-only blocks carry no payload
                events.append(SseEvent(b"\n".join(data).decode(), arrived_s))

    @property
    def pending(self) -> bytes:
        """Bytes of an event that never completed (a stream cut off mid-event)."""
        return self._buffer
