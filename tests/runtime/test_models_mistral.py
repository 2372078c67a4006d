"""Mistral (GQA, sliding window smaller than prompt + generation) vs transformers."""

import pytest
import transformers
from family_checks import NEW_TOKENS, PROMPT_LENGTHS, SCHEDULES, family_fixture
from model_helpers import TINY, one_torch_thread  # noqa: F401 (fixture)

WINDOW = 12
assert max(PROMPT_LENGTHS) > WINDOW and WINDOW < NEW_TOKENS

mistral = family_fixture(transformers.MistralConfig(**TINY, sliding_window=WINDOW))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_mistral_sliding_window_matches_transformers(mistral, schedule, record_property):
    assert mistral.loaded.config.sliding_window == WINDOW
    record_property("near_ties", mistral.check(*schedule))


def test_engine_frees_blocks_outside_the_window_and_matches_transformers(mistral, tmp_path):
    """Through the engine (chunked prefill, 4-token blocks): every request holds at most the
    window's blocks plus two at its edges once its prompt is in, the freed blocks go back to the
    pool, and the tokens and logprobs still match transformers."""
    from engine_fixtures import default_tokenizer
    from kvpage_cache import NULL_BLOCK
    from kvpage_runtime import LLM, SamplingParams
    from model_helpers import Sequence, compare_greedy

    default_tokenizer().save_pretrained(mistral.folder)
    llm = LLM(str(mistral.folder), dtype="float32", device="cpu", block_size=4,
              max_num_batched_tokens=8, max_model_len=128)
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=5)
    for i, prompt in enumerate(mistral.prompts):
        engine.add_request(str(i), prompt, params)
    finals, most_held = {}, 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finals[int(out.request_id)] = out
        for request in engine.scheduler.running:
            if request.num_computed_tokens >= request.num_prompt_tokens:
                table = engine.cache.block_table(request.request_id)
                most_held = max(most_held, sum(b != NULL_BLOCK for b in table))
    assert most_held <= WINDOW // 4 + 2
    assert engine.cache.num_free_blocks == engine.cache.num_blocks
    ours = []
    for i, prompt in enumerate(mistral.prompts):
        out = finals[i].outputs[0]
        chosen = [pos[tok].logprob for pos, tok in zip(out.logprobs, out.token_ids, strict=True)]
        top5 = [sorted(pos, key=lambda t: -pos[t].logprob)[:5] for pos in out.logprobs]
        ours.append(Sequence(prompt + out.token_ids, [], logprobs=chosen, top5=top5))
    compare_greedy(ours, mistral.references, mistral.prompts)
