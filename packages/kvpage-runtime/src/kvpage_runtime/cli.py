"""The ``kvpage`` command: ``serve`` (OpenAI-compatible server), ``generate`` (one-off prompts)
and ``bench`` (the benchmark scripts of a source checkout)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import re
import runpy
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger("kvpage")

BENCH_SCRIPTS = {
    "throughput": "throughput.py",
    "serving": "serving.py",
    "cache": "cache_sim.py",
    "sched": "sched_sim.py",
    "kernels": "kernels.py",
    "quant": "quant.py",
    "beam_search": "beam_search.py",
    "spec_decode": "spec_decode.py",
}
_MEMORY_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
DEFAULT_MAX_WAITING_REQUESTS = 1024
DEFAULT_LIMIT_CONCURRENCY = 1024
_LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


class CLIError(Exception):
    """Ends the command with a one-line message and exit status 1."""


# ------------------------------------------------------------------------- arguments


def parse_memory(text: str) -> int | float:
    """``"2GiB"``, ``"512M"``, ``"1073741824"`` -> bytes; ``"0.9"`` -> a fraction (GPU only)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (e.g. 2GiB, 512MiB, 0.9)")
    number, unit = match.groups()
    if "." in number and not unit:
        return float(number)
    return int(float(number) * _MEMORY_UNITS[unit.lower()])


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


@dataclass(frozen=True)
class LoRAModulePath:
    """An adapter given with ``--lora-modules`` (vLLM's name and fields)."""

    name: str
    path: str
    base_model_name: str | None = None


def parse_lora_module(text: str) -> LoRAModulePath:
    """``name=path``, or vLLM's JSON form ``{"name": ..., "path": ..., "base_model_name": ...}``
    (``base_model_name`` optional)."""
    if not text.lstrip().startswith("{"):
        name, sep, path = text.partition("=")
        if not (sep and name and path):
            raise argparse.ArgumentTypeError(
                f"expected name=path or a JSON object with name and path, got {text!r}")
        return LoRAModulePath(name, path)
    fields = _json_object(text)
    try:
        module = LoRAModulePath(**fields)
    except TypeError as exc:
        raise argparse.ArgumentTypeError(f"invalid fields in {text}: {exc}") from None
    if not all(isinstance(v, str) and v for v in (module.name, module.path)) or not isinstance(
            module.base_model_name, str | None):
        raise argparse.ArgumentTypeError(
            f"name and path must be non-empty strings, base_model_name a string, in {text}")
    return module


def _add_lora_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LoRA adapters")
    g.add_argument(
        "--enable-lora",
        action="store_true",
        help="serve PEFT LoRA adapters over the model, each a model of /v1/models selected by "
        'its name in "model"; with KVPAGE_ALLOW_RUNTIME_LORA_UPDATING=true, '
        "/v1/load_lora_adapter and /v1/unload_lora_adapter change them at run time",
    )
    g.add_argument(
        "--lora-modules",
        nargs="+",
        type=parse_lora_module,
        default=[],
        metavar="MODULE",
        help="adapters to serve from the start (needs --enable-lora): name=path, or JSON "
        '\'{"name": "sql", "path": "/adapters/sql", "base_model_name": "base"}\'',
    )
    g.add_argument(
        "--max-loras",
        type=int,
        default=1,
        help="most adapters in one batch (default: %(default)s)",
    )
    g.add_argument(
        "--max-lora-rank",
        type=int,
        default=16,
        help="largest adapter rank served (default: %(default)s)",
    )
    g.add_argument(
        "--max-cpu-loras",
        type=int,
        default=None,
        help="adapters kept loaded in host memory (default: --max-loras)",
    )


