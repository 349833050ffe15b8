"""Topics and streams: ``job.7.log`` is the topic, ``job.7`` its stream."""

from __future__ import annotations

# ---------------------------------------------------------------------------------------------
# topics




#: Topics whose second part names one stream (``job.7.log`` is on the stream ``job.7``).
STREAM_KINDS = ("job", "device", "service", "worker", "pipeline")


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
