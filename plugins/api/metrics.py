"""The gateway's Prometheus figures (``GET /metrics``): requests by model, endpoint and status,
tokens in and out, time to first token and time per output token as histograms, and each
model's queue (requests waiting for a slot, and running) as its replica reports it."""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

disable_created_metrics()  # the gateway's worker holds nothing else: no *_created series beside each counter

TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("llmos_api_requests", "HTTP generation requests answered, by model, endpoint and status.", ["model", "endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("llmos_api_prompt_tokens", "Prompt tokens of the requests answered.", ["model"], registry=r)
        self.generation_tokens = Counter("llmos_api_generation_tokens", "Tokens generated for the requests answered.", ["model"], registry=r)
        self.ttft = Histogram("llmos_api_time_to_first_token_seconds", "From the request's arrival at the gateway to its first token.", ["model"],
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("llmos_api_time_per_output_token_seconds", "Decode time per token after the first, per request.", ["model"],
                              buckets=TPOT_BUCKETS, registry=r)
        self.waiting = Gauge("llmos_api_queue_depth", "Requests waiting for a slot at the model's replica.", ["model"], registry=r)
        self.running = Gauge("llmos_api_requests_running", "Requests decoding at the model's replica.", ["model"], registry=r)

    def request(self, model: str | None, endpoint: str, status: int, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        model = model or ""
        self.requests.labels(model, endpoint, str(status)).inc()
        if prompt_tokens:
            self.prompt_tokens.labels(model).inc(prompt_tokens)
        if completion_tokens:
            self.generation_tokens.labels(model).inc(completion_tokens)

    def first_token(self, model: str, seconds: float) -> None:
        self.ttft.labels(model).observe(seconds)

    def completion(self, model: str, completion: dict[str, Any], gateway_total: float | None) -> None:
        """One finished choice: its decode rate, and (not streamed) its time to first token,
        which is the gateway's whole time less the replica's decoding."""
        t = completion.get("timings") or {}
        n = len(completion.get("tokens") or [])
        decoding = max(float(t.get("total_s", 0.0)) - float(t.get("ttft_s", 0.0)), 0.0)
        if n > 1:
            self.tpot.labels(model).observe(decoding / (n - 1))
        if gateway_total is not None and n:
            self.ttft.labels(model).observe(max(gateway_total - decoding, 0.0))

    def queue(self, model: str, waiting: int, running: int) -> None:
        self.waiting.labels(model).set(waiting)
        self.running.labels(model).set(running)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
