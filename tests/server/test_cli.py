"""The kvpage command line: help, and clear one-line failures before any model loads."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx

from .live_server import cli, free_port, wait_healthy


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cli(*args), capture_output=True, text=True, timeout=timeout)


def test_help_lists_every_serve_option_with_defaults():
    r = _run("serve", "--help")
    assert r.returncode == 0
    for option in (
        "--host",
        "--port",
        "--api-key",
        "--served-model-name",
        "--max-model-len",
        "--block-size",
        "--kv-cache-memory",
        "--max-num-seqs",
        "--max-num-batched-tokens",
        "--enable-prefix-caching",
        "--no-enable-prefix-caching",
        "--enable-chunked-prefill",
        "--dtype",
        "--seed",
        "--log-level",
        "--max-request-body-bytes",
    ):
        assert option in r.stdout, option
    assert "127.0.0.1" in r.stdout and "default" in r.stdout
    top = _run("--help")
    assert top.returncode == 0 and all(c in top.stdout for c in ("serve", "generate", "bench"))


def test_port_in_use_fails_fast_with_one_line():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        started = time.monotonic()
        r = _run("serve", "--port", str(port))
    assert r.returncode != 0
    assert "already in use" in r.stderr and str(port) in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert time.monotonic() - started < 30  # refused before loading the model


def test_unloadable_model_fails_with_one_line(tmp_path):
    bogus = tmp_path / "broken.gguf"
    bogus.write_bytes(b"not a gguf file")
    r = _run("serve", str(bogus), "--port", str(free_port()), "--log-level", "warning")
    assert r.returncode != 0
    lines = [line for line in r.stderr.strip().splitlines() if line]
    assert lines and "cannot load model" in lines[-1] and "Traceback" not in r.stderr, r.stderr


def test_bench_names_its_scripts():
    r = _run("bench", "--help")
    assert r.returncode == 0 and "serving" in r.stdout


def test_sigterm_with_streams_in_flight_shuts_down_cleanly(tmp_path):
    """In-flight streams get the grace period, then are aborted together: each ends with
    finish_reason "abort" and [DONE]; the process exits 0."""
    port = free_port()
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cli(
                "serve",
                "--port",
                str(port),
                "--max-model-len",
                "256",
                "--kv-cache-memory",
                "16MiB",
                "--graceful-shutdown-timeout",
                "1",
                "--log-level",
                "info",
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, str(log_path))
        body = {"prompt": "Count to one hundred:", "max_tokens": 200, "ignore_eos": True,
                "stream": True}
        with contextlib.ExitStack() as stack:
            client = stack.enter_context(httpx.Client(base_url=url, timeout=60))
            streams = [stack.enter_context(client.stream("POST", "/v1/completions", json=body))
                       for _ in range(3)]
            lines = [r.iter_lines() for r in streams]
            for it in lines:  # every stream has begun
                assert next(line for line in it if line.startswith("data: "))
            proc.send_signal(signal.SIGTERM)
            events = [[line[6:] for line in it if line.startswith("data: ")] for it in lines]
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    for stream in events:
        assert stream[-1] == "[DONE]", stream[-3:]
        assert json.loads(stream[-2])["choices"][0]["finish_reason"] == "abort", stream[-3:]
    assert "Traceback" not in log_path.read_text()


def test_api_key_comes_from_the_environment(monkeypatch):
    from kvpage_runtime.cli import build_parser

    monkeypatch.setenv("KVPAGE_API_KEY", "from-env")
    assert build_parser().parse_args(["serve"]).api_key == "from-env"
    assert build_parser().parse_args(["serve", "--api-key", "flag"]).api_key == "flag"
    monkeypatch.delenv("KVPAGE_API_KEY")
    args = build_parser().parse_args(["serve"])
    assert args.api_key is None and args.host == "127.0.0.1"


def _python(code: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | env
    command = [sys.executable, "-c", code, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, env=environ)


def test_import_and_help_do_not_load_torch():
    r = _python(
        """
import sys
import kvpage_runtime, kvpage_runtime.cli
assert "torch" not in sys.modules, "import"
for argv in (["--help"], ["serve", "--help"], ["generate", "--help"], ["bench", "--help"]):
    try:
        kvpage_runtime.cli.main(argv)
    except SystemExit as exit:
        assert exit.code == 0, argv
    assert "torch" not in sys.modules, argv
assert set(kvpage_runtime.__all__) <= set(dir(kvpage_runtime))
from kvpage_runtime import LLM, AsyncLLM, EngineDeadError, KVPageError, SamplingParams
assert issubclass(EngineDeadError, KVPageError) and "torch" in sys.modules
try:
    from kvpage_runtime import NoSuchName
except ImportError:
    pass
else:
    raise AssertionError("NoSuchName imported")
"""
    )
    assert r.returncode == 0, r.stderr


_SERVE_SPY = """
import json, os, sys
import kvpage_runtime.cli as cli

def spy(args):
    print(json.dumps([os.environ.get("OMP_WAIT_POLICY"), "torch" in sys.modules, args.port]))
    return 0

cli.serve = spy
sys.exit(cli.main(["serve", "--port", sys.argv[1]]))
"""


def test_serve_starts_in_process_before_torch_loads():
    """serve neither restarts itself nor loads torch before its own start-up, so thread
    settings in the environment (OMP_NUM_THREADS, OMP_WAIT_POLICY, ...) reach torch as given."""
    with socket.socket() as busy:  # had serve restarted itself, it would fail on this port
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        unset = _python(_SERVE_SPY, str(port))
        kept = _python(_SERVE_SPY, str(port), OMP_WAIT_POLICY="PASSIVE")
    assert unset.returncode == 0, unset.stderr
    assert json.loads(unset.stdout) == [None, False, port]
    assert kept.returncode == 0, kept.stderr
    assert json.loads(kept.stdout) == ["PASSIVE", False, port]


def test_memory_sizes():
    from kvpage_runtime.cli import parse_memory

    assert parse_memory("2GiB") == 2 << 30 and parse_memory("512M") == 512 << 20
    assert parse_memory("1000") == 1000 and parse_memory("0.9") == 0.9


def test_generate_from_arguments_and_a_file(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "The capital of France is"}\n"Once upon a time"\n')
    r = _run(
        "generate",
        "Hello",
        "--file",
        str(prompts),
        "--max-tokens",
        "4",
        "--max-model-len",
        "128",
        "--kv-cache-memory",
        "8MiB",
        "--json",
        "--log-level",
        "warning",
    )
    assert r.returncode == 0, r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert [rec["prompt"] for rec in records] == [
        "Hello",
        "The capital of France is",
        "Once upon a time",
    ]
    assert all(0 < rec["tokens"] <= 4 and rec["text"] for rec in records)
    bad = _run("generate", "--file", str(tmp_path / "missing.jsonl"))
    assert bad.returncode == 1 and "cannot read" in bad.stderr
