"""Event streams: the journal, then live events off the bus, each exactly once and in order.

:class:`EventStream` is what :meth:`Client.events <llmos.client.Client.events>` and
:meth:`Job.events <llmos.job.Job.events>` iterate; it owns one SUB socket and is used by the
thread that iterates it (the requests it makes go through the client's shared connection).
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import zmq

from llmos.errors import LlmosError
from llmos.protocol import (
    END_STATES,
    STREAM_KINDS,
    Event,
    StreamHeadsRequest,
    event_from_item,
    unpackb,
)

if TYPE_CHECKING:
    from llmos.client import Client



def is_end(event: Event) -> bool:
    return event.type == "job.state" and event.body.get("state") in END_STATES


def whole_stream(prefix: str) -> str:
    """``job.1`` means the stream job.1, not job.10 too."""
    parts = prefix.split(".")
    if len(parts) == 2 and parts[0] in STREAM_KINDS and parts[1]:
        return prefix + "."
    return prefix


def sub_prefix(prefix: str) -> str:
    """What to subscribe to so that every event of each stream the prefix touches arrives:
    ``job.5.log`` -> ``job.5.`` (gap detection needs the whole stream)."""
    parts = prefix.split(".")
    if len(parts) >= 3 and parts[0] in STREAM_KINDS:
        return ".".join(parts[:2]) + "."
    if len(parts) >= 2 and parts[0] not in STREAM_KINDS:
        return parts[0] + "."
    if len(parts) == 1 and parts[0] and parts[0] not in STREAM_KINDS:
        return parts[0] + "."  # "kernel" is the stream "kernel" (PUB topics end with a dot)
    return prefix


class EventStream:
    """Replay, then live, with no loss and no repeats.

    It subscribes before replaying, so nothing falls between the two once the subscription is in
    effect. Each stream's ``stream_seq`` must grow by one: a repeat is dropped, a gap (PUB drops at
    its high-water mark) is filled from the journal. A message lost with nothing after it on its
    stream (dropped, or published before the subscription reached the kernel) leaves no gap to
    see: every ``CHECK`` seconds the stream asks the kernel for the newest event of each stream
    it follows, and catches up any it is behind on: at once when the bus is quiet, else when it
    is still behind at the next check (by then anything that was in flight has arrived).
    ``complete`` is the seq up to which delivery is verified, where those checks start.
    """

    CHECK = 0.5

    def __init__(self, client: Client, prefix: str, since: int, timeout: float | None, stop: threading.Event | None = None) -> None:
        self.stop = stop  # set by another thread: the live loop ends within CHECK seconds
        self.client = client
        self.prefix = prefix
        self.sub_prefix = sub_prefix(prefix)
        self.since = since
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.known: dict[str, tuple[int, int]] = {}  # stream -> (stream_seq, seq) last delivered
        self.high = since
        self.complete = since  # every wanted event up to this seq has been delivered
        self._replayed_to = since  # last_seq of the last replay page
        self._behind: dict[str, list[int]] = {}  # streams behind at the last busy check
        self._behind_last: int | None = None  # that check's last_seq
        self.sub = client._ctx.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.setsockopt(zmq.RCVHWM, 100_000)
        client.secure(self.sub)
        self.sub.connect(client.endpoints["events"])
        self.sub.setsockopt(zmq.SUBSCRIBE, self.sub_prefix.encode())

    def close(self) -> None:
        self.sub.close(0)

    def _accept(self, event: Event) -> Event | None:
        """Record ``event`` as delivered; return it if the caller's prefix wants it."""
        self.known[event.stream] = (event.stream_seq, event.seq)
        if event.seq > self.high:
            self.high = event.seq
        return event if event.topic.startswith(self.prefix) else None

    def _replay_all(self, prefix: str, since: int, until: int | None = None) -> Iterator[Event]:
        while True:
            events, last_seq, more = self.client.replay(prefix, since=since, until=until, limit=1000)
            self._replayed_to = last_seq
            yield from events
            if not events or not more:
                return
            since = events[-1].seq

    def history(self) -> Iterator[Event]:
        for event in self._replay_all(self.sub_prefix, self.since):
            if self._accept(event) is not None:
                yield event
        self.complete = max(self.complete, self._replayed_to)

    def history_after(self) -> Iterator[Event]:
        """What was journaled since the history (or the last live event) was read."""
        for event in self._replay_all(self.sub_prefix, self.high):
            yield from self._live_one(event)

    def _deliver_range(self, stream: str, after_seq: int, until: int) -> Iterator[Event]:
        """``stream``'s journaled events in (after_seq, until] not delivered yet."""
        for event in self._replay_all(stream + ".", after_seq, until):
            fresh = event.stream == stream and event.stream_seq > self.known.get(stream, (0, 0))[0]
            if fresh and self._accept(event) is not None:
                yield event

    def _fill(self, stream: str, after_seq: int, before: Event) -> Iterator[Event]:
        """A gap seen live: what came before ``before`` on its stream."""
        return self._deliver_range(stream, after_seq, before.seq - 1)

    def _live_one(self, event: Event) -> Iterator[Event]:
        stream = event.stream
        last = self.known.get(stream)
        if last is not None and event.stream_seq <= last[0]:
            return  # already delivered (seen in the replay)
        if (last is None and event.stream_seq > 1) or (last is not None and event.stream_seq > last[0] + 1):
            yield from self._fill(stream, last[1] if last else self.since, event)
        if self._accept(event) is not None:
            yield event

    def _behind_on(self, stream: str, head: list[int]) -> bool:
        return self.known.get(stream, (0, 0))[0] < head[0]

    def _catch_up(self, stream: str, until: int) -> Iterator[Event]:
        """Deliver ``stream``'s events up to seq ``until`` that were not delivered yet."""
        last = self.known.get(stream)
        return self._deliver_range(stream, last[1] if last else self.since, until)

    def _check(self, idle: bool) -> Iterator[Event]:
        """Ask for every followed stream's newest event; catch up where behind (see the class)."""
        reply = self.client.request(StreamHeadsRequest(prefix=self.sub_prefix, since=self.complete))
        heads: dict[str, list[int]] = reply.heads
        if idle:
            for stream, head in heads.items():
                if self._behind_on(stream, head):
                    yield from self._catch_up(stream, head[1])
            self.complete = max(self.complete, reply.last_seq)
            self._behind, self._behind_last = {}, None
            return
        for stream, head in self._behind.items():
            if self._behind_on(stream, head):
                yield from self._catch_up(stream, head[1])
        if self._behind_last is not None:
            self.complete = max(self.complete, self._behind_last)
        self._behind = {stream: head for stream, head in heads.items() if self._behind_on(stream, head)}
        self._behind_last = reply.last_seq

    def live(self) -> Iterator[Event]:
        known, prefix = self.known, self.prefix
        next_check = time.monotonic() + self.CHECK
        while True:
            now = time.monotonic()
            wait = max(0.0, next_check - now)
            if self.stop is not None and self.stop.is_set():
                return
            if self.deadline is not None:
                left = self.deadline - now
                if left <= 0:
                    return
                wait = min(wait, left)
            if self.sub.poll(int(wait * 1000) + 1):
                while True:
                    try:
                        frames = self.sub.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    stream, events = decode_pub(frames)
                    for event in events:
                        last = known.get(stream)
                        if last is not None and event.stream_seq == last[0] + 1:
                            # The common case, inline: the next event of a stream we follow.
                            known[stream] = (event.stream_seq, event.seq)
                            if event.seq > self.high:
                                self.high = event.seq
                            if event.topic.startswith(prefix):
                                yield event
                        else:
                            yield from self._live_one(event)
                if time.monotonic() >= next_check:
                    yield from self._check(idle=False)
                    next_check = time.monotonic() + self.CHECK
            elif time.monotonic() >= next_check:
                yield from self._check(idle=True)  # quiet: make sure nothing was dropped on the way
                next_check = time.monotonic() + self.CHECK


def decode_pub(frames: list[bytes]) -> tuple[str, list[Event]]:
    """(stream, events) of one PUB message: the kernel sends one stream's events per message,
    under the topic ``<stream>.``; anything else is dropped."""
    if len(frames) != 2 or not frames[0].endswith(b"."):
        return "", []
    # Up to 1,000 events of maps: with the collector on, their allocation alone triggers
    # collections of everything the caller holds (msgpack's own advice for large messages).
    collecting = gc.isenabled()
    gc.disable()
    try:
        topic = frames[0].decode()
        events = [event_from_item(item) for item in unpackb(frames[1])]
    except (LlmosError, UnicodeDecodeError):
        return "", []
    finally:
        if collecting:
            gc.enable()
    if topic.count(".") > 2 or not all([event.topic.startswith(topic) for event in events]):
        return "", []
    return topic[:-1], events



__all__ = ["EventStream", "decode_pub", "is_end", "sub_prefix", "whole_stream"]
