"""The OpenAI-compatible gateway against the SDK it stands in front of, one run.

Run ``python benchmarks/api.py`` (about 6 minutes on 2 cores; ``--quick`` about 1.5). A kernel is
booted with ``llmos boot --detach`` in a temporary state dir; the model (preset ``small``, random
weights, a byte vocabulary, an end-of-text id outside it so every request runs to its length:
speed does not depend on the weights) is served with ``llmos serve`` and default options (every
free core, ``max_seqs=16``), and the gateway is started with ``llmos api``, as a user would. The
SDK side is one ``llmos.connect()`` shared by a thread pool. The HTTP side is measured with two
clients:

- a lean streaming client (aiohttp, one event loop, SSE read line by line and each event parsed
  with ``json.loads``), as vLLM's serving benchmark (``vllm bench serve``) measures a server: it
  costs about what the SDK's client costs, so the ratio is what the gateway costs;
- the real ``openai`` client (one shared by a thread pool), whose own parsing costs about three
  times the SDK client's CPU per token: on a machine whose decode uses every core that CPU is taken
  from the decode, so its row shows what a user of that client gets here.

The sides alternate phase by phase, so they share whatever load the machine has:

1. **Streams.** One stream of ``NEW`` greedy tokens at a time, then 16 at once: tokens over the
   wall time of the load (time to first token included), HTTP against the SDK (target >= 0.95x),
   in rounds whose order reverses every round. Two rounds make a block (SDK, HTTP, HTTP, SDK), so
   a drift of the machine's speed that is linear over the block cancels in the block's ratio of
   sums; the ratio reported is the median of the blocks' ratios. The
   CPU seconds per token of the kernel, the replica, the gateway and this client over the
   16-stream loads are reported too: on a machine whose speed drifts from round to round they show
   what the gateway costs without the drift.
2. **Time to first token added by the gateway.** Short streamed requests one at a time,
   alternating SDK and HTTP: the medians' difference (target <= 5 ms).
3. **Short completions under 64 concurrent clients.** ``max_tokens=4``, not streamed, the
   ``openai`` client on 64 threads for ``--requests`` requests: requests/s, and that none was lost
   (every one answered 200 with 4 tokens); the SDK under the same 64 threads beside it.

A table is printed and written into ``docs/benchmarks.md`` under ``## API gateway
(benchmarks/api.py)`` (``--no-write`` skips the file). A missed target is marked FAIL and does not
change the exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psutil
from _benchkernel import Kernel, llmos_cmd
from _report import cpu_model, pct, say, verdict, write_doc

import llmos

SECTION = "## API gateway (benchmarks/api.py)"
SERVICE = "api-bench"
STREAMS = 16
PRESET = "small"  # 12 layers of width 768 (85M parameters with a byte vocabulary): decode speed of a common small model
CLIENTS = 64
NOTE = ("Where HTTP costs throughput on this 2-core machine: the decode's two threads use both cores, so every CPU second another process takes is taken from "
        "the decode. Through the gateway each piece wakes the gateway (its event loop reads the kernel's socket itself) and then the HTTP client; through the SDK "
        "only the client. The replica sends each decode step's pieces for all its sequences as one bus message, which the kernel hands to each caller as one "
        "message (`ctx.responding_together()`); the gateway's own work per piece is kept small (one SSE event encoded from a per-stream template; pieces that "
        "arrive together go out in one write). The `openai` client builds a pydantic object per chunk on 16 threads: its CPU per token is about three times the "
        "SDK client's, and that is why its row is lower here; with a core to spare it would not touch the decode.")


def make_model(directory: Path) -> Path:
    from llmos.plugins.lm.checkpoint import save_checkpoint
    from llmos.plugins.lm.config import config_from_preset
    from llmos.plugins.lm.model import Llama
    from llmos.plugins.lm.text import bytes_tokenizer

    tok = bytes_tokenizer()
    model = Llama(config_from_preset(PRESET, tok.vocab_size, eos_token_id=tok.vocab_size + 1))
    model.init_weights(seed=0)
    save_checkpoint(directory, model, tok.to_json(), {})
    return directory


def cli(state: Path, *args: str) -> Any:
    proc = subprocess.run([*llmos_cmd(), args[0], "--state-dir", str(state), *args[1:], "--json"], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"llmos {' '.join(args)} failed: {proc.stderr.strip()}")
    return json.loads(proc.stdout)


def prompt(i: int) -> str:
    return f"def function_{i}(value):\n    return "


class Sides:
    """The ways to ask the same service: the SDK directly, and HTTP through the gateway with a
    lean streaming client and with the ``openai`` client."""

    def __init__(self, client: llmos.Client, url: str) -> None:
        import openai

        self.client, self.url = client, url
        self.http = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="lean-http", daemon=True)
        self.thread.start()
        self.session = self._on_loop(self._session())

    def _on_loop(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    async def _session(self) -> Any:
        import aiohttp

        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=300))

    def close(self) -> None:
        self._on_loop(self.session.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.http.close()

    def sdk_stream(self, text: str, new: int) -> tuple[float, int, float]:
        """(time to first piece, tokens, total seconds) of one streamed request."""
        t0 = time.perf_counter()
        first, tokens = None, 0
        for reply in self.client.call(SERVICE, {"prompt": text, "sampling": {"max_new_tokens": new, "temperature": 0}, "stream": True}):
            if "completion" in reply:
                tokens = len(reply["completion"]["tokens"])
            elif first is None:
                first = time.perf_counter() - t0
        return first or 0.0, tokens, time.perf_counter() - t0

    async def _lean(self, text: str, new: int) -> tuple[float, int, float]:
        t0 = time.perf_counter()
        first, tokens = None, 0
        body = {"model": SERVICE, "prompt": text, "max_tokens": new, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        async with self.session.post(self.url + "/v1/completions", json=body) as response:
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}: {await response.text()}")
            async for line in response.content:
                if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                    first = time.perf_counter() - t0
        return first or 0.0, tokens, time.perf_counter() - t0

    def http_stream(self, text: str, new: int) -> tuple[float, int, float]:
        """The same through the gateway, read by the lean client (the calling thread waits)."""
        return self._on_loop(self._lean(text, new))

    def openai_stream(self, text: str, new: int) -> tuple[float, int, float]:
        t0 = time.perf_counter()
        first, tokens = None, 0
        stream = self.http.completions.create(model=SERVICE, prompt=text, max_tokens=new, temperature=0, stream=True,
                                              stream_options={"include_usage": True})
        for chunk in stream:
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
            elif first is None and chunk.choices and chunk.choices[0].text:
                first = time.perf_counter() - t0
        return first or 0.0, tokens, time.perf_counter() - t0

    def sdk_short(self, text: str) -> bool:
        c = self.client.generate(SERVICE, text, max_new_tokens=4, temperature=0)
        return len(c.tokens) == 4

    def http_short(self, text: str) -> bool:
        r = self.http.completions.create(model=SERVICE, prompt=text, max_tokens=4, temperature=0)
        return r.usage.completion_tokens == 4 and r.choices[0].finish_reason == "length"


def load(fn: Any, count: int, threads: int, new: int | None) -> tuple[float, list[Any]]:
    """Run ``count`` calls of ``fn`` on ``threads`` threads; (wall seconds, results)."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(fn, prompt(i)) if new is None else pool.submit(fn, prompt(i), new) for i in range(count)]
        results = []
        for f in futures:
            try:
                results.append(f.result())
            except Exception as exc:
                results.append(exc)
    return time.perf_counter() - t0, results


