"""The engine driven from inside ``torch.inference_mode()`` (as a caller may wrap
``LLM.generate``): the same greedy output as outside it."""

from __future__ import annotations

import pytest
import torch
from engine_fixtures import make_tiny_model_dir
from kvpage_runtime import LLM, SamplingParams

PROMPTS = [[5, 6, 7, 8, 9], [100, 200, 300], list(range(40, 80))]  # prefill chunks and decodes


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    folder, _ = make_tiny_model_dir(tmp_path_factory.mktemp("tiny-inference-mode"))
    return LLM(str(folder), dtype="float32", device="cpu", max_model_len=256)


def _tokens(llm):
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    return [
        o.outputs[0].token_ids
        for o in llm.generate(prompt_token_ids=PROMPTS, sampling_params=params, use_tqdm=False)
    ]


def test_generate_builds_no_autograd_graph(llm):
    seen = []
    handle = llm.engine.runner.model.register_forward_hook(
        lambda module, args, out: seen.append((torch.is_grad_enabled(), out.requires_grad))
    )
    try:
        _tokens(llm)
    finally:
        handle.remove()
    assert seen and not any(grad or requires for grad, requires in seen)


def test_generate_inside_inference_mode(llm):
    expected = _tokens(llm)
    with torch.inference_mode():
        assert _tokens(llm) == expected