def _lora_fields(args: argparse.Namespace) -> dict[str, Any]:
    """``EngineConfig`` fields from the LoRA options."""
    return dict(
        enable_lora=args.enable_lora,
        max_loras=args.max_loras,
        max_lora_rank=args.max_lora_rank,
        max_cpu_loras=args.max_cpu_loras,
    )


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument(
        "--dtype",
        default="auto",
        help="weights and activations dtype: auto, float32, bfloat16, float16 (default: %(default)s)",
    )
    g.add_argument(
        "--quantization",
        default=None,
        help="weight format: awq, gptq or gguf (an error if the checkpoint is another), or "
        "none to load a GGUF file dense (default: the checkpoint's; AWQ, GPTQ and GGUF "
        "Q4_0/Q4_1/Q8_0 weights stay low-bit in memory)",
    )
    g.add_argument(
        "--int8-activations",
        action="store_true",
        help="multiply 4-bit weights by activations rounded to int8 in blocks of 32 inputs, as "
        "llama.cpp does: faster for a few sequences on the CPU, results differ by that rounding "
        "(default: off, fp32 activations)",
    )
    g.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="context length served (default: the model's, capped to 8192 on the CPU)",
    )
    g.add_argument(
        "--block-size",
        type=int,
        default=16,
        help="tokens per KV-cache block (default: %(default)s)",
    )
    g.add_argument(
        "--kv-cache-memory",
        type=parse_memory,
        default=None,
        help="KV-cache size: bytes with an optional unit (2GiB, 512MiB), or on a GPU a "
        "fraction of free memory (0.9) (default: 1 GiB cap on the CPU, 0.85 on a GPU)",
    )
    g.add_argument(
        "--max-num-seqs",
        type=int,
        default=256,
        help="most requests in the running batch (default: %(default)s)",
    )
    g.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=2048,
        help="token budget of one engine step (default: %(default)s)",
    )
    g.add_argument(
        "--enable-prefix-caching",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="reuse the KV blocks of shared prompt prefixes (default: on)",
    )
    g.add_argument(
        "--enable-chunked-prefill",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="split long prompts across steps, mixed with decodes (default: on)",
    )
    g.add_argument(
        "--scheduling-policy",
        choices=["fcfs", "priority"],
        default="fcfs",
        help="order of waiting requests: arrival (fcfs), or each request's priority, lower "
        "first, then arrival (default: %(default)s)",
    )
    g.add_argument(
        "--speculative-config",
        type=_json_object,
        default=None,
        help='speculative decoding as JSON, vLLM\'s keys: \'{"method": "ngram", '
        '"num_speculative_tokens": 4}\' or \'{"method": "draft_model", "model": PATH, '
        '"num_speculative_tokens": 4}\', optionally "prompt_lookup_max", "prompt_lookup_min", '
        '"disable_by_batch_size" (default: none)',
    )
    g.add_argument(
        "--tensor-parallel-size", "-tp",
        type=int,
        default=1,
        help="split every layer over this many ranks (processes; on the CPU they share the "
        "cores) (default: %(default)s)",
    )
    g.add_argument(
        "--distributed-executor-backend",
        choices=["mp", "ray"],
        default=None,
        help="how the tensor-parallel ranks start: mp (processes on this machine) or ray "
        "(actors on the Ray cluster of RAY_ADDRESS, else a local one) (default: mp)",
    )
    g.add_argument("--seed", type=int, default=0, help="engine random seed (default: %(default)s)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    g.add_argument(
        "--tokenizer", default=None, help="tokenizer folder or name (default: the model's)"
    )
    g.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log level (default: %(default)s)",
    )


def _engine_fields(args: argparse.Namespace, model: str | None) -> dict[str, Any]:
    """``EngineConfig`` fields from the engine options."""
    return dict(
        model=model,
        dtype=args.dtype,
        quantization=args.quantization,
        int8_activations=args.int8_activations,
        max_model_len=args.max_model_len,
        block_size=args.block_size,
        kv_cache_memory=args.kv_cache_memory,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=args.enable_prefix_caching,
        enable_chunked_prefill=args.enable_chunked_prefill,
        scheduling_policy=args.scheduling_policy,
        speculative_config=args.speculative_config,
        tensor_parallel_size=args.tensor_parallel_size,
        distributed_executor_backend=args.distributed_executor_backend,
        seed=args.seed,
        device=args.device,
        tokenizer=args.tokenizer,
        served_model_name=getattr(args, "served_model_name", None),
    )


