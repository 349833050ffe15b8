"""Typed messages: registry, validation, frames."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from llmos import protocol
from llmos.errors import (
    JobFailed,
    MessageTooLarge,
    ProtocolError,
    UnknownMessageType,
    ValidationError,
    error_from_reply,
)
from llmos.protocol import SubmitRequest, decode_control, encode_control, message, stream_of, topic


def test_round_trip_control_message() -> None:
    msg = SubmitRequest(kind="diag.echo", params={"a": [1, 2]}, priority=3)
    header, decoded = decode_control(encode_control(msg, "me"))
    assert decoded == msg
    assert header["type"] == "kernel.submit_request" and header["sender"] == "me" and header["v"] == 1


def test_validation_names_type_field_and_expectation() -> None:
    with pytest.raises(ValidationError) as err:
        protocol.decode_body("kernel.submit_request", {"kind": 5})
    assert str(err.value) == "kernel.submit_request.kind: expected str, got int 5"
    with pytest.raises(ValidationError, match="unknown field 'nope'"):
        protocol.decode_body("kernel.job_request", {"id": 1, "nope": 2})
    with pytest.raises(ValidationError, match="missing field 'id'"):
        protocol.decode_body("kernel.job_request", {})
    with pytest.raises(ValidationError, match="expected int"):
        protocol.decode_body("kernel.job_request", {"id": True})


def test_unknown_type_and_bad_frames() -> None:
    with pytest.raises(UnknownMessageType):
        protocol.decode_body("nobody.registered", {})
    with pytest.raises(ProtocolError):
        decode_control([b"\x81"])
    with pytest.raises(ProtocolError, match="not valid msgpack"):
        decode_control([b"\xde\xad", b"\x80"])
    with pytest.raises(ProtocolError, match="protocol version"):
        decode_control([protocol.packb({"v": 9, "type": "kernel.status_request"}), protocol.packb({})])
    with pytest.raises(MessageTooLarge):
        protocol.unpackb(b"\x00" * (protocol.MAX_FRAME_BYTES + 1))


def test_duplicate_message_name_raises() -> None:
    with pytest.raises(ValueError, match="already registered"):

        @message("job.log")
        @dataclass(frozen=True, slots=True, kw_only=True)
        class Other:
            x: int


def test_custom_message_type_validates() -> None:
    @message("test.custom_thing")
    @dataclass(frozen=True, slots=True, kw_only=True)
    class Custom:
        name: str
        sizes: list[int] = field(default_factory=list)
        extra: dict[str, Any] | None = None

    assert protocol.decode_body("test.custom_thing", {"name": "x", "sizes": [1, 2]}) == Custom(name="x", sizes=[1, 2])
    with pytest.raises(ValidationError, match="sizes"):
        protocol.decode_body("test.custom_thing", {"name": "x", "sizes": [1, "2"]})
    assert "test.custom_thing" in protocol.message_types()


def test_topics_and_streams() -> None:
    assert topic("job", 7, "log") == "job.7.log"
    with pytest.raises(ValueError):
        topic("job", "a.b")
    assert stream_of("job.7.log") == "job.7"
    assert stream_of("device.gpu0.metrics") == "device.gpu0"
    assert stream_of("kernel.started") == "kernel"


def test_pack_array_matches_msgpack() -> None:
    for n in (0, 3, 15, 16, 300, 70000):
        items = [protocol.packb(i) for i in range(n)]
        assert protocol.unpackb(protocol.pack_array(items, n)) == list(range(n))


def test_errors_keep_their_class_across_the_wire() -> None:
    err = error_from_reply("JobFailed", "job 3 failed", JobFailed.code, {"job_id": 3})
    assert isinstance(err, JobFailed) and err.job_id == 3 and str(err) == "job 3 failed"


def test_generated_fast_checks_agree_with_the_field_checkers():
    """The kernel's per-event check is generated source; it must say exactly what the checkers say."""
    import random

    from llmos.protocol import message_types, spec_for
    from llmos.protocol.registry import _MISSING, _fast_check

    samples = [None, True, False, 0, -3, 2**70, 1.5, "", "s", b"b", [], [1, "a"], (), {}, {"a": 1}, {"a": "b"}, {1: 2}, {b"k": 1}]
    rng = random.Random(7)  # fixed seed; the loop below draws every sample for every field many times
    for name in message_types():
        spec = spec_for(name)
        fast = _fast_check(spec)

        def reference(b, spec=spec):
            if type(b) is not dict or not (b.keys() <= spec.names):
                return False
            for f in spec.fields:
                v = b.get(f.name, _MISSING)
                if v is _MISSING:
                    if f.required:
                        return False
                elif not f.check(v):
                    return False
            return True

        for _ in range(400):
            body = {f.name: rng.choice(samples) for f in spec.fields if rng.random() < 0.8}
            if rng.random() < 0.05:
                body["unknown_field"] = 1
            assert fast(body) == reference(body), (name, body)
        assert fast([]) is False and fast(None) is False


def test_worker_hand_packed_items_decode_like_pack_item():
    """The worker packs [topic, header, body] around cached header bytes; it must decode the same."""
    from llmos.protocol import (
        ITEM_TS_KEY,
        PROTOCOL_VERSION,
        check_event_header,
        item_head,
        pack_item,
        packb,
        unpackb,
    )

    body = {"level": "info", "event": "e", "logger": None, "fields": {"i": 3, "s": "x" * 40}}
    head = item_head("job.17.log", "job.log", "w-17-2")
    packed = head + packb("w-17-2-9") + ITEM_TS_KEY + packb(1.25) + packb(body)
    header = {"v": PROTOCOL_VERSION, "type": "job.log", "id": "w-17-2-9", "ts": 1.25, "sender": "w-17-2", "parent_id": None}
    assert unpackb(packed) == unpackb(pack_item("job.17.log", header, body))
    check_event_header(unpackb(packed)[1])
