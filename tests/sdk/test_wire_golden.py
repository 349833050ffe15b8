"""The wire format, pinned byte for byte: a change to any of these bytes is a protocol change
(bump PROTOCOL_VERSION deliberately, and update these with it)."""

from __future__ import annotations

import msgpack
import pytest

from llmos.protocol import (
    PROTOCOL_VERSION,
    JobLog,
    StatusRequest,
    SubmitRequest,
    decode_control,
    encode_control,
    event_from_item,
    pack_array,
    pack_item,
    packb,
    stamp,
    wire,
)


def _fixed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire.time, "time", lambda: 1700000000.5)


def test_version() -> None:
    assert PROTOCOL_VERSION == 1


def test_control_frames(monkeypatch: pytest.MonkeyPatch) -> None:
    _fixed(monkeypatch)
    frames = encode_control(StatusRequest(), "client-1", msg_id="00112233aabbccdd")
    assert frames[0].hex() == (
        "86a17601a474797065b56b65726e656c2e7374617475735f72657175657374a26964b0303031313232333361616262636364"
        "64a27473cb41d954fc40200000a673656e646572a8636c69656e742d31a9706172656e745f6964c0"
    )
    assert frames[1] == b"\x80"
    header, msg = decode_control(frames)
    assert header["id"] == "00112233aabbccdd" and isinstance(msg, StatusRequest)


def test_a_request_body_and_a_reply_header(monkeypatch: pytest.MonkeyPatch) -> None:
    _fixed(monkeypatch)
    body = encode_control(SubmitRequest(kind="diag.echo", params={"x": 1}), "c", msg_id="ab")[1]
    assert body.hex() == (
        "89a46b696e64a9646961672e6563686fa6706172616d7381a17801a97265736f757263657380a87072696f7269747900ab6d61785f"
        "7265747269657300a774696d656f7574c0a6636f65726365c2ab707265656d707469626c65c0a3637764c0"
    )
    assert msgpack.unpackb(body) == {
        "kind": "diag.echo", "params": {"x": 1}, "resources": {}, "priority": 0, "max_retries": 0, "timeout": None,
        "coerce": False, "preemptible": None, "cwd": None,
    }
    assert body == packb(msgpack.unpackb(body))  # keys in field order, as packed
    reply = encode_control(StatusRequest(), "kernel", parent_id="ab", msg_id="cd")[0]
    assert msgpack.unpackb(reply)["parent_id"] == "ab"


def test_event_items_and_their_stamp() -> None:
    header = {"v": 1, "type": "job.log", "id": "01", "ts": 1.5, "sender": "w1", "parent_id": None}
    item = pack_item("job.7.log", header, {"level": "info", "event": "hi"})
    assert item.hex() == (
        "93a96a6f622e372e6c6f6786a17601a474797065a76a6f622e6c6f67a26964a23031a27473cb3ff8000000000000"
        "a673656e646572a27731a9706172656e745f6964c082a56c6576656ca4696e666fa56576656e74a26869"
    )
    stamped = stamp(item, 41, 3)
    assert stamped[:1] == b"\x95" and stamped[1:-18] == item[1:]
    assert stamped[-18:].hex() == "cf0000000000000029cf0000000000000003"  # seq and stream_seq as uint64
    event = event_from_item(msgpack.unpackb(stamped))
    assert (event.seq, event.stream_seq, event.topic, event.type, event.body["event"]) == (41, 3, "job.7.log", "job.log", "hi")
    assert isinstance(event.message(), JobLog)


def test_arrays_of_packed_items() -> None:
    items = [packb(1), packb("a")]
    assert pack_array(items, 2) == b"\x92\x01\xa1a"
    assert pack_array([packb(0)] * 16, 16)[:3] == b"\xdc\x00\x10"  # array16 past 15


def test_the_kernels_replay_reply_is_what_encode_control_would_send(monkeypatch: pytest.MonkeyPatch) -> None:
    from llmos.protocol import ReplayReply, replay_reply_frames

    _fixed(monkeypatch)
    monkeypatch.setattr(wire, "new_id", lambda: "0123")
    header = {"v": 1, "type": "job.log", "id": "01", "ts": 1.5, "sender": "w1", "parent_id": None}
    items = [stamp(pack_item("job.7.log", header, {"level": "info", "event": str(i)}), i + 1, i + 1) for i in range(3)]
    built = replay_reply_frames("p1", 9, True, items)
    expected = encode_control(ReplayReply(last_seq=9, more=True, events=[msgpack.unpackb(i) for i in items]), "kernel", parent_id="p1")
    assert msgpack.unpackb(built[0]) == msgpack.unpackb(expected[0]) and msgpack.unpackb(built[1]) == msgpack.unpackb(expected[1])
