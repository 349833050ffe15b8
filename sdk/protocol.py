"""The llmos wire protocol: typed messages, their registry, and the frames that carry them.

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

import dataclasses
import json
import os
import struct
import time
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import msgpack

from llmos.errors import MessageTooLarge, ProtocolError, UnknownMessageType, ValidationError

PROTOCOL_VERSION = 1
#: Largest frame a kernel or client accepts (bytes); bigger ones are answered with MessageTooLarge.
MAX_FRAME_BYTES = 16 * 1024 * 1024
T = TypeVar("T")
Checker = Callable[[Any], bool]


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


# ---------------------------------------------------------------------------------------------
# topics


def storable_problem(value: Any) -> str | None:
    """None if ``value`` can be stored (JSON) and sent (msgpack), else what is wrong with it."""
    try:
        json.dumps(value, allow_nan=False)
        packb(value)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc} (values must be JSON-like: maps, lists, strings, numbers within 64 bits)"
    return None


#: Topics whose second part names one stream (``job.7.log`` is on the stream ``job.7``).
STREAM_KINDS = ("job", "device", "service", "worker")


def topic(*parts: object) -> str:
    """Build a dot-separated topic, most general part first: ``topic("job", 7, "log")``."""
    out = []
    for part in parts:
        text = str(part)
        if not text or "." in text:
            raise ValueError(f"topic part {text!r} must be non-empty and hold no '.'")
        out.append(text)
    return ".".join(out)


def stream_of(topic_name: str) -> str:
    """The stream a topic belongs to: ``job.<id>``, ``device.<id>``, ``service.<name>`` or the first part."""
    head, _, rest = topic_name.partition(".")
    if head in STREAM_KINDS and rest:
        return head + "." + rest.partition(".")[0]
    return head


# ---------------------------------------------------------------------------------------------
# the registry


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """How one field of a message is checked."""

    name: str
    check: Checker
    expected: str
    required: bool


@dataclass(frozen=True, slots=True)
class MessageSpec:
    """A registered message type: its name, class and field checks."""

    name: str
    cls: type
    fields: tuple[FieldSpec, ...]
    names: frozenset[str]


_REGISTRY: dict[str, MessageSpec] = {}
_BY_CLASS: dict[type, str] = {}


def _describe(tp: Any) -> str:
    if tp is Any:
        return "any value"
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def make_checker(tp: Any) -> Checker:
    """A function that says whether a decoded msgpack value fits the annotation ``tp``."""
    if tp is Any or tp is object:
        return lambda v: True
    if tp is type(None) or tp is None:
        return lambda v: v is None
    if tp is bool:
        return lambda v: v is True or v is False
    if tp is int:
        return lambda v: type(v) is int
    if tp is float:
        return lambda v: type(v) is float or type(v) is int
    if tp is str:
        return lambda v: type(v) is str
    if tp is bytes:
        return lambda v: type(v) is bytes
    origin = get_origin(tp)
    args = get_args(tp)
    if origin in (Union, types.UnionType):
        simple = {bool: bool, int: int, float: float, str: str, bytes: bytes, type(None): type(None)}
        if all(a in simple for a in args) and bool not in args:
            allowed = frozenset(args) | ({int} if float in args else set())
            return lambda v: type(v) in allowed
        checks = [make_checker(a) for a in args]
        return lambda v: any(c(v) for c in checks)
    if origin is Literal:
        allowed = set(args)
        literal_types = frozenset(type(a) for a in args)
        return lambda v: type(v) in literal_types and v in allowed  # type first: a map or list is unhashable
    if tp is list or origin in (list, tuple, typing.Sequence):
        if args and origin is list:
            item = make_checker(args[0])
            return lambda v: isinstance(v, list | tuple) and all(item(x) for x in v)
        return lambda v: isinstance(v, list | tuple)
    if tp is dict or origin is dict:
        if args and args[1] is Any and args[0] is str:
            return lambda v: type(v) is dict and all(type(k) is str for k in v)
        if args and args[0] is str and args[1] in (int, str):
            value_type = args[1]
            return lambda v: type(v) is dict and all(type(k) is str and type(x) is value_type for k, x in v.items())
        if args:
            key, val = make_checker(args[0]), make_checker(args[1])
            return lambda v: isinstance(v, dict) and all(key(k) and val(x) for k, x in v.items())
        return lambda v: isinstance(v, dict)
    raise TypeError(f"message fields cannot have type {tp!r}")


def message(name: str) -> Callable[[type[T]], type[T]]:
    """Register a frozen dataclass as the message type ``name``.

    Field names and annotations become the validation rules. Registering the same name twice
    raises :class:`ValueError`, unless it is the very same class (a module imported twice).
    """

    def decorate(cls: type[T]) -> type[T]:
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"@message({name!r}) needs a dataclass, got {cls!r}")
        register_message_type(cls, name)
        return cls

    return decorate


def register_message_type(cls: type, name: str | None = None) -> MessageSpec:
    """Add ``cls`` to the registry under ``name`` (default: the name it was registered with)."""
    if name is None:
        if cls in _BY_CLASS:
            return _REGISTRY[_BY_CLASS[cls]]
        raise ValueError(f"{cls.__qualname__} has no message name; decorate it with @message(name)")
    old = _REGISTRY.get(name)
    if old is not None:
        if old.cls is cls or (old.cls.__qualname__ == cls.__qualname__ and old.cls.__module__ == cls.__module__):
            return old
        raise ValueError(f"message type {name!r} is already registered by {old.cls.__module__}.{old.cls.__qualname__}")
    hints = typing.get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        tp = hints.get(f.name, Any)
        specs.append(FieldSpec(f.name, make_checker(tp), _describe(tp), required))
    spec = MessageSpec(name, cls, tuple(specs), frozenset(s.name for s in specs))
    _REGISTRY[name] = spec
    _BY_CLASS[cls] = name
    return spec


def message_types() -> dict[str, type]:
    """Every registered message type by name."""
    return {name: spec.cls for name, spec in sorted(_REGISTRY.items())}


def spec_for(type_name: str) -> MessageSpec:
    """The registry entry for ``type_name``; :class:`UnknownMessageType` if there is none."""
    try:
        return _REGISTRY[type_name]
    except (KeyError, TypeError):
        raise UnknownMessageType(f"unknown message type {type_name!r}", type=str(type_name)) from None


def type_name_of(msg: object) -> str:
    """The registered name of a message instance."""
    try:
        return _BY_CLASS[type(msg)]
    except KeyError:
        raise UnknownMessageType(f"{type(msg).__qualname__} is not a registered message type") from None


def validate_body(type_name: str, body: Any) -> MessageSpec:
    """Check ``body`` (a decoded map) against the type's fields without building the object."""
    spec = spec_for(type_name)
    if not _fast_ok(spec, body):
        _explain(spec, body)
    return spec


