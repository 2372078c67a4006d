"""Bad input gets a 4xx in OpenAI's error shape, never a 500, and the server lives on."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from .live_server import MAX_MODEL_LEN

OK_CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

# (path, body, status, param or None when the error names none)
CASES = [
    ("/v1/completions", {"prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
    ("/v1/completions", {"max_tokens": 2}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "model": "no-such-model"}, 404, "model"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2], []]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, 2, 10**9]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "n": 17}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "n": 0}, 400, "n"),
    ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "top_k": -5}, 400, "top_k"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "min_tokens": 50, "max_tokens": 4}, 400, "min_tokens"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": 9}, 400, "presence_penalty"),
    ("/v1/completions", {"prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 500}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [10**9]}, 400, "stop_token_ids"),
    ("/v1/completions", {"prompt": "hi", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"prompt": "hi", "suffix": "x"}, 400, "suffix"),
    ("/v1/completions", {"prompt": "hi", "stream": True, "temperature": -1}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "wizard", "content": "x"}]},
        400,
        "messages.0.role",
    ),
    ("/v1/chat/completions", {"messages": "hello"}, 400, "messages"),
    ("/v1/chat/completions", {**OK_CHAT, "model": "gpt-4"}, 404, "model"),
    ("/v1/chat/completions", {**OK_CHAT, "n": 100}, 400, "n"),
    ("/v1/chat/completions", {**OK_CHAT, "top_logprobs": 2}, 400, "top_logprobs"),
    (
        "/v1/chat/completions",
        {**OK_CHAT, "logprobs": True, "top_logprobs": 50},
        400,
        "top_logprobs",
    ),
    ("/v1/chat/completions", {**OK_CHAT, "stream": True, "max_tokens": -3}, 400, "max_tokens"),
    ("/tokenize", {}, 400, "prompt"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    # out of range or not finite
    ("/v1/completions", {"prompt": "hi", "seed": 2**64}, 400, "seed"),
    ("/v1/completions", {"prompt": "hi", "seed": -(2**63) - 1}, 400, "seed"),
    ("/v1/completions", {"prompt": "hi", "temperature": float("inf")}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": float("nan")}, 400, "top_p"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": float("-inf")}}, 400, "logit_bias.5"),
    ("/v1/completions", {"prompt": "hi", "priority": 2**70}, 400, "priority"),
    ("/v1/completions", {"prompt": "hi", "priority": 1}, 400, "priority"),  # fcfs here
    # invalid Unicode (lone surrogates) anywhere
    ("/v1/completions", {"prompt": "hi \ud800 there"}, 400, "prompt"),
    ("/v1/completions", {"prompt": ["ok", "bad \udfff"]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "stop": ["\ud83d"]}, 400, "stop"),
    ("/tokenize", {"prompt": "\udc80"}, 400, "prompt"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x\ud800"}]},
        400,
        "messages.0.content",
    ),
    # a message without the content its role needs
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages.0"),
    ("/v1/chat/completions", {"messages": [{"role": "system", "content": None}]}, 400, "messages.0"),
    # known fields this server does not implement: refused, not ignored
    ("/v1/chat/completions", {**OK_CHAT, "response_format": {"type": "json_object"}}, 400,
     "response_format"),
    ("/v1/chat/completions", {**OK_CHAT, "tools": [{"type": "function"}]}, 400, "tools"),
    ("/v1/chat/completions", {**OK_CHAT, "tool_choice": "required"}, 400, "tool_choice"),
    ("/v1/chat/completions", {**OK_CHAT, "functions": [{"name": "f"}]}, 400, "functions"),
    ("/v1/chat/completions", {**OK_CHAT, "reasoning_effort": "high"}, 400, "reasoning_effort"),
    ("/v1/chat/completions", {**OK_CHAT, "store": True}, 400, "store"),
    ("/v1/chat/completions", {**OK_CHAT, "guided_json": {"type": "object"}}, 400, "guided_json"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}]},
        400,
        "messages.0.tool_calls",
    ),
    ("/v1/completions", {"prompt": "hi", "guided_regex": "[a-z]+"}, 400, "guided_regex"),
    # caps on what one request may ask for
    ("/v1/completions", {"prompt": "hi", "stop": [f"s{i}" for i in range(17)]}, 400, "stop"),
    ("/v1/completions", {"prompt": "hi", "stop": ["x" * 513]}, 400, "stop"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": list(range(65))}, 400, "stop_token_ids"),
    (
        "/v1/completions",
        {"prompt": "hi", "logit_bias": {str(i): 1 for i in range(301)}},
        400,
        "logit_bias",
    ),
    ("/v1/completions", {"prompt": ["a", "b", "c"], "n": 16}, 400, "prompt"),
    ("/v1/chat/completions", {**OK_CHAT, "max_tokens": 10_000_000}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10_000_000}, 400, "max_tokens"),
]


def _assert_openai_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.mark.parametrize("path,body,status,param", CASES, ids=[f"{c[0]}:{c[3]}" for c in CASES])
def test_bad_request(server, path, body, status, param):
    # json.dumps keeps what a JSON encoder can write but a strict client would refuse to send:
    # NaN/Infinity as bare tokens, lone surrogates as \\u escapes
    content = json.dumps(body).encode()
    with server.http() as http:
        r = http.post(path, content=content, headers={"Content-Type": "application/json"})
        error = _assert_openai_error(r, status)
    assert error["param"] == param


@pytest.mark.parametrize(
    "path,body",
    [
        ("/v1/completions", {"prompt": "hello there", "max_tokens": 10_000_000}),
        ("/v1/chat/completions", {**OK_CHAT, "max_tokens": 10_000_000}),
        ("/v1/chat/completions", {**OK_CHAT, "max_completion_tokens": 600}),
    ],
)
def test_max_tokens_past_the_context_names_the_numbers(server, path, body):
    """vLLM's message: the context, the total asked for, and the prompt and completion parts."""
    with server.http() as http:
        error = _assert_openai_error(http.post(path, json=body), 400)
    asked = body.get("max_completion_tokens", body["max_tokens"])
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in error["message"]
    match = re.search(r"requested (\d+) tokens \((\d+) in the \w+, (\d+) in the completion\)",
                      error["message"])
    assert match, error["message"]
    total, prompt, completion = map(int, match.groups())
    assert completion == asked and total == prompt + completion and prompt > 0


