"""ModelRunner: the flat batch it builds, and the logits it hands back."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from kvpage_runtime.config import ModelConfig
from kvpage_runtime.model_runner import ModelRunner

CONFIG = ModelConfig(
    architecture="LlamaForCausalLM",
    vocab_size=32,
    hidden_size=8,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    head_dim=4,
    intermediate_size=16,
)


class _Logits(torch.Tensor):
    """fp32 logits that fail the test if anything converts them again."""

    def float(self, *args, **kwargs):
        raise AssertionError("the model's logits are already fp32: no conversion expected")


class _FakeModel(torch.nn.Module):
    def bind_kv_caches(self, kv_caches):
        self.kv_caches = kv_caches

    def forward(self, batch, kv_caches):
        return torch.arange(batch.num_tokens * 8, dtype=torch.float32).view(-1, 8)

    def compute_logits(self, hidden):
        self.hidden = hidden
        return torch.randn(hidden.shape[0], CONFIG.vocab_size).as_subclass(_Logits)


def _scheduled(tokens, start, num_tokens, block_ids):
    return SimpleNamespace(
        request=SimpleNamespace(all_token_ids=tokens),
        start=start,
        num_tokens=num_tokens,
        block_ids=block_ids,
    )


def test_prepare_and_execute_pass_the_models_logits_through():
    model = _FakeModel()
    runner = ModelRunner(
        model,
        CONFIG,
        num_blocks=8,
        block_size=4,
        device=torch.device("cpu"),
        kv_dtype=torch.float32,
    )
    batch = runner.prepare(
        [
            _scheduled(list(range(10, 16)), 0, 6, [3, 5]),
            _scheduled(list(range(20, 30)), 9, 1, [1, 2, 7]),
        ]
    )
    assert batch.input_ids.tolist() == [10, 11, 12, 13, 14, 15, 29]
    assert batch.positions.tolist() == [0, 1, 2, 3, 4, 5, 9]
    assert batch.slot_mapping.tolist() == [12, 13, 14, 15, 20, 21, 29]
    assert batch.query_start_loc.tolist() == [0, 6, 7] and batch.seq_lens.tolist() == [6, 10]
    assert (batch.max_seq_len, batch.max_query_len) == (10, 6)
    logits = runner.execute(batch, [5, 6])
    assert type(logits) is _Logits and logits.dtype == torch.float32
    assert logits.shape == (2, CONFIG.vocab_size)
    assert model.hidden[:, 0].tolist() == [40.0, 48.0]
    empty = runner.execute(batch, [])
    assert empty.shape == (0, CONFIG.vocab_size) and empty.dtype == torch.float32
