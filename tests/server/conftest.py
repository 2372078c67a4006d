"""One live server for the whole folder: `kvpage serve` on the default model, on 127.0.0.1."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator

import pytest

from .live_server import (
    API_KEY,
    MAX_MODEL_LEN,
    MAX_NUM_SEQS,
    LiveServer,
    cli,
    free_port,
    wait_healthy,
)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The server runs for the whole session; at the end SIGINT must shut it down cleanly."""
    port = free_port()
    log_path = str(tmp_path_factory.mktemp("server") / "server.log")
    command = cli(
        "serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--api-key",
        API_KEY,
        "--max-model-len",
        str(MAX_MODEL_LEN),
        "--max-num-seqs",
        str(MAX_NUM_SEQS),
        "--kv-cache-memory",
        "64MiB",
        "--log-level",
        "info",
    )
    env = {**os.environ, "KVPAGE_API_KEY": ""}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, log_path)
        yield LiveServer(url, proc, log_path)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                pytest.fail("server did not stop within 60 s of SIGINT")
    assert proc.returncode == 0, f"server exited with {proc.returncode} after SIGINT"
