"""``kvpage serve --tensor-parallel-size 2``: it serves, and its workers end with it."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import httpx
from test_tensor_parallel import FAMILIES, ends, tiny_folder

from .live_server import cli, free_port, wait_healthy


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def test_server_serves_with_two_ranks_and_stops_them_on_sigterm(tmp_path):
    config, _ = FAMILIES["llama-tp2"]
    folder = tiny_folder(config, tmp_path / "llama")
    port, log_path = free_port(), tmp_path / "server.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(cli("serve", str(folder), "--port", str(port), "--dtype",
                                      "float32", "--tensor-parallel-size", "2"),
                                  stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(server, url, str(log_path))
        workers = children(server.pid)
        assert len(workers) == 1
        body = {"prompt": "t5 t6 t7", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
        reply = httpx.post(f"{url}/v1/completions", json=body, timeout=60).json()
        assert reply["usage"]["completion_tokens"] == 8
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0
    finally:
        if server.poll() is None:
            server.kill()
    assert all(ends(pid, within_s=60) for pid in workers)
    assert "Traceback" not in log_path.read_text()
