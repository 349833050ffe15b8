"""The journal: every event gets its global ``seq`` and its stream's ``stream_seq`` here, is
written to SQLite with the turn's transaction, and only then handed to the bus to publish.

The counters live in this object only. The kernel's own events come through :meth:`emit`, workers'
events (validated by ingest, already packed) through :meth:`extend`, a run at a time; nothing else
numbers an event, so no caller can hold a counter across another emit.
"""

from __future__ import annotations

from typing import Any

from llmos.kernel.store import Store
from llmos.protocol import (
    STAMPED_HEAD,
    encode_body,
    make_header,
    pack_item,
    stamp,
    stamp_tail,
    stream_of,
    type_name_of,
)

__all__ = ["Journal"]

_ROW = 1000  # events per journal row at most (the same items one PUB message carries)


class Journal:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.seq = store.last_seq()
        self.journaled = 0  # events numbered since boot
        self._stream_seq: dict[str, int] = {}  # stream -> its last stream_seq (streams touched since boot)
        self._turn: dict[str, list[bytes]] = {}  # stream -> this turn's stamped items, in order
        self._written: dict[str, int] = {}  # stream -> items of this turn already written
        self._own: list[tuple[str, bytes]] = []  # this turn's kernel events, unstamped (kept again when a commit is refused)
        self.refusing = False  # the disk is full: workers' events are not journaled (their streams are noted in refused)
        self.refused: set[str] = set()
        self.refused_events = 0
        self.barred: set[str] = set()  # streams of jobs stopped for lack of space: refused until they end

    def _last(self, stream: str) -> int:
        last = self._stream_seq.get(stream)
        return self.store.last_stream_seq(stream) if last is None else last

    def emit(self, topic: str, msg: Any, sender: str = "kernel") -> None:
        """Journal an event the kernel makes (published after the turn's commit)."""
        item = pack_item(topic, make_header(type_name_of(msg), sender), encode_body(msg))
        self._own.append((topic, item))
        self.append(topic, item)

    def append(self, topic: str, item: bytes) -> None:
        """Number a packed [topic, header, body] and queue it for the store and the bus."""
        stream = stream_of(topic)
        last = self._last(stream) + 1
        self.seq += 1
        self._stream_seq[stream] = last
        self._turn.setdefault(stream, []).append(stamp(item, self.seq, last))
        self.journaled += 1

    def extend(self, stream: str, raws: list[bytes]) -> None:
        """Number a run of workers' packed items, all on ``stream`` (ingest's hot path)."""
        if not raws:
            return
        if self.refusing or stream in self.barred:
            self.refused.add(stream)
            self.refused_events += len(raws)
            return
        seq, last, tail, head = self.seq, self._last(stream), stamp_tail, STAMPED_HEAD
        self._turn.setdefault(stream, []).extend([head + raw[1:] + tail(seq + i, last + i) for i, raw in enumerate(raws, 1)])
        n = len(raws)
        self.seq, self._stream_seq[stream] = seq + n, last + n
        self.journaled += n

    def forget(self, stream: str) -> None:
        """A finished stream: drop its counter (a later event looks it up in the store again)."""
        self._stream_seq.pop(stream, None)
        self.barred.discard(stream)

    @property
    def has_pending(self) -> bool:
        return bool(self._turn)

    def write(self) -> None:
        """Write this turn's events not written yet, one row per stream (and 1,000 events). A
        replay in mid-turn writes them early, so it sees them."""
        done, append = self._written, self.store.append_batch
        for stream, items in self._turn.items():
            start = done.get(stream, 0)
            if start < len(items):
                for i in range(start, len(items), _ROW):
                    append(stream, items[i : i + _ROW])
                done[stream] = len(items)

    def end_turn(self) -> dict[str, list[bytes]]:
        """Write what is left and hand over the turn's events (to publish once :meth:`committed`)."""
        if self._turn:
            self.write()
        return self._turn

    def committed(self) -> None:
        """The turn's commit went through: its events are the journal's."""
        if self._turn:
            self._turn, self._written = {}, {}
        self._own = []

    def rewrite(self) -> None:
        """The store rolled back what was written of this turn: write all of it again."""
        self._written = {}

    def rollback(self) -> set[str]:
        """The turn's commit was refused (the disk is full): forget its events, number the
        journal from what is stored again, and journal the kernel's own events of the turn anew
        (small: job states, the storage event). Returns the streams whose workers' events were
        dropped."""
        own: dict[str, int] = {}
        for topic, _item in self._own:
            own[stream_of(topic)] = own.get(stream_of(topic), 0) + 1
        dropped = {stream for stream, items in self._turn.items() if len(items) > own.get(stream, 0)}
        kept = self._own
        self.journaled -= sum(len(items) for items in self._turn.values())
        self._turn, self._written, self._own = {}, {}, []
        self._stream_seq.clear()
        self.seq = self.store.last_seq()
        for topic, item in kept:
            self._own.append((topic, item))
            self.append(topic, item)
        return dropped

    def replay(self, prefix: str, since: int, until: int | None, limit: int) -> tuple[list[bytes], bool]:
        """Stored events after ``since`` on streams starting with ``prefix``; ``more`` when the
        limit cut the answer short."""
        self.write()
        rows = self.store.replay(prefix, max(0, since), until, limit)
        return [item for _, item in rows], len(rows) == limit

    def stream_heads(self, prefix: str, since: int) -> dict[str, list[int]]:
        """Each stream's last (stream_seq, seq) among those that changed after ``since``."""
        self.write()
        heads = self.store.stream_heads(prefix, max(0, since))
        return {stream: [sseq, seq] for stream, (sseq, seq) in heads.items()}