_FAST: dict[str, Callable[[Any], bool]] = {}


def _fast_ok(spec: MessageSpec, body: Any) -> bool:
    """A quick yes for valid bodies (the common case); a no sends us to :func:`_explain`."""
    check = _FAST.get(spec.name)
    if check is None:
        check = _FAST[spec.name] = _fast_check(spec)
    return check(body)


def _fast_check(spec: MessageSpec) -> Callable[[Any], bool]:
    """A function that says, as fast as Python allows, whether a body is valid for ``spec``:
    generated source with the simple type tests written inline (the kernel runs it per event)."""
    cached = _FAST.get(spec.name)
    if cached is not None:
        return cached
    env: dict[str, Any] = {"_names": spec.names, "_M": _MISSING}
    lines = ["def check(b):", "    if type(b) is not dict or not (b.keys() <= _names):", "        return False"]
    hints = typing.get_type_hints(spec.cls) if dataclasses.is_dataclass(spec.cls) else {}
    for i, f in enumerate(spec.fields):
        expr = _inline_check(hints.get(f.name, Any))
        if expr is None:
            env[f"_c{i}"] = f.check
            expr = f"_c{i}(v)"
        if expr == "True" and not f.required:
            continue
        lines.append(f"    v = b.get({f.name!r}, _M)")
        if f.required:
            lines += ["    if v is _M:", "        return False"]
            lines += [f"    if not ({expr}):", "        return False"] if expr != "True" else []
        else:
            lines += [f"    if v is not _M and not ({expr}):", "        return False"]
    lines.append("    return True")
    exec(compile("\n".join(lines), f"<llmos check {spec.name}>", "exec"), env)
    check: Callable[[Any], bool] = env["check"]
    _FAST[spec.name] = check
    return check