def test_omitted_max_tokens_fits_the_context(server):
    """Chat without max_tokens may use the rest of the context; a long prompt still fits."""
    prompt = "word " * (MAX_MODEL_LEN - 60)
    with server.http() as http:
        r = http.post("/v1/completions", json={"prompt": prompt, "temperature": 0})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] <= 16


def test_unknown_fields_are_ignored(server):
    with server.http() as http:
        r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1, "frobnicate": 3,
                                               "user": "u1", "metadata": {"a": "b"}})
    assert r.status_code == 200, r.text


def test_deeply_nested_json_is_a_400(server):
    deep = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with server.http() as http:
        r = http.post("/v1/completions", content=deep,
                      headers={"Content-Type": "application/json"})
    _assert_openai_error(r, 400)


def test_chunked_body_over_the_limit_is_413(server):
    def chunks():
        for _ in range(5):
            yield b'{"prompt": "' + b"x" * (1 << 20)
        yield b'"}'

    with server.http() as http:
        r = http.post("/v1/completions", content=chunks(),
                      headers={"Content-Type": "application/json"})
    assert _assert_openai_error(r, 413)["code"] == "request_too_large"


def test_prompt_longer_than_max_model_len(server):
    with server.http() as http:
        for path, body in [
            ("/v1/completions", {"prompt": "hello " * 700, "max_tokens": 2}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hello " * 700}]}),
            ("/v1/completions", {"prompt": "hello " * 700, "stream": True}),
        ]:
            error = _assert_openai_error(http.post(path, json=body), 400)
            numbers = [int(n) for n in re.findall(r"\d+", error["message"])]
            assert MAX_MODEL_LEN in numbers and max(numbers) > MAX_MODEL_LEN, error


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"", b'{"prompt": "a",}', b"\xff\xfe"])
def test_malformed_body(server, raw):
    with server.http() as http:
        r = http.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
    _assert_openai_error(r, 400)


def test_body_over_the_limit_is_413(server):
    with server.http() as http:
        r = http.post("/v1/completions", json={"prompt": "x" * (5 << 20)})
    assert _assert_openai_error(r, 413)["code"] == "request_too_large"


def test_unknown_route_and_method(server):
    with server.http() as http:
        assert _assert_openai_error(http.get("/v1/nothing"), 404)
        assert _assert_openai_error(http.get("/v1/completions"), 405)


def test_server_still_serves_after_bad_input(server):
    """After every bad input above: healthy, serving, and no KV block held once idle."""
    from .test_concurrency import _wait_idle

    r = server.client().completions.create(model=None, prompt="Hi", max_tokens=2)
    assert r.choices[0].text is not None
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert _wait_idle(server)["kvpage:kv_blocks_held"] == 0
