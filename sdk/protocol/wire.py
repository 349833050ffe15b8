"""The wire format: msgpack framing, headers, control frames, ingest items, journal stamps and
replay replies. The kernel, the worker and the SDK all go through these functions; nobody else
packs protocol bytes by hand.

Every message body is a frozen dataclass registered under a type name with :func:`message`.
Decoding checks the header, looks the type up, and validates each field's name and type; every
failure is a :class:`~llmos.errors.ProtocolError` subclass, so a receiver answers an error and
keeps serving.

Frames (all msgpack; Python object serialization is never used, on the wire or on disk):

* **control** (DEALER -> kernel ROUTER and back): ``[header, body]``, two maps.
* **ingest** (worker PUSH -> kernel PULL): one frame holding an array of items, each item a
  msgpack ``bin`` that holds one packed ``[topic, header, body]``. A worker coalesces the events
  of its stream into one frame (one-frame messages are about twice as fast as multipart ones),
  and the kernel journals each item's bytes as they came, without packing them again.
* **events** (kernel PUB -> SUB): ``[stream + ".", payload]`` where ``payload`` is an array of
  journaled items of that stream, in order. A SUB subscribes to whole streams (``"job.7."``),
  a family of them (``"job."``) or everything (``""``) and filters finer topics itself.

The header carries ``v`` (protocol version), ``type``, ``id``, ``ts``, ``sender`` and
``parent_id``. A journaled item is ``[topic, header, body, seq, stream_seq]``: the kernel stamps
the global ``seq`` and the per-stream ``stream_seq`` by appending them to the worker's bytes
(:func:`stamp`), which costs a few hundred nanoseconds instead of an unpack and a repack.
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgpack

from llmos.errors import MessageTooLarge, ProtocolError
from llmos.protocol.registry import decode_body, encode_body, type_name_of
from llmos.protocol.topics import stream_of

PROTOCOL_VERSION = 1
#: Largest frame a kernel or client accepts (bytes); bigger ones are answered with MessageTooLarge.
MAX_FRAME_BYTES = 16 * 1024 * 1024


# ---------------------------------------------------------------------------------------------
# msgpack helpers


def packb(obj: Any) -> bytes:
    """Pack ``obj`` with msgpack (bytes stay bytes, tuples become arrays)."""
    return msgpack.packb(obj, use_bin_type=True)


def unpackb(data: bytes) -> Any:
    """Unpack one msgpack value with the bus's size limits; errors become ProtocolError."""
    if len(data) > MAX_FRAME_BYTES:
        raise MessageTooLarge(f"frame of {len(data)} bytes is larger than the limit of {MAX_FRAME_BYTES}")
    try:
        # msgpack bounds every string, array and map by the frame's own length; ext types are refused.
        return msgpack.unpackb(data, raw=False, strict_map_key=True, max_ext_len=0)
    except msgpack.ExtraData as exc:
        raise ProtocolError("frame holds trailing bytes after one msgpack value") from exc
    except (ValueError, msgpack.UnpackException) as exc:
        raise ProtocolError(f"frame is not valid msgpack: {exc}") from exc
    except Exception as exc:  # msgpack raises a few odd types on hostile input
        raise ProtocolError(f"frame is not valid msgpack: {type(exc).__name__}: {exc}") from exc


def pack_array(packed_items: Iterable[bytes], count: int) -> bytes:
    """Wrap already-packed msgpack values into one array without unpacking them again."""
    if count < 16:
        head = bytes([0x90 | count])
    elif count < 0x10000:
        head = b"\xdc" + count.to_bytes(2, "big")
    else:
        head = b"\xdd" + count.to_bytes(4, "big")
    return head + b"".join(packed_items)

def storable_problem(value: Any) -> str | None:
    """None if ``value`` can be stored (JSON) and sent (msgpack), else what is wrong with it."""
    try:
        json.dumps(value, allow_nan=False)
        packb(value)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc} (values must be JSON-like: maps, lists, strings, numbers within 64 bits)"
    return None


# ---------------------------------------------------------------------------------------------
# headers and frames


def new_id() -> str:
    """A fresh message id (16 hex digits)."""
    return os.urandom(8).hex()


def make_header(type_name: str, sender: str, *, parent_id: str | None = None, msg_id: str | None = None) -> dict[str, Any]:
    """A message header for ``type_name`` sent by ``sender``."""
    return {
        "v": PROTOCOL_VERSION,
        "type": type_name,
        "id": msg_id or new_id(),
        "ts": time.time(),
        "sender": sender,
        "parent_id": parent_id,
    }


def check_header(header: Any) -> dict[str, Any]:
    """Validate a decoded header map."""
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a map, got {type(header).__name__}")
    if header.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {header.get('v')!r} is not supported; expected {PROTOCOL_VERSION}")
    if type(header.get("type")) is not str:
        raise ProtocolError("header.type must be a string naming a registered message type")
    msg_id = header.get("id")
    if msg_id is not None and type(msg_id) is not str:
        raise ProtocolError("header.id must be a string")
    return header


def encode_control(msg: object, sender: str, *, parent_id: str | None = None, msg_id: str | None = None) -> list[bytes]:
    """The two frames ``[header, body]`` of a control message."""
    header = make_header(type_name_of(msg), sender, parent_id=parent_id, msg_id=msg_id)
    return [packb(header), packb(encode_body(msg))]


def decode_control(frames: list[bytes]) -> tuple[dict[str, Any], Any]:
    """Decode ``[header, body]`` frames into the header map and a validated message object."""
    if len(frames) != 2:
        raise ProtocolError(f"a control message has 2 frames (header, body), got {len(frames)}")
    header = check_header(unpackb(frames[0]))
    body = unpackb(frames[1])
    return header, decode_body(header["type"], body)