_SIMPLE_EXPR = {
    int: "type(v) is int",
    float: "(type(v) is float or type(v) is int)",
    str: "type(v) is str",
    bytes: "type(v) is bytes",
    bool: "(v is True or v is False)",
    type(None): "v is None",
}


def _inline_check(tp: Any) -> str | None:
    """Python source testing ``v`` against ``tp`` for the common annotations, else None (the
    field's checker function is called instead). Must agree with :func:`make_checker`."""
    if tp is Any or tp is object:
        return "True"
    if tp is None:
        tp = type(None)
    if tp in _SIMPLE_EXPR:
        return _SIMPLE_EXPR[tp]
    origin, args = get_origin(tp), get_args(tp)
    if origin in (Union, types.UnionType) and all(a in _SIMPLE_EXPR for a in args) and bool not in args:
        return "(" + " or ".join(_SIMPLE_EXPR[a] for a in args) + ")"
    if origin is dict and args == (str, Any):
        return "(type(v) is dict and all([type(k) is str for k in v]))"
    return None


_MISSING = object()


def _explain(spec: MessageSpec, body: Any) -> None:
    """Raise the ValidationError that says what is wrong with ``body``."""
    type_name = spec.name
    if not isinstance(body, dict):
        raise ValidationError(f"{type_name}: body must be a map, got {type(body).__name__}", type=type_name)
    extra = body.keys() - spec.names
    if extra:
        raise ValidationError(
            f"{type_name}: unknown field {sorted(map(str, extra))[0]!r}; expected fields: {', '.join(sorted(spec.names))}",
            type=type_name,
        )
    for fs in spec.fields:
        if fs.name in body:
            if not fs.check(body[fs.name]):
                value = body[fs.name]
                raise ValidationError(
                    f"{type_name}.{fs.name}: expected {fs.expected}, got {type(value).__name__} {_short(value)}",
                    type=type_name,
                    field=fs.name,
                )
        elif fs.required:
            raise ValidationError(f"{type_name}: missing field {fs.name!r} ({fs.expected})", type=type_name, field=fs.name)
    raise ValidationError(f"{type_name}: invalid body", type=type_name)


def decode_body(type_name: str, body: Any) -> Any:
    """Validate ``body`` and build the message object."""
    spec = validate_body(type_name, body)
    return spec.cls(**body)


def encode_body(msg: object) -> dict[str, Any]:
    """The map that carries ``msg`` on the wire (fields in declaration order)."""
    cls = type(msg)
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]
    return {name: getattr(msg, name) for name in names}


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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


# ---------------------------------------------------------------------------------------------
# the messages of the kernel protocol

# -- client requests and their replies --


@message("kernel.error_reply")
@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorReply:
    """Any request can be answered with this: the error's class name, text and stable code."""

    status: str = "error"
    ename: str
    evalue: str
    code: int
    context: dict[str, Any] = field(default_factory=dict)


@message("kernel.submit_request")
@dataclass(frozen=True, slots=True, kw_only=True)
class SubmitRequest:
    """Queue a job of ``kind``. With ``coerce``, string parameter values are converted to the
    schema's types (what the CLI sends for ``-p KEY=VALUE``)."""

    kind: str
    params: dict[str, Any] = field(default_factory=dict)
    resources: dict[str, Any] = field(default_factory=dict)
    priority: int = 0
    max_retries: int = 0
    timeout: float | None = None
    coerce: bool = False
    #: May the scheduler stop it for a job of higher priority (it resumes later)? None: the kind's default.
    preemptible: bool | None = None
    #: The submitter's working directory: relative path parameters are resolved against it.
    cwd: str | None = None


@message("kernel.job_reply")
@dataclass(frozen=True, slots=True, kw_only=True)
class JobReply:
    """One job's record (the answer to submit, job and cancel requests)."""

    status: str = "ok"
    job: dict[str, Any]


@message("kernel.job_request")
@dataclass(frozen=True, slots=True, kw_only=True)
class JobRequest:
    """Ask for one job's record."""

    id: int


@message("kernel.jobs_request")
@dataclass(frozen=True, slots=True, kw_only=True)
class JobsRequest:
    """List jobs, newest last, optionally only those in ``state``."""

    state: str | None = None
    limit: int = 1000


