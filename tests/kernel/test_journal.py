"""The batched event journal (kernel/store.py): one row per stream and turn, replayed in seq order."""

from __future__ import annotations

import random
import sqlite3

from llmos.kernel.store import Store, seq_of, topic_of
from llmos.protocol import pack_item, stamp


def _item(topic: str, seq: int, stream_seq: int) -> bytes:
    return stamp(pack_item(topic, {"v": 1, "type": "job.log", "id": f"e{seq}", "ts": 0.0, "sender": "w"}, {"n": seq}), seq, stream_seq)


def _fill(store: Store, turns: int, seed: int = 0) -> list[tuple[int, str, bytes]]:
    """Interleave events of three streams over many turns, each turn journaled per stream."""
    rng = random.Random(seed)
    seq = 0
    stream_seq: dict[str, int] = {}
    written: list[tuple[int, str, bytes]] = []
    for _ in range(turns):
        batch: dict[str, list[bytes]] = {}
        for _ in range(rng.randint(1, 40)):
            stream = rng.choice(["job.1", "job.2", "job.12"])
            topic = stream + rng.choice([".log", ".progress", ".state", ".a_long_topic_name_over_thirty_two_bytes"])
            seq += 1
            stream_seq[stream] = stream_seq.get(stream, 0) + 1
            item = _item(topic, seq, stream_seq[stream])
            batch.setdefault(stream, []).append(item)
            written.append((seq, topic, item))
        for stream, items in batch.items():
            store.append_batch(stream, items)
        store.commit()
    return written


def test_replay_merges_interleaved_batches_in_seq_order(tmp_path):
    store = Store(tmp_path / "state.db")
    written = _fill(store, 200)
    assert store.last_seq() == written[-1][0]
    assert store.count_events() == len(written)
    assert store.max_span > 1  # batches really interleave
    for prefix in ("", "job.", "job.1.", "job.12.", "job.2.log", "job.1.a_long"):
        for since, until, limit in ((0, None, 10**6), (137, None, 10**6), (50, 900, 25), (len(written) - 3, None, 10)):
            want = [(s, item) for s, topic, item in written if s > since and (until is None or s <= until) and topic.startswith(prefix)][:limit]
            assert store.replay(prefix, since, until, limit) == want, (prefix, since, until, limit)
    assert store.last_stream_seq("job.12") == sum(1 for _, topic, _ in written if topic.startswith("job.12."))
    assert store.last_stream_seq("job.99") == 0


def test_items_keep_their_bytes_and_topics(tmp_path):
    store = Store(tmp_path / "state.db")
    written = _fill(store, 20, seed=3)
    store.close()
    again = Store(tmp_path / "state.db")  # and survive a reopen, span included
    replayed = again.replay("", 0, None, 10**6)
    assert [item for _, item in replayed] == [item for _, _, item in written]
    assert all(seq_of(item) == s and topic_of(item) == topic.encode() for (s, topic, item) in written)
    assert again.max_span > 0


def test_old_per_event_table_is_migrated(tmp_path):
    path = tmp_path / "state.db"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE events (seq INTEGER PRIMARY KEY, stream TEXT NOT NULL, stream_seq INTEGER NOT NULL, topic TEXT NOT NULL, item BLOB NOT NULL)")
    items = [(s, "job.1" if s % 2 else "job.2", (s + 1) // 2, ("job.1" if s % 2 else "job.2") + ".log") for s in range(1, 11)]
    for seq, stream, sseq, topic in items:
        db.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?)", (seq, stream, sseq, topic, _item(topic, seq, sseq)))
    db.commit()
    db.close()
    store = Store(path)
    assert [s for s, _ in store.replay("", 0, None, 100)] == list(range(1, 11))
    assert [s for s, _ in store.replay("job.2.", 0, None, 100)] == [2, 4, 6, 8, 10]
    assert store.last_stream_seq("job.1") == 5
    assert store.db.execute("SELECT name FROM sqlite_master WHERE name='events'").fetchone() is None
