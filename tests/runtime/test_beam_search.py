"""Beam search gives transformers' hypotheses, in its order and with its scores
(``generate(num_beams=W, num_return_sequences=W, do_sample=False, early_stopping=True)``), on
tiny models of each family; also under preemption; an aborted search leaves no block held."""

from __future__ import annotations

import pytest
import torch
import transformers
from engine_fixtures import default_tokenizer
from kvpage_runtime import LLM, BeamSearchParams
from model_helpers import TINY, random_prompts, save_tiny_model

MAX_TOKENS = 10
CONFIGS = {
    "llama": transformers.LlamaConfig(**TINY),
    "qwen2": transformers.Qwen2Config(**TINY),
    "mistral": transformers.MistralConfig(**TINY, sliding_window=8),
    "mixtral": transformers.MixtralConfig(**TINY, num_local_experts=4, num_experts_per_tok=2),
}


def _make(family: str, folder) -> tuple[str, transformers.PreTrainedModel, int]:
    """A tiny model whose EOS is likely enough to end some hypotheses, with the default
    model's tokenizer saved beside it."""
    tokenizer = default_tokenizer()
    config = CONFIGS[family]
    config.eos_token_id = tokenizer.eos_token_id
    save_tiny_model(config, folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    head = model.get_output_embeddings().weight.data
    head[tokenizer.eos_token_id] = 2.0 * head[7]  # EOS competes with token 7
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return str(folder), model.eval(), tokenizer.eos_token_id


def _transformers_beams(model, prompt: list[int], width: int, length_penalty: float):
    """transformers' hypotheses (generated tokens) and scores, best first."""
    if width == 1:  # transformers runs greedy search: one beam is the argmax path
        return _transformers_greedy(model, prompt, length_penalty)
    out = model.generate(torch.tensor([prompt]), num_beams=width, num_return_sequences=width,
                         do_sample=False, early_stopping=True, length_penalty=length_penalty,
                         max_new_tokens=MAX_TOKENS, output_scores=True,
                         return_dict_in_generate=True)
    lengths = (out.beam_indices >= 0).sum(dim=1).tolist()  # generated tokens of each
    sequences = [out.sequences[i, len(prompt):len(prompt) + n].tolist()
                 for i, n in enumerate(lengths)]
    return sequences, out.sequences_scores.tolist()


def _transformers_greedy(model, prompt: list[int], length_penalty: float):
    out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=MAX_TOKENS,
                         output_scores=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    cum = sum(float(torch.log_softmax(step[0].float(), -1)[t])
              for step, t in zip(out.scores, tokens, strict=True))
    return [tokens], [cum / len(tokens) ** length_penalty]


def _assert_same_search(ours, prompt, theirs, width, eos):
    sequences, scores = theirs
    assert len(ours.sequences) == width
    for seq, tokens, score in zip(ours.sequences, sequences, scores, strict=True):
        assert seq.tokens == prompt + tokens
        assert abs(seq.score - score) < 1e-4, (seq.score, score)
        assert seq.finish_reason == ("stop" if tokens[-1] == eos else "length")
    return [seq.finish_reason for seq in ours.sequences]


@pytest.fixture(scope="module", params=list(CONFIGS))
def family(request, tmp_path_factory):
    """(kvpage's LLM, transformers' model, EOS id) for one tiny model of each family."""
    folder, model, eos = _make(request.param, tmp_path_factory.mktemp(f"beam-{request.param}"))
    return LLM(folder, dtype="float32", device="cpu", max_model_len=128, block_size=4), model, eos


@pytest.mark.parametrize("width,penalty", [(1, 1.0), (2, 1.0), (4, 1.0), (8, 1.0), (4, 0.6)])
def test_beam_search_equals_transformers(family, width, penalty):
    llm, model, eos = family
    prompts = random_prompts([5, 12], 640, seed=width)
    outs = llm.beam_search(prompts, BeamSearchParams(width, MAX_TOKENS, length_penalty=penalty))
    reasons = []
    for out, prompt in zip(outs, prompts, strict=True):
        reasons += _assert_same_search(
            out, prompt, _transformers_beams(model, prompt, width, penalty), width, eos)
    assert llm.engine.cache.num_free_blocks == llm.engine.cache.num_blocks
    if width > 2:
        assert "stop" in reasons  # EOS ended some hypotheses


def test_preemption_gives_the_same_search(tmp_path):
    """A KV cache too small for every beam at once: beams are preempted and recomputed, and
    the search comes out the same."""
    folder, model, eos = _make("llama", tmp_path)
    prompts = random_prompts([20, 17], 640, seed=3)
    head_dim = TINY["hidden_size"] // TINY["num_attention_heads"]
    bytes_per_token = 2 * TINY["num_hidden_layers"] * TINY["num_key_value_heads"] * head_dim * 4
    llm = LLM(folder, dtype="float32", device="cpu", max_model_len=64, block_size=4,
              kv_cache_memory=18 * 4 * bytes_per_token)  # 18 blocks of 4 tokens
    outs = llm.beam_search(prompts, BeamSearchParams(4, MAX_TOKENS))
    assert llm.engine.num_preemptions > 0
    for out, prompt in zip(outs, prompts, strict=True):
        _assert_same_search(out, prompt, _transformers_beams(model, prompt, 4, 1.0), 4, eos)


def test_an_aborted_search_frees_every_block(tmp_path):
    folder, _, _ = _make("llama", tmp_path)
    llm = LLM(folder, dtype="float32", device="cpu", max_model_len=64, block_size=4)
    engine = llm.engine
    engine.add_request("b", random_prompts([9], 640)[0], BeamSearchParams(4, 30))
    for _ in range(5):
        engine.step()
    assert engine.cache.num_free_blocks < engine.cache.num_blocks
    out = engine.abort_request("b")
    assert out.finished and not engine.has_unfinished_requests()
    assert engine.cache.num_free_blocks == engine.cache.num_blocks


def test_beams_share_their_prefix_blocks(tmp_path):
    """Width 4 over a 40-token prompt: the prompt's blocks are held once, not four times."""
    folder, _, _ = _make("llama", tmp_path)
    llm = LLM(folder, dtype="float32", device="cpu", max_model_len=128, block_size=4)
    engine = llm.engine
    engine.add_request("b", random_prompts([40], 640)[0], BeamSearchParams(4, 20))
    for _ in range(4):
        engine.step()
    held = engine.cache.num_blocks - engine.cache.num_free_blocks
    assert held < 2 * 40 // 4  # four private copies would hold 4 x 10 blocks and more
    engine.abort_request("b")


@pytest.mark.slow
def test_the_default_model_searches_as_transformers_does():
    from engine_fixtures import default_hf_model

    llm = LLM(dtype="float32")
    model = default_hf_model()
    chats = [[{"role": "user", "content": text}] for text in
             ("Name a fruit.", "What is the capital of Italy?", "Say hello in French.")]
    prompts = [llm.apply_chat_template(chat) for chat in chats]
    outs = llm.beam_search(prompts, BeamSearchParams(4, MAX_TOKENS))
    for out, prompt in zip(outs, prompts, strict=True):
        _assert_same_search(out, prompt, _transformers_beams(model, prompt, 4, 1.0), 4,
                            llm.get_tokenizer().eos_token_id)