@message("kernel.jobs_reply")
@dataclass(frozen=True, slots=True, kw_only=True)
class JobsReply:
    """Job records."""

    status: str = "ok"
    jobs: list[dict[str, Any]]


@message("kernel.cancel_request")
@dataclass(frozen=True, slots=True, kw_only=True)
class CancelRequest:
    """Cancel a job: pending ones end at once, running ones are asked to stop, then signalled."""

    id: int
    reason: str = "cancelled by user"


@message("kernel.devices_request")
@dataclass(frozen=True, slots=True, kw_only=True)
class DevicesRequest:
    """Ask for the device table."""


@message("kernel.devices_reply")
@dataclass(frozen=True, slots=True, kw_only=True)
class DevicesReply:
    """The device table: one map per device."""

    status: str = "ok"
    devices: list[dict[str, Any]]


@message("kernel.plugins_request")
@dataclass(frozen=True, slots=True, kw_only=True)
class PluginsRequest:
    """Ask which plugins the kernel loaded and what they registered."""


@message("kernel.plugins_reply")
@dataclass(frozen=True, slots=True, kw_only=True)
class PluginsReply:
    """Plugins with their status, and the job kinds they registered."""

    status: str = "ok"
    plugins: list[dict[str, Any]]
    kinds: list[dict[str, Any]]


@message("kernel.status_request")
@dataclass(frozen=True, slots=True, kw_only=True)
class StatusRequest:
    """Ask for the kernel's status."""


@message("kernel.status_reply")
@dataclass(frozen=True, slots=True, kw_only=True)
class StatusReply:
    """The kernel's identity, endpoints and counters."""

    status: str = "ok"
    version: str
    pid: int
    started_at: float
    state_dir: str
    endpoints: dict[str, str]
    jobs: dict[str, int]
    workers: dict[str, int]
    last_seq: int
    metrics_url: str | None = None
    stats: dict[str, int] = field(default_factory=dict)


@message("kernel.replay_request")
@dataclass(frozen=True, slots=True, kw_only=True)
class ReplayRequest:
    """Journaled events whose topic starts with ``prefix`` and whose seq is above ``since``
    (and at most ``until``), oldest first, at most ``limit`` of them."""

    prefix: str = ""
    since: int = 0
    until: int | None = None
    limit: int = 1000


@message("kernel.replay_reply")
@dataclass(frozen=True, slots=True, kw_only=True)
class ReplayReply:
    """Events as ``[topic, header, body]`` items; ``more`` when the limit cut the answer short;
    ``last_seq`` is the journal's newest seq when the answer was made."""

    status: str = "ok"
    events: list[Any]
    last_seq: int
    more: bool


@message("kernel.stream_heads_request")
@dataclass(frozen=True, slots=True, kw_only=True)
class StreamHeadsRequest:
    """The newest event of every stream matching ``prefix`` that has events above ``since``: how
    a follower checks, cheaply, that it has missed nothing (a dropped last event of a stream)."""

    prefix: str = ""
    since: int = 0


@message("kernel.stream_heads_reply")
@dataclass(frozen=True, slots=True, kw_only=True)
class StreamHeadsReply:
    """``heads`` maps a stream to ``[stream_seq, seq]`` of its newest event; ``last_seq`` is the
    journal's newest seq when the answer was made."""

    status: str = "ok"
    heads: dict[str, list[int]]
    last_seq: int


@message("kernel.plugins_reload_request")
@dataclass(frozen=True, slots=True, kw_only=True)
class PluginsReloadRequest:
    """Load the plugins again (after an install, uninstall, enable or disable); new workers get the new set."""


@message("kernel.plugins_reload_reply")
@dataclass(frozen=True, slots=True, kw_only=True)
class PluginsReloadReply:
    """What a reload changed: plugins and job kinds added and removed, and the new plugin list."""

    status: str = "ok"
    added: list[str]
    removed: list[str]
    kinds_added: list[str]
    kinds_removed: list[str]
    plugins: list[dict[str, Any]]


@message("kernel.plugins_changed")
@dataclass(frozen=True, slots=True, kw_only=True)
class PluginsChanged:
    """The kernel's plugin set changed."""

    added: list[str]
    removed: list[str]
    kinds_added: list[str]
    kinds_removed: list[str]