def block_ratio(http: list[float], sdk: list[float], block: int) -> float:
    """HTTP against the SDK over rounds ``2 * block`` and the next, whose orders are reversed
    (SDK, HTTP, HTTP, SDK): a drift of the machine's speed that is linear over the block cancels."""
    pair = slice(2 * block, 2 * block + 2)
    return sum(http[pair]) / sum(sdk[pair])


class Cpu:
    """CPU seconds (user + system, all threads) the kernel, the replica, the gateway and this
    client used over one side's loads."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.procs = {name: psutil.Process(pid) for name, pid in pids.items()}
        self.used: dict[str, dict[str, float]] = {}

    def _now(self) -> dict[str, float]:
        out = {}
        for name, proc in self.procs.items():
            t = proc.cpu_times()
            out[name] = t.user + t.system
        return out

    @contextlib.contextmanager
    def measure(self, side: str) -> Any:
        before = self._now()
        yield
        after = self._now()
        mine = self.used.setdefault(side, {})
        for name in after:
            mine[name] = mine.get(name, 0.0) + after[name] - before[name]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds (about 1.5 minutes)")
    ap.add_argument("--requests", type=int, default=None, help="short completions per side in phase 3 (default 640; 192 with --quick)")
    ap.add_argument("--no-write", action="store_true", help="do not write docs/benchmarks.md")
    args = ap.parse_args(argv)
    q = args.quick
    rounds, new, pings = (2, 64, 20) if q else (12, 96, 60)  # rounds: an even number, two to a block
    requests = args.requests or (192 if q else 640)
    started = time.time()
    t_start = time.perf_counter()
    rows: list[tuple[str, str, str, str, str]] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="llmos-api-bench-") as tmp, Kernel() as kernel:
        assert kernel.client is not None
        model = make_model(Path(tmp) / "micro")
        t0 = time.perf_counter()
        served = cli(kernel.dir, "serve", str(model), "--name", SERVICE)
        up = time.perf_counter() - t0
        api = cli(kernel.dir, "api", "--port", "0")
        cores = kernel.client.job(served["replicas"][0]["job_id"]).info().resources["cpus"]
        sides = Sides(kernel.client, api["url"])
        replica, gateway = (kernel.client.job(j).info().worker_pid for j in (served["replicas"][0]["job_id"], api["job_id"]))
        cpu = Cpu({"kernel": kernel.pid, "replica": replica, "gateway": gateway, "client": os.getpid()})
        tokens16: dict[str, int] = {"sdk": 0, "http": 0, "openai": 0}
        say(f"serving on {cores:g} core(s); gateway at {api['url']}")
        streams = {"sdk": sides.sdk_stream, "http": sides.http_stream, "openai": sides.openai_stream}
        for fn in streams.values():
            fn(prompt(0), 8)  # warm every path

        rates: dict[str, list[float]] = {"sdk1": [], "http1": [], "sdk16": [], "http16": [], "openai16": []}
        for r in range(rounds):
            for side in ("sdk", "http", "openai") if r % 2 == 0 else ("openai", "http", "sdk"):  # the order reverses: drift falls on every side
                fn = streams[side]
                if side != "openai":
                    wall, results = load(fn, 2, 1, new)
                    rates[f"{side}1"].append(sum(x[1] for x in results) / wall)
                with cpu.measure(side):
                    wall, results = load(fn, STREAMS, STREAMS, new)
                tokens16[side] += sum(x[1] for x in results)
                rates[f"{side}16"].append(sum(x[1] for x in results) / wall)
                one = f"1 stream {rates[side + '1'][-1]:.1f} tokens/s, " if side != "openai" else ""
                say(f"round {r + 1} {side}: {one}{STREAMS} streams {rates[side + '16'][-1]:.1f} tokens/s")
        med = {k: statistics.median(v) for k, v in rates.items()}
        blocks = rounds // 2
        for side, n, label, target in (("http", 1, "1 stream", True), ("http", STREAMS, f"{STREAMS} concurrent streams", True),
                                       ("openai", STREAMS, f"{STREAMS} concurrent streams, read by the `openai` client", False)):
            ratio = statistics.median(block_ratio(rates[f"{side}{n}"], rates[f"sdk{n}"], b) for b in range(blocks))
            client = "lean client, " if side == "http" else ""
            rows.append((f"tokens/s through HTTP, {label} ({client}{new} greedy tokens each, median of {rounds} rounds)", f"{med[f'{side}{n}']:.1f} tokens/s",
                         f"{med[f'sdk{n}']:.1f} tokens/s SDK", f"{ratio:.3f}x, median of {blocks} blocks' ratios" + (" (target >= 0.95x)" if target else " (no target: the client's own cost)"),
                         verdict(ratio >= 0.95) if target else "info"))
        notes.append("Blocks' ratios, HTTP against the SDK: " + "; ".join(
            f"{label} " + ", ".join(f"{block_ratio(rates[f'{side}{n}'], rates[f'sdk{n}'], b):.3f}" for b in range(blocks))
            for side, n, label in (("http", 1, "1 stream"), ("http", STREAMS, f"{STREAMS} streams"), ("openai", STREAMS, f"{STREAMS} streams with `openai`"))) + ".")
        per_token = {side: {name: 1e3 * secs / max(tokens16[side], 1) for name, secs in used.items()} for side, used in cpu.used.items()}
        notes.append(f"CPU per token over the {STREAMS}-stream loads, in ms (SDK / HTTP, lean client / HTTP, `openai` client): "
                     + ", ".join(f"{name} {per_token['sdk'][name]:.2f} / {per_token['http'][name]:.2f} / {per_token['openai'][name]:.2f}"
                                 for name in ("replica", "kernel", "gateway", "client"))
                     + ". The gateway's own cost is its figure on the HTTP sides; the client's figures are each client's parsing.")
        notes.append("Streams, tokens/s per round (SDK / HTTP lean / HTTP `openai`): 1 stream "
                     + ", ".join(f"{a:.1f} / {b:.1f}" for a, b in zip(rates["sdk1"], rates["http1"]))
                     + f"; {STREAMS} streams " + ", ".join(f"{a:.1f} / {b:.1f} / {c:.1f}" for a, b, c in zip(rates["sdk16"], rates["http16"], rates["openai16"])) + ".")

        sdk_ttft, http_ttft = [], []
        for i in range(pings):
            order = (sides.sdk_stream, sides.http_stream) if i % 2 == 0 else (sides.http_stream, sides.sdk_stream)
            for fn in order:
                first, _, _ = fn(prompt(i), 2)
                (sdk_ttft if fn == sides.sdk_stream else http_ttft).append(first)
        added = statistics.median(http_ttft) - statistics.median(sdk_ttft)
        rows.append((f"time to first token added by the gateway (median of {pings} streamed requests each, alternating)", f"{added * 1e3:.2f} ms",
                     f"SDK {statistics.median(sdk_ttft) * 1e3:.2f} ms, HTTP {statistics.median(http_ttft) * 1e3:.2f} ms", "target <= 5 ms", verdict(added <= 0.005)))
        notes.append(f"Time to first token: SDK p50 {statistics.median(sdk_ttft) * 1e3:.2f} ms p90 {pct(sdk_ttft, 0.9) * 1e3:.2f} ms; "
                     f"HTTP p50 {statistics.median(http_ttft) * 1e3:.2f} ms p90 {pct(http_ttft, 0.9) * 1e3:.2f} ms.")

        notes.append(NOTE)
        short: dict[str, tuple[float, int, int]] = {}
        for side, fn in (("sdk", sides.sdk_short), ("http", sides.http_short)):
            wall, results = load(fn, requests, CLIENTS, None)
            ok = sum(1 for x in results if x is True)
            errors = [x for x in results if x is not True]
            short[side] = (requests / wall, ok, len(errors))
            if errors:
                notes.append(f"{side}: {len(errors)} requests not answered in full, first: {errors[0]!r}")
            say(f"{side}: {requests / wall:.1f} requests/s, {ok} of {requests} answered")
        h, s = short["http"], short["sdk"]
        rows.append((f"short completions (`max_tokens=4`) under {CLIENTS} concurrent `openai` clients, {requests} requests", f"{h[0]:.1f} requests/s, {h[1]} of {requests} answered",
                     f"{s[0]:.1f} requests/s SDK, {s[1]} answered", f"{h[0] / s[0]:.2f}x; none lost", verdict(h[1] == requests)))
        sides.close()
    elapsed = time.perf_counter() - t_start
    import aiohttp
    import openai
    import starlette
    import uvicorn

    head = (f"`python benchmarks/api.py{' --quick' if q else ''}` on {dt.datetime.fromtimestamp(started, dt.UTC):%Y-%m-%d %H:%M} UTC, {elapsed:.0f} s. "
            f"Machine: {os.cpu_count()} CPUs ({cpu_model()}), Python {platform.python_version()}, llmos {llmos.__version__}, starlette {starlette.__version__}, "
            f"uvicorn {uvicorn.__version__}, openai {openai.__version__}, aiohttp {aiohttp.__version__}. Model: preset `{PRESET}` (random weights, byte vocabulary), `llmos serve` with default options "
            f"({cores:g} cores, `max_seqs=16`; up in {up:.1f} s), `llmos api --port 0`; both sides in one process beside them.")
    table = ["| metric | HTTP (gateway) | baseline | ratio / target | result |", "|---|---|---|---|---|"]
    table += [f"| {' | '.join(r)} |" for r in rows]
    section = "\n".join([SECTION, "", head, "", *table, "", *[f"- {n}" for n in notes], ""])
    print(section)
    if not args.no_write:
        write_doc(SECTION, section)
    return 0


if __name__ == "__main__":
    threading.current_thread().name = "bench"
    sys.exit(main())
