"""The kernel's components on their own, with no kernel process: the journal's numbering, the
control dispatcher, the job table, the service restart policy and the stop stages. (Real SQLite,
real ZeroMQ sockets on ipc endpoints in the test's directory.)"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
import zmq

from llmos.errors import ServiceUnavailable
from llmos.kernel.bus import Bus
from llmos.kernel.control import Control, Request
from llmos.kernel.jobs import IllegalTransition, JobTable
from llmos.kernel.journal import Journal
from llmos.kernel.services import RestartPolicy
from llmos.kernel.store import Store, seq_of, stream_seq_of
from llmos.kernel.supervisor import STAGE_SIGNAL, StopStage
from llmos.protocol import (
    JobLog,
    OkReply,
    StatusRequest,
    decode_control,
    encode_body,
    encode_control,
    event_from_item,
    make_header,
    pack_item,
)


def _worker_item(topic: str, n: int) -> bytes:
    """A packed [topic, header, body] as a worker sends it."""
    return pack_item(topic, make_header("job.log", "w1"), encode_body(JobLog(level="info", event=f"e{n}", logger="t", fields={})))


def test_the_journal_numbers_kernel_and_worker_events_in_one_sequence(tmp_path) -> None:
    store = Store(tmp_path / "llmos.db")
    journal = Journal(store)
    journal.emit("job.1.log", JobLog(level="info", event="first", logger="k", fields={}))
    journal.extend("job.1", [_worker_item("job.1.log", i) for i in range(3)])
    journal.emit("job.2.log", JobLog(level="info", event="other", logger="k", fields={}))
    journal.extend("job.1", [_worker_item("job.1.log", 3)])
    streams = journal.end_turn()
    store.commit()
    assert list(streams) == ["job.1", "job.2"]
    assert [seq_of(i) for i in streams["job.1"]] == [1, 2, 3, 4, 6]
    assert [stream_seq_of(i) for i in streams["job.1"]] == [1, 2, 3, 4, 5]
    assert [stream_seq_of(i) for i in streams["job.2"]] == [1]
    events = [event_from_item(msgpack.unpackb(i, raw=False)) for i in streams["job.1"]]
    assert [e.body["event"] for e in events] == ["first", "e0", "e1", "e2", "e3"]
    assert journal.seq == 6 and journal.journaled == 6
    # A new journal (a restarted kernel) goes on from the store's counters.
    again = Journal(store)
    again.emit("job.1.log", JobLog(level="info", event="after", logger="k", fields={}))
    item = again.end_turn()["job.1"][0]
    assert (seq_of(item), stream_seq_of(item)) == (7, 6)


def test_a_replay_in_mid_turn_sees_the_turns_events(tmp_path) -> None:
    store = Store(tmp_path / "llmos.db")
    journal = Journal(store)
    journal.extend("job.5", [_worker_item("job.5.log", i) for i in range(4)])
    items, more = journal.replay("job.5.", 0, None, 3)
    assert [seq_of(i) for i in items] == [1, 2, 3] and more
    assert journal.stream_heads("job.", 0) == {"job.5": [4, 4]}
    journal.extend("job.5", [_worker_item("job.5.log", 9)])
    streams = journal.end_turn()  # the rest is written, nothing twice
    store.commit()
    assert len(streams["job.5"]) == 5
    items, more = journal.replay("", 0, None, 100)
    assert [seq_of(i) for i in items] == [1, 2, 3, 4, 5] and not more


@pytest.fixture
def bus(tmp_path):
    endpoints = {name: f"ipc://{tmp_path}/{name}" for name in ("control", "events", "ingest")}
    bus = Bus(endpoints, pub_hwm=1000)
    yield bus
    bus.close()


def _ask(bus: Bus, control: Control, dealer: zmq.Socket[bytes], frames: list[bytes]) -> tuple[dict[str, Any], Any]:
    dealer.send_multipart(frames)
    assert bus.control.poll(5000)
    control.drain()
    assert bus.send_replies() == []
    assert dealer.poll(5000)
    return decode_control(dealer.recv_multipart())


def test_control_routes_by_type_and_answers_errors(bus) -> None:
    stats = {"requests": 0, "bad_requests": 0, "bad_frames": 0}
    control = Control(bus, stats)
    dealer = bus.zctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.IDENTITY, b"client-1")
    dealer.connect(bus.endpoints["control"])
    seen: list[Request] = []

    def status(req: Request) -> OkReply:
        seen.append(req)
        return OkReply()

    control.route({StatusRequest: status})
    with pytest.raises(ValueError, match="two handlers"):
        control.route({StatusRequest: status})
    frames = encode_control(StatusRequest(), "client", msg_id="abc")
    header, reply = _ask(bus, control, dealer, frames)
    assert isinstance(reply, OkReply) and header["parent_id"] == "abc"
    assert seen[0].identity == b"client-1" and seen[0].parent_id == "abc" and seen[0].sender == "client-1"

    def boom(req: Request) -> None:
        raise ServiceUnavailable("no service named 'x' is running", service="x")

    control.handlers[StatusRequest] = boom
    header, reply = _ask(bus, control, dealer, encode_control(StatusRequest(), "client", msg_id="def"))
    assert reply.ename == "ServiceUnavailable" and "no service named 'x'" in reply.evalue and header["parent_id"] == "def"
    # Not a request the kernel answers; then garbage: each gets an error, neither a crash.
    header, reply = _ask(bus, control, dealer, encode_control(JobLog(level="info", event="x", logger="t"), "client"))
    assert reply.ename == "ProtocolError" and "not a request the kernel answers" in reply.evalue
    header, reply = _ask(bus, control, dealer, [b"\xc1", b"\x80"])
    assert reply.ename in ("ProtocolError", "KernelError")
    assert stats["requests"] == 4 and stats["bad_requests"] >= 1
    dealer.close(0)


def test_the_job_table_stores_and_emits_every_change(tmp_path) -> None:
    store = Store(tmp_path / "llmos.db")
    emitted: list[tuple[str, Any]] = []
    table = JobTable(store, lambda topic, msg: emitted.append((topic, msg)))
    job = table.create("diag.echo", {"message": "hi"}, {"cpus": 1.0}, max_retries=1)
    assert table[job.id] is job and emitted[-1][0] == f"job.{job.id}.state" and emitted[-1][1].state == "pending"
    table.transition(job, "running", None, attempts=1)
    assert not table.settle(job, "failed", "boom", 1)  # a retry left: queued again
    assert job.state == "pending" and job.reason == "retrying after: boom"
    table.transition(job, "running", None, attempts=2)
    assert table.settle(job, "failed", "boom again", 1)  # no retries left: ended
    assert job.id not in table and table.counts()["failed"] == 1
    stored = store.get_job(job.id)
    assert stored is not None and stored.state == "failed" and stored.reason == "boom again"
    assert [m.state for _, m in emitted] == ["pending", "running", "pending", "running", "failed"]
    with pytest.raises(IllegalTransition):
        table.transition(job, "running", None)


def test_recovery_requeues_running_jobs_with_retries_and_fails_the_rest(tmp_path) -> None:
    store = Store(tmp_path / "llmos.db")
    table = JobTable(store, lambda topic, msg: None)
    keep = table.create("diag.echo", {}, {}, max_retries=1)
    lose = table.create("diag.echo", {}, {})
    waiting = table.create("diag.echo", {}, {})
    for job in (keep, lose):
        table.transition(job, "running", None, attempts=1)
    store.commit()
    after = JobTable(store, lambda topic, msg: None)  # the next kernel
    orphans = after.recover()
    assert sorted(j.id for j in orphans) == [keep.id, lose.id]
    assert after[keep.id].state == "pending" and after[waiting.id].state == "pending"
    assert lose.id not in after and store.get_job(lose.id).reason == "kernel restarted"


def test_the_restart_policy_backs_off_then_quarantines(tmp_path) -> None:
    store = Store(tmp_path / "llmos.db")
    table = JobTable(store, lambda topic, msg: None)
    emitted: list[Any] = []
    policy = RestartPolicy({"max_restarts": 2, "restart_window": 60, "restart_backoff_max": 30}, lambda topic, msg: emitted.append(msg))
    svc = table.create("monitor", {}, {})
    svc.reason = "crashed"
    assert not policy.failed(svc, "monitor", autostart=True)
    assert not policy.failed(svc, "monitor", autostart=True)
    delays = [r.due for r in policy.restarts]
    assert delays[1] - delays[0] == pytest.approx(1.0, abs=0.1)  # 1 s, then 2 s
    assert policy.kinds_restarting() == {"monitor"}
    assert policy.failed(svc, "monitor", autostart=True)  # the third crash in the window
    assert "monitor" in policy.quarantined and emitted[-1].job_id is None
    assert policy.due(float("inf")) == []  # a quarantined kind is not restarted
    # An instance (serve MODEL) is given up on alone; the kind stays available.
    inst = table.create("serve", {"model": "/m"}, {})
    for _ in range(3):
        policy.failed(inst, "lm", autostart=False)
    assert "serve" not in policy.quarantined and emitted[-1].job_id == inst.id
    policy.reset()
    assert policy.quarantined == {}


def test_the_stop_stages_go_ask_term_kill() -> None:
    assert [int(s) for s in StopStage] == [0, 1, 2, 3]
    assert StopStage.ASKED.next() is StopStage.TERMINATED and StopStage.TERMINATED.next() is StopStage.KILLED
    assert StopStage.KILLED.next() is StopStage.KILLED
    assert STAGE_SIGNAL[StopStage.TERMINATED].name == "SIGTERM" and STAGE_SIGNAL[StopStage.KILLED].name == "SIGKILL"