@message("kernel.service_quarantined")
@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceQuarantined:
    """A service crashed too often and will not be restarted: an autostart service's kind until
    the plugins are reloaded (``job_id`` None), or one started instance (its last job, ``job_id``)."""

    service: str
    plugin: str
    crashes: int
    window: float
    reason: str
    job_id: int | None = None


@message("monitor.usage_report")
@dataclass(frozen=True, slots=True, kw_only=True)
class UsageReport:
    """From the monitor service to the kernel: what the node, each GPU (by index) and each
    running job (by id) use now. Fields a device cannot report are absent, never zero."""

    node: dict[str, Any]
    gpus: list[dict[str, Any]] = field(default_factory=list)
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)


@message("device.metrics")
@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceMetrics:
    """A device's measured use (published on ``device.<id>.metrics``)."""

    used: dict[str, Any]


@message("job.usage")
@dataclass(frozen=True, slots=True, kw_only=True)
class JobUsage:
    """A running job's measured use: CPU %, resident memory of its process tree, GPU memory."""

    cpu_percent: float
    rss: int
    processes: int = 0
    gpu_memory: int | None = None


@message("kernel.acct_request")
@dataclass(frozen=True, slots=True, kw_only=True)
class AcctRequest:
    """Accounting of finished jobs that ended after ``since`` (epoch seconds)."""

    since: float | None = None
    limit: int = 1000


@message("kernel.acct_reply")
@dataclass(frozen=True, slots=True, kw_only=True)
class AcctReply:
    """One row per finished job: kind, plugin, state, wall and CPU time, peak memory, GPU use, tokens."""

    status: str = "ok"
    jobs: list[dict[str, Any]]


@message("kernel.shutdown_request")
@dataclass(frozen=True, slots=True, kw_only=True)
class ShutdownRequest:
    """Stop the kernel (running jobs' workers are stopped; their jobs fail as "kernel restarted"
    when it comes back)."""


@message("kernel.ok_reply")
@dataclass(frozen=True, slots=True, kw_only=True)
class OkReply:
    """A request done, with nothing more to say."""

    status: str = "ok"


# -- kernel <-> worker --


@message("worker.ready")
@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerReady:
    """A worker process is up, connected and waiting for a job."""

    worker_id: str
    pid: int


@message("worker.heartbeat")
@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerHeartbeat:
    """A worker is alive (sent every ``workers.heartbeat_interval`` seconds)."""

    worker_id: str
    job_id: int | None = None


@message("worker.assign")
@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerAssign:
    """Kernel to worker: run this job."""

    job_id: int
    kind: str
    params: dict[str, Any]
    attempt: int
    resources: dict[str, Any]
    placement: dict[str, Any]
    workdir: str
    env: dict[str, str] = field(default_factory=dict)


@message("worker.cancel")
@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerCancel:
    """Kernel to worker: stop the running job (the runner sees ``ctx.cancelled``)."""

    job_id: int
    reason: str


@message("service.register")
@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceRegister:
    """Worker to kernel: this worker answers requests to service ``name`` (one replica of it)."""

    worker_id: str
    name: str


@message("service.request")
@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceRequest:
    """Client to kernel: a request for service ``service``; replies come back as service.response
    messages whose parent_id is this message's id, the last one with ``done``."""

    service: str
    body: dict[str, Any] = field(default_factory=dict)


@message("service.call")
@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceCall:
    """Kernel to a replica: a request to answer (``request_id`` ties its responses to the caller)."""

    request_id: str
    body: dict[str, Any]


@message("service.response")
@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceResponse:
    """A replica's answer, or one piece of it; ``done`` ends it. ``error`` (with ``code``) fails it."""

    request_id: str
    body: dict[str, Any] = field(default_factory=dict)
    done: bool = False
    error: str | None = None
    code: int | None = None


@message("service.cancel")
@dataclass(frozen=True, slots=True, kw_only=True)
class ServiceCancel:
    """Client to kernel (and kernel to replica): the caller no longer wants this request."""

    request_id: str


@message("kernel.services_request")
@dataclass(frozen=True, slots=True, kw_only=True)
class ServicesRequest:
    """Ask which services are running."""


@message("kernel.services_reply")
@dataclass(frozen=True, slots=True, kw_only=True)
class ServicesReply:
    """Each service: its name, its replicas (worker, job) and the requests in flight."""

    status: str = "ok"
    services: list[dict[str, Any]]


