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

The package: :mod:`~llmos.protocol.wire` (the bytes), :mod:`~llmos.protocol.registry` (message
types and their checks), :mod:`~llmos.protocol.topics`, and the catalogue by area —
:mod:`~llmos.protocol.jobs`, :mod:`~llmos.protocol.kernel`, :mod:`~llmos.protocol.services`,
:mod:`~llmos.protocol.workers`, :mod:`~llmos.protocol.events`. Everything is importable from
``llmos.protocol`` itself, as before.
"""

from __future__ import annotations

from llmos.protocol.events import (
    DeviceMetrics,
    GeneratedText,
    JobArtifact,
    JobLog,
    JobMetric,
    JobProgress,
    JobStateChanged,
    JobUsage,
    KernelStarted,
    KernelStopping,
    PluginsChanged,
    ServiceQuarantined,
)
from llmos.protocol.jobs import (
    END_STATES,
    JOB_STATES,
    AcctReply,
    AcctRequest,
    CancelRequest,
    JobReply,
    JobRequest,
    JobsReply,
    JobsRequest,
    SubmitRequest,
)
from llmos.protocol.kernel import (
    DevicesReply,
    DevicesRequest,
    ErrorReply,
    OkReply,
    PluginsReloadReply,
    PluginsReloadRequest,
    PluginsReply,
    PluginsRequest,
    ReplayReply,
    ReplayRequest,
    ShutdownRequest,
    StatusReply,
    StatusRequest,
    StreamHeadsReply,
    StreamHeadsRequest,
    UsageReport,
)
from llmos.protocol.lifecycle import (
    ARTIFACT_ACTIONS,
    PIPELINE_STATES,
    STAGE_STATES,
    ArtifactsReply,
    ArtifactsRequest,
    PipelineReply,
    PipelineRequest,
    PipelinesReply,
    PipelinesRequest,
    PipelineStageChanged,
    PipelineStateChanged,
    PipelineSubmit,
)
from llmos.protocol.registry import (
    FieldSpec,
    MessageSpec,
    decode_body,
    encode_body,
    make_checker,
    message,
    message_types,
    register_message_type,
    spec_for,
    type_name_of,
    validate_body,
)
from llmos.protocol.services import (
    ServiceCall,
    ServiceCancel,
    ServiceRegister,
    ServiceRequest,
    ServiceResponse,
    ServicesReply,
    ServicesRequest,
)
from llmos.protocol.topics import STREAM_KINDS, stream_of, topic
from llmos.protocol.wire import (
    ITEM_HEAD,
    ITEM_TS_KEY,
    MAX_FRAME_BYTES,
    PROTOCOL_VERSION,
    STAMPED_HEAD,
    Event,
    check_event_header,
    check_header,
    decode_control,
    encode_control,
    event_from_item,
    event_header,
    item_head,
    make_header,
    new_id,
    pack_array,
    pack_item,
    packb,
    replay_reply_frames,
    stamp,
    stamp_tail,
    storable_problem,
    unpackb,
)
from llmos.protocol.workers import (
    JobDone,
    WorkerAssign,
    WorkerCancel,
    WorkerExit,
    WorkerHeartbeat,
    WorkerReady,
)

__all__ = [
    "ARTIFACT_ACTIONS",
    "END_STATES",
    "ITEM_HEAD",
    "ITEM_TS_KEY",
    "JOB_STATES",
    "MAX_FRAME_BYTES",
    "PIPELINE_STATES",
    "PROTOCOL_VERSION",
    "STAGE_STATES",
    "STAMPED_HEAD",
    "STREAM_KINDS",
    "AcctReply",
    "AcctRequest",
    "ArtifactsReply",
    "ArtifactsRequest",
    "CancelRequest",
    "DeviceMetrics",
    "DevicesReply",
    "DevicesRequest",
    "ErrorReply",
    "Event",
    "FieldSpec",
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
    "PipelineReply",
    "PipelineRequest",
    "PipelineStageChanged",
    "PipelineStateChanged",
    "PipelineSubmit",
    "PipelinesReply",
    "PipelinesRequest",
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
    "StreamHeadsReply",
    "StreamHeadsRequest",
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
    "event_header",
    "item_head",
    "make_checker",
    "make_header",
    "message",
    "message_types",
    "new_id",
    "pack_array",
    "pack_item",
    "packb",
    "register_message_type",
    "replay_reply_frames",
    "spec_for",
    "stamp",
    "stamp_tail",
    "storable_problem",
    "stream_of",
    "topic",
    "type_name_of",
    "unpackb",
    "validate_body",
]
