"""/tokenize, /detokenize, /health, /version, /metrics, and the API key."""

from __future__ import annotations

import httpx
import openai
import pytest


def test_tokenize_round_trip(server):
    with server.http() as http:
        tok = http.post("/tokenize", json={"prompt": "Hello, world!"}).json()
        assert tok["count"] == len(tok["tokens"]) > 0 and tok["max_model_len"] == 512
        assert http.post("/detokenize", json={"tokens": tok["tokens"]}).json() == {
            "prompt": "Hello, world!"
        }


def test_health_and_version_are_open(server):
    assert httpx.get(f"{server.url}/health").status_code == 200
    version = httpx.get(f"{server.url}/version").json()["version"]
    assert version.count(".") >= 1


def test_metrics_names(server):
    server.client().completions.create(model=None, prompt="Hi", max_tokens=2)
    metrics = server.metrics()
    for name in (
        "kvpage:num_requests_running",
        "kvpage:num_requests_waiting",
        "kvpage:kv_cache_usage_perc",
        "kvpage:prefix_cache_hit_rate",
        "kvpage:prompt_tokens_total",
        "kvpage:generation_tokens_total",
        "kvpage:time_to_first_token_seconds_count",
        "kvpage:inter_token_latency_seconds_count",
        "kvpage:e2e_request_latency_seconds_count",
        "kvpage:kv_blocks_held",
        "kvpage:num_preemptions_total",
        "kvpage:prefix_cache_queries_total",
        "kvpage:prefix_cache_hits_total",
        "kvpage:engine_step_failures_total",
        "kvpage:spec_decode_num_draft_tokens_total",
        "kvpage:spec_decode_num_accepted_tokens_total",
    ):
        assert name in metrics, name
    assert metrics["kvpage:prefix_cache_queries_total"] >= metrics["kvpage:prefix_cache_hits_total"]
    assert (
        metrics["kvpage:prompt_tokens_total"] > 0 and metrics["kvpage:generation_tokens_total"] >= 2
    )


@pytest.mark.parametrize(
    "path,method",
    [
        ("/v1/models", "GET"),
        ("/v1/completions", "POST"),
        ("/v1/chat/completions", "POST"),
        ("/tokenize", "POST"),
        ("/detokenize", "POST"),
        ("/metrics", "GET"),
        ("/docs", "GET"),
        ("/redoc", "GET"),
        ("/openapi.json", "GET"),
        ("/no-such-route", "GET"),
    ],
)
@pytest.mark.parametrize("header", [None, "Bearer wrong-key", "test-key", "Basic test-key"])
def test_api_key_required(server, path, method, header):
    headers = {"Authorization": header} if header else {}
    r = httpx.request(method, f"{server.url}{path}", headers=headers, json={"prompt": "x"})
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error"


def test_the_key_is_checked_before_the_body_is_read(server):
    """A request without the key is refused at once, even though its body never arrives."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(server.url)
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000\r\n\r\n{"
        )
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]


def test_openai_client_with_a_wrong_key_gets_401(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()