@message("worker.exit")
@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerExit:
    """Kernel to an idle worker: leave."""


@message("worker.job_done")
@dataclass(frozen=True, slots=True, kw_only=True)
class JobDone:
    """Worker to kernel (on the ingest path, after the job's last event): how the runner ended."""

    job_id: int
    attempt: int
    outcome: Literal["succeeded", "failed", "cancelled"]
    result: Any = None
    error: str | None = None
    traceback: str | None = None


# -- events --


@message("job.state")
@dataclass(frozen=True, slots=True, kw_only=True)
class JobStateChanged:
    """A job moved to ``state``; ends carry ``reason`` and ``exit_code``."""

    state: str
    reason: str | None = None
    exit_code: int | None = None
    attempts: int = 0
    placement: dict[str, Any] | None = None


@message("job.progress")
@dataclass(frozen=True, slots=True, kw_only=True)
class JobProgress:
    """A runner's progress: ``step`` of ``total``, a message and any numbers worth showing."""

    step: int | float
    total: int | float | None = None
    message: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)


@message("job.log")
@dataclass(frozen=True, slots=True, kw_only=True)
class JobLog:
    """One structured log record of a runner."""

    level: str
    event: str
    logger: str | None = None
    fields: dict[str, Any] = field(default_factory=dict)


@message("job.metric")
@dataclass(frozen=True, slots=True, kw_only=True)
class JobMetric:
    """One named number, optionally at a step."""

    name: str
    value: float
    step: int | None = None


@message("job.artifact")
@dataclass(frozen=True, slots=True, kw_only=True)
class JobArtifact:
    """A file or directory a job produced."""

    path: str
    kind: str = "file"
    meta: dict[str, Any] = field(default_factory=dict)


@message("generate.text")
@dataclass(frozen=True, slots=True, kw_only=True)
class GeneratedText:
    """A piece of generated text, as it is made: prompt ``index``, the token id and its text."""

    index: int
    token: int
    text: str


@message("kernel.started")
@dataclass(frozen=True, slots=True, kw_only=True)
class KernelStarted:
    """The kernel booted."""

    version: str
    pid: int


@message("kernel.stopping")
@dataclass(frozen=True, slots=True, kw_only=True)
class KernelStopping:
    """The kernel is shutting down."""

    reason: str


JOB_STATES = ("pending", "running", "succeeded", "failed", "cancelled")
END_STATES = frozenset({"succeeded", "failed", "cancelled"})

__all__ = [
    "END_STATES",
    "JOB_STATES",
    "MAX_FRAME_BYTES",
    "PROTOCOL_VERSION",
    "STREAM_KINDS",
    "AcctReply",
    "AcctRequest",
    "CancelRequest",
    "DeviceMetrics",
    "DevicesReply",
    "DevicesRequest",
    "ErrorReply",
    "Event",
    "GeneratedText",
    "JobArtifact",
    "JobDone",
    "JobLog",
    "JobMetric",
    "JobProgress",
    "JobReply",
    "JobRequest",
    "JobStateChanged",
    "JobUsage",
    "JobsReply",
    "JobsRequest",
    "KernelStarted",
    "KernelStopping",
    "MessageSpec",
    "OkReply",
    "PluginsChanged",
    "PluginsReloadReply",
    "PluginsReloadRequest",
    "PluginsReply",
    "PluginsRequest",
    "ReplayReply",
    "ReplayRequest",
    "ServiceCall",
    "ServiceCancel",
    "ServiceQuarantined",
    "ServiceRegister",
    "ServiceRequest",
    "ServiceResponse",
    "ServicesReply",
    "ServicesRequest",
    "ShutdownRequest",
    "StatusReply",
    "StatusRequest",
    "SubmitRequest",
    "UsageReport",
    "WorkerAssign",
    "WorkerCancel",
    "WorkerExit",
    "WorkerHeartbeat",
    "WorkerReady",
    "check_event_header",
    "check_header",
    "decode_body",
    "decode_control",
    "encode_body",
    "encode_control",
    "event_from_item",
    "make_checker",
    "make_header",
    "message",
    "message_types",
    "new_id",
    "pack_array",
    "pack_item",
    "packb",
    "register_message_type",
    "spec_for",
    "stamp",
    "storable_problem",
    "stream_of",
    "topic",
    "type_name_of",
    "unpackb",
    "validate_body",
]
