"""/v1/chat/completions through the official openai client."""

from __future__ import annotations

import pytest

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
]


def test_chat_completion(server):
    r = server.client().chat.completions.create(
        model=None, messages=MESSAGES, max_tokens=8, temperature=0
    )
    choice = r.choices[0]
    assert (
        r.object == "chat.completion"
        and choice.message.role == "assistant"
        and choice.message.content
    )
    assert choice.finish_reason in ("stop", "length")
    with server.http() as http:
        prompt = http.post("/tokenize", json={"messages": MESSAGES}).json()
    assert r.usage.prompt_tokens == prompt["count"]
    assert 0 < r.usage.completion_tokens <= 8


def test_chat_stream_matches_non_stream(server):
    client = server.client()
    kwargs = dict(model=None, messages=MESSAGES, max_completion_tokens=10, temperature=0)
    full = client.chat.completions.create(**kwargs)
    chunks = list(
        client.chat.completions.create(
            **kwargs, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_chat_n_and_logprobs(server):
    r = server.client().chat.completions.create(
        model=None,
        messages=MESSAGES,
        max_tokens=4,
        temperature=1.0,
        seed=7,
        n=3,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert r.usage.completion_tokens == 12
    for choice in r.choices:
        content = choice.logprobs.content
        assert len(content) == 4
        for entry in content:
            assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
            assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
            assert bytes(entry.bytes).decode(errors="replace") is not None


def test_max_completion_tokens_wins(server):
    r = server.client().chat.completions.create(
        model=None,
        messages=MESSAGES,
        max_tokens=12,
        max_completion_tokens=3,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_chat_stop_string(server, stream):
    client = server.client()
    base = (
        client.chat.completions.create(
            model=None,
            messages=MESSAGES,
            max_tokens=12,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        .choices[0]
        .message.content
    )
    stop = base[2:4]
    r = client.chat.completions.create(
        model=None,
        messages=MESSAGES,
        max_tokens=12,
        temperature=0,
        stop=stop,
        stream=stream,
        extra_body={"ignore_eos": True},
    )
    if stream:
        chunks = [c for c in r if c.choices]
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        reason = chunks[-1].choices[0].finish_reason
    else:
        text, reason = r.choices[0].message.content, r.choices[0].finish_reason
    assert reason == "stop" and text == base[: base.index(stop)]