# ---------------------------------------------------------------------------------------------
# events as the SDK hands them out


@dataclass(slots=True)
class Event:
    """One journaled event: where it sits in the journal, what it is, and its body."""

    seq: int
    stream_seq: int
    topic: str
    type: str
    ts: float
    sender: str
    body: dict[str, Any]

    @property
    def stream(self) -> str:
        """The stream this event belongs to (``job.<id>``, ``kernel``, ...)."""
        return stream_of(self.topic)

    def message(self) -> Any:
        """The body as its registered message object."""
        return decode_body(self.type, self.body)

    def to_dict(self) -> dict[str, Any]:
        """A plain map, as ``--json`` prints it."""
        return {
            "seq": self.seq,
            "stream_seq": self.stream_seq,
            "topic": self.topic,
            "type": self.type,
            "ts": self.ts,
            "sender": self.sender,
            "body": self.body,
        }


def event_from_item(item: Any) -> Event:
    """Build an :class:`Event` from a journaled ``[topic, header, body, seq, stream_seq]`` item."""
    try:
        topic_name, header, body, seq, stream_seq = item
    except (TypeError, ValueError):
        raise ProtocolError("a journaled event is [topic, header, body, seq, stream_seq]") from None
    if type(topic_name) is not str or type(header) is not dict or type(body) is not dict or type(seq) is not int or type(stream_seq) is not int:
        raise ProtocolError("a journaled event is [topic: str, header: map, body: map, seq: int, stream_seq: int]")
    return Event(seq, stream_seq, topic_name, str(header.get("type")), float(header.get("ts") or 0.0), str(header.get("sender")), body)


_EVENT_HEADER_KEYS = frozenset({"v", "type", "id", "ts", "sender", "parent_id"})


def check_event_header(header: Any) -> dict[str, Any]:
    """Validate the header of an event a worker sent: exactly the known keys, of the right types
    (the kernel journals the bytes as they came, so nothing unchecked may ride along)."""
    if (
        type(header) is dict
        and header.keys() <= _EVENT_HEADER_KEYS
        and header.get("v") == PROTOCOL_VERSION
        and type(header.get("type")) is str
        and type(header.get("id")) is str
        and type(header.get("ts")) in (float, int)
        and type(header.get("sender")) is str
        and type(header.get("parent_id", None)) in (str, type(None))
    ):
        return header
    check_header(header)
    raise ProtocolError(
        "an event header has exactly v, type, id (str), ts (number), sender (str) and parent_id (str or nil)"
    )


def pack_item(topic_name: str, header: dict[str, Any], body: dict[str, Any]) -> bytes:
    """One event as a packed ``[topic, header, body]`` (what a worker sends)."""
    return _PACKER.pack([topic_name, header, body])


_PACKER = msgpack.Packer(use_bin_type=True, autoreset=True)


def stamp(item: bytes, seq: int, stream_seq: int) -> bytes:
    """Turn a packed ``[topic, header, body]`` into ``[topic, header, body, seq, stream_seq]``
    by editing the array header and appending two uint64s."""
    if item[0] != 0x93:
        raise ProtocolError("an event item must be a packed 3-element array")
    return b"\x95" + item[1:] + _STAMP.pack(0xCF, seq, 0xCF, stream_seq)


_STAMP = struct.Struct(">BQBQ")
_STAMP_PACK = _STAMP.pack


def stamp_tail(seq: int, stream_seq: int) -> bytes:
    """The 18 bytes :func:`stamp` appends (seq and stream_seq as msgpack uint64s): the kernel's
    ingest path builds ``STAMPED_HEAD + item[1:] + stamp_tail(...)`` itself, one call per event."""
    return _STAMP_PACK(0xCF, seq, 0xCF, stream_seq)


#: The first byte of a packed ``[topic, header, body]`` item, and of a stamped five-element one.
ITEM_HEAD = b"\x93"
STAMPED_HEAD = b"\x95"


def event_header(type_name: str, msg_id: str, ts: float, sender: str) -> dict[str, Any]:
    """The header of an event a worker sends (no parent)."""
    return {"v": PROTOCOL_VERSION, "type": type_name, "id": msg_id, "ts": ts, "sender": sender, "parent_id": None}


def item_head(topic_name: str, type_name: str, sender: str) -> bytes:
    """The packed start of ``[topic, {v, type, sender, parent_id, id: ..., ts: ...}, body]`` up to the
    id's value: the same bytes as :func:`pack_item` of that header, keys in another order. A
    worker caches it per topic and appends ``packb(id) + ITEM_TS_KEY + packb(ts) + packb(body)``."""
    p = _PACKER.pack
    return ITEM_HEAD + p(topic_name) + b"\x86" + p("v") + p(PROTOCOL_VERSION) + p("type") + p(type_name) + p("sender") + p(sender) + p("parent_id") + p(None) + p("id")


ITEM_TS_KEY = _PACKER.pack("ts")


def replay_reply_frames(parent_id: str | None, last_seq: int, more: bool, items: list[bytes]) -> list[bytes]:
    """The frames of a ``kernel.replay_reply`` built around journaled, already packed items (no
    unpack, no repack): it decodes to what ``encode_control(ReplayReply(...))`` sends (keys in another order)."""
    body = (
        b"\x84"
        + packb("status") + packb("ok")
        + packb("last_seq") + packb(last_seq)
        + packb("more") + packb(more)
        + packb("events") + pack_array(items, len(items))
    )
    return [packb(make_header("kernel.replay_reply", "kernel", parent_id=parent_id)), body]
