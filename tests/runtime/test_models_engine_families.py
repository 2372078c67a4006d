"""Each newer family through the whole engine against transformers, and the models mixing
sliding-window and full-attention layers (Gemma 2, Gemma 3, Qwen2 below
``max_window_layers``): prefix caching on, the prompts (longer than the windows, two sharing
a 32-token prefix) chunked by 24 tokens and a KV cache small enough that requests are
preempted and recomputed."""

from __future__ import annotations

import pytest
import transformers
from model_helpers import Sequence, compare_greedy, hf_reference, save_tiny_model, word_tokenizer
from test_models_families import CONFIGS, ODD
from test_tensor_parallel import NEW_TOKENS, engine_options, generate, prompts

FAMILIES = {
    **CONFIGS,
    "qwen2-windows": transformers.Qwen2Config(**ODD, use_sliding_window=True, sliding_window=12,
                                              max_window_layers=1),
}


def as_sequence(prompt: list[int], output) -> Sequence:
    """An engine output as the greedy comparison takes it."""
    completion = output.outputs[0]
    steps = list(zip(completion.token_ids, completion.logprobs, strict=True))
    return Sequence(tokens=prompt + list(completion.token_ids), blocks=[],
                    logprobs=[top[token].logprob for token, top in steps],
                    top5=[list(top) for _, top in steps])


@pytest.mark.parametrize("name", FAMILIES)
def test_engine_matches_transformers(name, tmp_path, record_property):
    config = FAMILIES[name]
    folder = save_tiny_model(config, tmp_path, random_norms=True)
    word_tokenizer().save_pretrained(folder)
    rows = prompts()
    outputs, preemptions, hits = generate(folder, engine_options(config, 1), rows)
    assert preemptions > 0 and hits > 0
    ours = [as_sequence(row, output) for row, output in zip(rows, outputs, strict=True)]
    record_property("near_ties", compare_greedy(ours, hf_reference(folder, rows, NEW_TOKENS),
                                                rows))