def _add_serve(sub: argparse._SubParsersAction) -> None:
    from kvpage_runtime.server.state import DEFAULT_MAX_BODY_BYTES, DEFAULT_STUCK_TIMEOUT_S

    p = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a model over an OpenAI-compatible HTTP API "
        "(/v1/completions, /v1/chat/completions, /v1/models, /tokenize, "
        "/detokenize, /health, /version, /metrics; /v1/load_lora_adapter and "
        "/v1/unload_lora_adapter with KVPAGE_ALLOW_RUNTIME_LORA_UPDATING=true).",
    )
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="GGUF file or Hugging Face model folder (default: SmolLM2-135M-Instruct GGUF)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    p.add_argument(
        "--port", type=int, default=8000, help="port to listen on (default: %(default)s)"
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("KVPAGE_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1, /tokenize and /detokenize "
        "(default: $KVPAGE_API_KEY, else no key)",
    )
    p.add_argument(
        "--served-model-name",
        default=None,
        help="model name the API answers to (default: the model's name)",
    )
    p.add_argument(
        "--max-request-body-bytes",
        type=parse_memory,
        default=DEFAULT_MAX_BODY_BYTES,
        help="larger request bodies get a 413 (default: 4MiB)",
    )
    p.add_argument(
        "--max-waiting-requests",
        type=int,
        default=DEFAULT_MAX_WAITING_REQUESTS,
        help="requests beyond this many waiting for the engine get a 503 with Retry-After "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--limit-concurrency",
        type=int,
        default=DEFAULT_LIMIT_CONCURRENCY,
        help="open connections beyond this many get a 503 from uvicorn (default: %(default)s)",
    )
    p.add_argument(
        "--health-stuck-timeout",
        type=float,
        default=DEFAULT_STUCK_TIMEOUT_S,
        help="/health answers 503 once the engine finished no step for this many seconds "
        "while requests wait (default: %(default)s)",
    )
    p.add_argument(
        "--graceful-shutdown-timeout",
        type=float,
        default=10.0,
        help="seconds in-flight requests get to finish on SIGINT/SIGTERM before they "
        "are aborted (default: %(default)s)",
    )
    _add_engine_args(p)
    _add_lora_args(p)
    p.set_defaults(run=serve)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate completions for prompts given on the command line or in a file",
        description="Generate completions offline (no server) with the LLM API.",
    )
    p.add_argument("prompts", nargs="*", help="prompts to complete")
    p.add_argument(
        "--file",
        type=Path,
        default=None,
        help='JSONL file: one prompt per line, a JSON string or {"prompt": ...}',
    )
    p.add_argument(
        "--model", default=None, help="GGUF file or model folder (default: SmolLM2-135M-Instruct)"
    )
    p.add_argument(
        "--chat",
        action="store_true",
        help="send each prompt as a user message through the chat template",
    )
    p.add_argument(
        "--max-tokens",
        type=int,
        default=64,
        help="tokens to generate per prompt (default: %(default)s)",
    )
    p.add_argument(
        "--temperature", type=float, default=0.0, help="0 is greedy (default: %(default)s)"
    )
    p.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling mass (default: %(default)s)"
    )
    p.add_argument("--top-k", type=int, default=0, help="0 is off (default: %(default)s)")
    p.add_argument(
        "--json", action="store_true", help="print one JSON object per prompt instead of text"
    )
    _add_engine_args(p)
    p.set_defaults(run=generate)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="run a benchmark script from the source checkout's bench/ folder",
        description="Run one of bench/*.py; arguments after the name go to the script "
        "(e.g. kvpage bench serving --help).",
    )
    p.add_argument("name", choices=sorted(BENCH_SCRIPTS), help="which benchmark")
    p.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the script")
    p.set_defaults(run=bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kvpage", description="kvpage: PagedAttention LLM inference."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{serve,generate,bench}")
    _add_serve(sub)
    _add_generate(sub)
    _add_bench(sub)
    return parser


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


# ------------------------------------------------------------------------- serve


