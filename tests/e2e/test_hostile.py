"""Thousands of hostile frames at both kernel sockets: every answerable one gets a typed error,
the kernel keeps serving, and no job or event is lost or changed."""

from __future__ import annotations

import random

import msgpack
import pytest
import zmq

from llmos.protocol import MAX_FRAME_BYTES, PROTOCOL_VERSION, make_header, pack_item, packb
from tests.conftest import KernelHandle


def _header(type_name: str, **extra: object) -> bytes:
    h = make_header(type_name, "hostile")
    h.update(extra)
    return packb(h)


def _control_frames(rng: random.Random, i: int) -> list[bytes]:
    choice = i % 16
    if choice == 0:
        return [rng.randbytes(rng.randint(0, 64))]
    if choice == 1:
        return [rng.randbytes(rng.randint(1, 32)) for _ in range(rng.randint(2, 5))]
    if choice == 2:  # truncated msgpack
        good = _header("kernel.status_request")
        return [good[: rng.randint(1, len(good) - 1)], packb({})]
    if choice == 3:
        return [_header("no.such.type"), packb({})]
    if choice == 4:  # wrong field types
        return [_header("kernel.submit_request"), packb({"kind": rng.randint(0, 9), "params": "x"})]
    if choice == 5:  # unknown field
        return [_header("kernel.job_request"), packb({"id": 1, "evil": True})]
    if choice == 6:  # missing field
        return [_header("kernel.job_request"), packb({})]
    if choice == 7:
        return [_header("kernel.status_request", v=PROTOCOL_VERSION + 98), packb({})]
    if choice == 8:  # header of the wrong shape
        return [packb([1, 2, 3]), packb({})]
    if choice == 9:  # body not a map
        return [_header("kernel.status_request"), packb([1, 2])]
    if choice == 10:  # a deeply nested value
        return [_header("kernel.submit_request"), b"\x91" * 5000 + b"\xc0"]
    if choice == 11:  # a submit with bad params for a real kind
        return [_header("kernel.submit_request"), packb({"kind": "diag.sleep", "params": {"seconds": "never"}})]
    if choice == 12:  # an impossible id
        return [_header("kernel.job_request"), packb({"id": 2**63 + rng.randint(0, 5)})]
    if choice == 13:  # a stranger pretending to be a worker
        return [_header("worker.heartbeat"), packb({"worker_id": "w-fake"})]
    if choice == 14:  # msgpack ext type
        return [_header("kernel.status_request"), msgpack.packb({"x": msgpack.ExtType(5, b"abc")})]
    return [_header("kernel.replay_request"), packb({"prefix": 7, "since": -5, "limit": "all"})]


def _ingest_frame(rng: random.Random, i: int) -> bytes:
    choice = i % 10
    log_body = {"level": "info", "event": "forged", "fields": {}}
    if choice == 0:
        return rng.randbytes(rng.randint(0, 128))
    if choice == 1:
        return packb({"not": "an array"})
    if choice == 2:  # items that are not bins
        return packb([[1, 2, 3], "x", None])
    if choice == 3:  # an event from nobody
        return packb([pack_item("job.1.log", make_header("job.log", "intruder"), log_body)])
    if choice == 4:  # a header missing its fields
        return packb([packb(["job.1.progress", {"v": 1}, {}])])
    if choice == 5:  # a stranger claims to end job 1
        return packb([pack_item("job.1.done", make_header("worker.job_done", "w1-1"), {"job_id": 1, "attempt": 1, "outcome": "failed"})])
    if choice == 6:  # a truncated item
        good = pack_item("job.1.log", make_header("job.log", "w1-1"), log_body)
        return packb([good[: rng.randint(1, len(good) - 1)]])
    if choice == 7:  # a header with extra keys riding along
        header = make_header("job.log", "w1-1")
        header["seq"] = 1
        return packb([pack_item("job.1.log", header, log_body)])
    if choice == 8:  # 4- and 2-element items
        return packb([packb(["job.1.log", make_header("job.log", "x"), log_body, 1]), packb(["job.1.log", {}])])
    return b"\x91" * 3000 + b"\xc0"


@pytest.mark.slow
def test_hostile_frames_change_nothing(fresh_kernel: KernelHandle) -> None:
    rng = random.Random(1234)
    with fresh_kernel.client() as c:
        jobs = [c.submit("diag.emit", params={"count": 5}), c.submit("diag.fail"), c.submit("diag.echo", params={"data": [1, "two"]})]
        for job in jobs:
            job.wait(timeout=30)
        before_jobs = [j.to_dict() for j in c.jobs()]
        before_events = [e.to_dict() for e in c.events("", follow=False)]
        endpoints = c.kernel

    ctx = zmq.Context()
    try:
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.connect(endpoints["control"])
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 2000)
        push.connect(endpoints["ingest"])
        sent_control = 0
        replies: list[list[bytes]] = []
        for i in range(6000):
            dealer.send_multipart(_control_frames(rng, i))
            sent_control += 1
            push.send(_ingest_frame(rng, i))
            while dealer.poll(0):
                replies.append(dealer.recv_multipart())
        # A frame over the bus limit gets a typed "too large" answer too.
        dealer.send_multipart([_header("kernel.status_request"), b"\xc4" + b"\x00" * (MAX_FRAME_BYTES + 10)])
        sent_control += 1
        while len(replies) < sent_control and dealer.poll(10_000):
            replies.append(dealer.recv_multipart())
        assert len(replies) == sent_control, "every control frame is answered"
        codes = []
        for frames in replies:
            header = msgpack.unpackb(frames[0])
            body = msgpack.unpackb(frames[1])
            assert header["type"] == "kernel.error_reply", body
            assert body["status"] == "error" and body["ename"] and body["evalue"]
            codes.append(body["code"])
        assert 103 in codes  # MessageTooLarge
        assert {100, 101, 102} <= set(codes)  # ProtocolError, UnknownMessageType, ValidationError
        assert 502 in codes  # JobRejected for the bad parameters
    finally:
        ctx.destroy(linger=0)

    with fresh_kernel.client() as c:
        status = c.status()
        assert status["stats"]["bad_frames"] >= 6000
        assert [j.to_dict() for j in c.jobs()] == before_jobs
        assert [e.to_dict() for e in c.events("", follow=False)] == before_events
        assert c.submit("diag.echo", params={"message": "still here"}).result(timeout=30)["message"] == "still here"
