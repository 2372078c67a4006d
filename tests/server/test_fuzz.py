"""Random, mostly wrong request bodies: the answer is always a 200 or an OpenAI-shaped 4xx."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 60000), st.floats(allow_nan=True), st.text(max_size=8)
)
_VALUES = st.one_of(
    _SCALARS,
    st.lists(_SCALARS, max_size=3),
    st.dictionaries(st.text(max_size=3), _SCALARS, max_size=2),
)
_FIELDS = (
    "model",
    "n",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "min_tokens",
    "ignore_eos",
    "stop_token_ids",
    "skip_special_tokens",
    "logprobs",
    "echo",
    "top_logprobs",
    "max_completion_tokens",
    "best_of",
)
_PROMPTS = st.one_of(
    _VALUES, st.just("Hello"), st.lists(st.integers(0, 100), min_size=1, max_size=4)
)
_MESSAGES = st.one_of(
    _VALUES,
    st.lists(
        st.fixed_dictionaries({"role": st.sampled_from(["user", "x"]), "content": _VALUES}),
        max_size=2,
    ),
)


@st.composite
def bodies(draw):
    body = draw(st.dictionaries(st.sampled_from(_FIELDS), _VALUES, max_size=4))
    body["max_tokens"] = draw(st.sampled_from([1, 2, 0, -1, "2", None]))
    if draw(st.booleans()):
        return "/v1/completions", {**body, "prompt": draw(_PROMPTS)}
    return "/v1/chat/completions", {**body, "messages": draw(_MESSAGES)}


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(case=bodies())
@example(case=("/v1/chat/completions", {"max_tokens": 1, "messages": float("inf")}))
@example(case=("/v1/completions", {"max_tokens": 1, "prompt": "Hi", "temperature": float("nan")}))
def test_random_bodies_never_give_a_server_error(server, case):
    path, body = case
    # json.dumps writes NaN/Infinity as bare tokens (not JSON): the server must answer 400.
    content = json.dumps(body).encode()
    with server.http() as http:
        r = http.post(path, content=content, headers={"Content-Type": "application/json"})
    assert r.status_code in (200, 400, 404), (r.status_code, r.text, body)
    if r.status_code != 200:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