def bind_socket(host: str, port: int) -> socket.socket:
    """Binds the listening socket before the model loads, so a busy port fails at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        reason = "address already in use" if exc.errno == 98 else exc.strerror or str(exc)
        raise CLIError(f"cannot listen on {host}:{port}: {reason}") from None
    return sock


def _load_async_engine(args: argparse.Namespace) -> Any:
    from kvpage_runtime import AsyncLLM, EngineConfig

    try:
        return AsyncLLM(
            EngineConfig(**_engine_fields(args, args.model), **_lora_fields(args)),
            max_waiting_requests=args.max_waiting_requests,
        )
    except Exception as exc:  # any failure to load ends with one line, not a traceback
        logger.debug("engine start failed", exc_info=True)
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CLIError(f"cannot load model {args.model or '(default)'}: {first_line}") from None


async def _load_lora_modules(state: Any, modules: list[LoRAModulePath]) -> None:
    """Registers the ``--lora-modules`` adapters, lora_int_id 1, 2, ... in order; one that
    cannot be served ends the command."""
    from kvpage_runtime.errors import InvalidRequestError
    from kvpage_runtime.server.errors import APIError

    for module in modules:
        try:
            await state.load_lora(module.name, module.path, module.base_model_name)
        except (APIError, InvalidRequestError) as exc:
            raise CLIError(f"cannot load LoRA adapter {module.name!r} from {module.path}: "
                           f"{exc}") from None
        logger.info("LoRA adapter %s from %s", module.name, module.path)


def _log_startup(engine: Any, args: argparse.Namespace) -> None:
    stats = engine.stats()
    logger.info(
        "model %s (served as %s), max_model_len %d",
        args.model or "SmolLM2-135M-Instruct (default)",
        args.served_model_name or engine.model_name,
        engine.max_model_len,
    )
    logger.info(
        "KV cache: %d blocks x %d tokens = %d tokens",
        stats.num_total_blocks,
        args.block_size,
        stats.num_total_blocks * args.block_size,
    )
    logger.info(
        "listening on http://%s:%d%s",
        args.host,
        args.port,
        " (API key required)" if args.api_key else "",
    )
    if not args.api_key and not _is_loopback(args.host):
        logger.warning(
            "listening on %s without an API key: anyone who can reach this address can use "
            "the server (set --api-key or KVPAGE_API_KEY)",
            args.host,
        )


def _is_loopback(host: str) -> bool:
    return host in _LOOPBACK_HOSTS or host.startswith("127.")


# After the grace period, aborted streams get this long to send their last events.
_ABORT_DRAIN_S = 5.0


def _uvicorn_server(config: Any, grace_s: float, abort_all: Callable[[], Awaitable[None]]) -> Any:
    """A uvicorn server that shuts down gracefully on SIGINT/SIGTERM and then exits with status 0.

    In-flight requests get ``grace_s`` seconds to finish; then the engine aborts them, so their
    streams end with finish_reason "abort" and ``[DONE]`` rather than a cut connection. (Plain
    uvicorn re-raises the signal once it has shut down, which ends the process with a signal
    status.) A second SIGINT forces the exit.
    """
    import uvicorn

    config.timeout_graceful_shutdown = grace_s + _ABORT_DRAIN_S

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            previous = {
                sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)
            }
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            aborter = asyncio.create_task(_abort_after(grace_s, abort_all))
            try:
                await super().shutdown(sockets)
            finally:
                aborter.cancel()

    return Server(config)


async def _abort_after(delay_s: float, abort_all: Callable[[], Awaitable[None]]) -> None:
    await asyncio.sleep(delay_s)
    logger.info("grace period over: aborting the requests still running")
    await abort_all()


async def _stop_when_engine_dies(engine: Any, server: Any) -> None:
    """A dead engine ends the server (exit status 1), so that a supervisor restarts it instead
    of it answering 503 forever."""
    error = await engine.wait_stopped()
    if error is not None:
        logger.error("the engine died (%r): shutting the server down", error)
        server.should_exit = True


def _freeze_startup_heap() -> None:
    """Moves what exists once the server is up (the model, tokenizer, app: all of it lives as
    long as the server) out of the cyclic garbage collector's passes, as vLLM's server does;
    otherwise each full pass walks it while requests are served (4% of a loaded server's CPU
    time, measured on AMD Zen 3)."""
    gc.collect()
    gc.freeze()


async def _serve_async(args: argparse.Namespace, sock: socket.socket) -> int:
    import uvicorn

    from kvpage_runtime.server import ServerSettings, build_app

    engine = _load_async_engine(args)
    _log_startup(engine, args)
    settings = ServerSettings(
        api_key=args.api_key,
        max_body_bytes=args.max_request_body_bytes,
        served_model_names=[args.served_model_name] if args.served_model_name else [],
        stuck_timeout_s=args.health_stuck_timeout,
    )
    app = build_app(engine, settings)
    try:
        await _load_lora_modules(app.state.server, args.lora_modules)
    except CLIError:
        await engine.shutdown()
        raise
    _freeze_startup_heap()
    config = uvicorn.Config(
        app, log_level=args.log_level, limit_concurrency=args.limit_concurrency
    )
    server = _uvicorn_server(config, args.graceful_shutdown_timeout, app.state.server.abort_all)
    watcher = asyncio.create_task(_stop_when_engine_dies(engine, server))
    try:
        await server.serve(sockets=[sock])
    finally:
        watcher.cancel()
    return 1 if engine.errored else 0


def serve(args: argparse.Namespace) -> int:
    if args.lora_modules and not args.enable_lora:
        raise CLIError("--lora-modules needs --enable-lora")
    sock = bind_socket(args.host, args.port)
    try:
        return asyncio.run(_serve_async(args, sock))
    finally:
        sock.close()


# ------------------------------------------------------------------------- generate


def _read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompts)
    if args.file is not None:
        try:
            lines = args.file.read_text().splitlines()
        except OSError as exc:
            raise CLIError(f"cannot read {args.file}: {exc.strerror}") from None
        for number, line in enumerate(lines, 1):
            if line.strip():
                prompts.append(_prompt_from_line(line, args.file, number))
    if not prompts:
        raise CLIError("no prompts: give them as arguments or with --file")
    return prompts


def _prompt_from_line(line: str, path: Path, number: int) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        raise CLIError(f"{path}:{number}: not valid JSON") from None
    prompt = record.get("prompt") if isinstance(record, dict) else record
    if not isinstance(prompt, str):
        raise CLIError(f'{path}:{number}: expected a JSON string or {{"prompt": "..."}}')
    return prompt


def generate(args: argparse.Namespace) -> int:
    from kvpage_runtime import LLM, SamplingParams

    prompts = _read_prompts(args)
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    try:
        llm = LLM(**_engine_fields(args, args.model))
    except Exception as exc:
        raise CLIError(f"cannot load model {args.model or '(default)'}: {exc}") from None
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    else:
        outputs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outputs, strict=True):
        completion = out.outputs[0]
        if args.json:
            print(
                json.dumps(
                    {
                        "prompt": prompt,
                        "text": completion.text,
                        "tokens": len(completion.token_ids),
                        "finish_reason": completion.finish_reason,
                    }
                )
            )
        else:
            print(f"{prompt}{completion.text}" if not args.chat else completion.text)
            print("-" * 40)
    return 0


# ------------------------------------------------------------------------- bench


def bench_dir() -> Path | None:
    """``$KVPAGE_BENCH_DIR``, the checkout this file lives in, or ./bench; None if none exists."""
    candidates = [
        os.environ.get("KVPAGE_BENCH_DIR"),
        Path(__file__).resolve().parents[4] / "bench",
        Path.cwd() / "bench",
    ]
    for candidate in candidates:
        if candidate and (Path(candidate) / "serving.py").is_file():
            return Path(candidate)
    return None


def bench(args: argparse.Namespace) -> int:
    folder = bench_dir()
    if folder is None:
        raise CLIError(
            "the benchmarks live in the source repository's bench/ folder, which an installed "
            "package does not include: run from a checkout or set KVPAGE_BENCH_DIR"
        )
    script = folder / BENCH_SCRIPTS[args.name]
    if not script.is_file():
        raise CLIError(f"{script} does not exist in this checkout")
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [str(script), *args.args]
    sys.path.insert(0, str(folder))  # as `python bench/<script>.py` would have it
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    return 0


# ------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if hasattr(args, "log_level"):
        _setup_logging(args.log_level)
    try:
        return args.run(args)
    except CLIError as exc:
        print(f"kvpage {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
