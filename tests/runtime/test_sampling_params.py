"""SamplingParams validation: clear errors naming the field and the allowed range."""

import pytest
from kvpage_runtime.errors import InvalidRequestError
from kvpage_runtime.sampling import SamplingParams


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"n": 0}, "n"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"logprobs": 21}, "logprobs"),
        ({"prompt_logprobs": -1}, "prompt_logprobs"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"logit_bias": {3: 200.0}}, "logit_bias"),
        ({"seed": 2**64}, "seed"),
        ({"seed": 2**63 - 1, "n": 2}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
    ],
)
def test_invalid_params_name_the_field(kwargs, field):
    with pytest.raises(InvalidRequestError, match=field):
        SamplingParams(**kwargs)


def test_invalid_request_error_is_a_value_error():
    with pytest.raises(ValueError):
        SamplingParams(top_p=2.0)


def test_normalization():
    p = SamplingParams(stop="###", temperature=0.0, logit_bias={"5": 1})
    assert p.stop_strings == ("###",)
    assert p.is_greedy
    assert p.logit_bias == {5: 1.0}
    assert SamplingParams(top_k=-1).top_k == -1


def test_vocab_bound_checked():
    with pytest.raises(InvalidRequestError, match="stop_token_ids"):
        SamplingParams(stop_token_ids=[10]).validate_vocab(10)
