"""/v1/completions through the official openai client."""

from __future__ import annotations

import pytest

PROMPT = "The capital of France is"


def _tokens(server, text: str) -> list[int]:
    with server.http() as http:
        return http.post("/tokenize", json={"prompt": text}).json()["tokens"]


def test_models_lists_the_served_model(server):
    models = server.client().models.list().data
    assert len(models) == 1 and models[0].id


def test_completion_usage_matches_the_tokenizer(server):
    r = server.client().completions.create(
        model=None, prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    choice = r.choices[0]
    assert r.object == "text_completion" and choice.finish_reason == "length"
    assert r.usage.prompt_tokens == len(_tokens(server, PROMPT))
    assert r.usage.completion_tokens == 8
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8
    assert (
        choice.text
        == server.client()
        .completions.create(
            model=None, prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
    )


def test_streaming_gives_the_same_text_and_usage_last(server):
    client = server.client()
    full = client.completions.create(
        model=None, prompt=PROMPT, max_tokens=10, temperature=0, extra_body={"ignore_eos": True}
    )
    chunks = list(
        client.completions.create(
            model=None,
            prompt=PROMPT,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])


def test_prompt_forms_and_n(server):
    client = server.client()
    ids = _tokens(server, PROMPT)
    r = client.completions.create(
        model=None, prompt=[PROMPT, "Once upon a time"], n=2, max_tokens=4, temperature=1.0, seed=1
    )
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage.prompt_tokens == len(ids) + len(_tokens(server, "Once upon a time"))
    assert 4 <= r.usage.completion_tokens <= 16
    by_ids = client.completions.create(model=None, prompt=ids, max_tokens=6, temperature=0)
    by_text = client.completions.create(model=None, prompt=PROMPT, max_tokens=6, temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text
    two = client.completions.create(model=None, prompt=[ids, ids], max_tokens=6, temperature=0)
    assert [c.text for c in two.choices] == [by_text.choices[0].text] * 2


def test_stop_string_ends_the_text(server):
    client = server.client()
    base = (
        client.completions.create(
            model=None, prompt=PROMPT, max_tokens=16, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
    )
    stop = base.strip().split()[1] if len(base.split()) > 2 else base[3:6]
    r = client.completions.create(
        model=None,
        prompt=PROMPT,
        max_tokens=16,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == base[: base.index(stop)]


def test_logprobs_in_completions_format(server):
    r = server.client().completions.create(
        model=None,
        prompt=PROMPT,
        max_tokens=5,
        temperature=0,
        logprobs=3,
        extra_body={"ignore_eos": True},
    )
    lp = r.choices[0].logprobs
    assert (
        len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    )
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert logprob <= 0 and 3 <= len(top) <= 4
        assert max(top.values()) == pytest.approx(logprob, abs=1e-4)  # greedy picks the likeliest
        assert top[token] == pytest.approx(logprob, abs=1e-4)


def test_echo_with_logprobs(server):
    r = server.client().completions.create(
        model=None, prompt=PROMPT, max_tokens=3, temperature=0, echo=True, logprobs=1
    )
    choice = r.choices[0]
    assert choice.text.startswith(PROMPT)
    n_prompt = len(_tokens(server, PROMPT))
    assert len(choice.logprobs.tokens) == n_prompt + r.usage.completion_tokens
    assert choice.logprobs.token_logprobs[0] is None
    assert all(v is not None for v in choice.logprobs.token_logprobs[1:])


def test_seed_makes_sampling_reproducible(server):
    client = server.client()

    def sample(seed):
        return (
            client.completions.create(
                model=None,
                prompt="My favourite colour is",
                max_tokens=12,
                temperature=1.0,
                seed=seed,
                extra_body={"ignore_eos": True},
            )
            .choices[0]
            .text
        )

    first = sample(1234)
    assert sample(1234) == first
    assert any(sample(s) != first for s in (1, 2, 3))


def test_vllm_sampling_extras_are_accepted(server):
    r = server.client().completions.create(
        model=None,
        prompt=PROMPT,
        max_tokens=6,
        temperature=0.7,
        seed=3,
        extra_body={
            "top_k": 20,
            "min_p": 0.05,
            "repetition_penalty": 1.1,
            "min_tokens": 6,
            "stop_token_ids": [0],
            "skip_special_tokens": True,
        },
    )
    assert r.usage.completion_tokens == 6


def test_streaming_n_with_logprobs(server):
    chunks = list(
        server.client().completions.create(
            model=None,
            prompt=PROMPT,
            n=2,
            max_tokens=6,
            temperature=1.0,
            seed=5,
            logprobs=1,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices[0].index == index]
        text = "".join(c.text for c in mine)
        tokens = [t for c in mine if c.logprobs for t in c.logprobs.tokens]
        offsets = [o for c in mine if c.logprobs for o in c.logprobs.text_offset]
        assert mine[-1].finish_reason == "length" and len(tokens) == 6
        assert "".join(tokens) == text and offsets == sorted(offsets) and offsets[0] == 0


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_beam_search_returns_n_hypotheses_best_first(server, path):
    body = {"max_tokens": 8, "n": 3, "use_beam_search": True}
    if path.endswith("completions") and "chat" not in path:
        body["prompt"] = "The three primary colors are"
    else:
        body["messages"] = [{"role": "user", "content": "Name a color."}]
    with server.http() as http:
        r = http.post(path, json=body)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    texts = [c["text"] if "text" in c else c["message"]["content"] for c in choices]
    assert len(set(texts)) == 3  # three different hypotheses
    assert all(c["finish_reason"] in ("stop", "length") for c in choices)


@pytest.mark.parametrize("extra,param", [({"stream": True}, "stream"), ({"top_p": 0.5}, "top_p"),
                                         ({"logprobs": 2}, "logprobs"), ({"stop": ["x"]}, "stop")])
def test_beam_search_refuses_what_it_cannot_honour(server, extra, param):
    body = {"prompt": "Hi", "max_tokens": 4, "n": 2, "use_beam_search": True, **extra}
    with server.http() as http:
        r = http.post("/v1/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
