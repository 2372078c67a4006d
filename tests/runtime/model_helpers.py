"""What the model tests share: tiny random models, a paged greedy driver, a HF reference.

The driver gives each sequence a contiguous run of KV blocks and feeds the model one varlen
``ForwardBatch`` per step, so the tests exercise batched prefill, chunked prefill and decode
through the real kernels without depending on the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import transformers
from kvpage_runtime.forward_batch import ForwardBatch
from kvpage_runtime.loaders import LoadedModel

TINY = dict(
    vocab_size=640,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    # larger than the default 0.02 so that logits are peaked and greedy near-ties rare
    initializer_range=0.15,
)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Run a test module's torch ops on one thread (import this fixture to use it).

    These tests run small matmuls, where a thread pool's hand-offs cost more than they save,
    and on a machine whose cores are busy with other work each hand-off can cost milliseconds.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def word_tokenizer(vocab_size: int = TINY["vocab_size"],
                   eos: int = 2) -> transformers.PreTrainedTokenizerFast:
    """A tokenizer with nothing to download: token ``i`` is the word ``t<i>``, EOS ``t<eos>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab_size)}, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=words, unk_token="t0", bos_token="t1", eos_token=f"t{eos}")


def save_tiny_model(config: transformers.PretrainedConfig, folder: Path, seed: int = 0,
                    random_norms: bool = False) -> Path:
    """Random-weight model for ``config`` saved as safetensors in ``folder``. transformers
    starts norm weights at ones (zeros where the norm scales by 1 + weight, Gemma's):
    ``random_norms`` adds noise to them, so that a norm's weight counts in the output."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if random_norms:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.add_(torch.randn_like(param) * 0.2)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def random_prompts(lengths: list[int], vocab_size: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (n,), generator=gen).tolist() for n in lengths]


@dataclass
class Sequence:
    tokens: list[int]
    blocks: list[int]
    num_computed: int = 0
    logprobs: list[float] = field(default_factory=list)
    top5: list[list[int]] = field(default_factory=list)


class PagedGreedyDriver:
    """Greedy decoding of several sequences at once over a paged KV cache."""

    def __init__(
        self, loaded: LoadedModel, block_size: int = 16, max_len: int = 256, max_seqs: int = 16
    ):
        cfg = loaded.config
        self.model = loaded.model
        self.block_size = block_size
        self.blocks_per_seq = -(-max_len // block_size)
        shape = (self.blocks_per_seq * max_seqs, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=cfg.dtype), torch.zeros(shape, dtype=cfg.dtype))
            for _ in range(cfg.num_layers)
        ]

    def new_sequences(self, prompts: list[list[int]]) -> list[Sequence]:
        # Sequence i owns blocks in reverse order, so block ids are not just positions.
        n = self.blocks_per_seq
        return [
            Sequence(list(p), list(range((i + 1) * n - 1, i * n - 1, -1)))
            for i, p in enumerate(prompts)
        ]

    def build_batch(self, work: list[tuple[Sequence, int]]) -> ForwardBatch:
        """Batch computing ``count`` more tokens of each ``(sequence, count)``."""
        ids, positions, slots, q_lens, seq_lens = [], [], [], [0], []
        for seq, count in work:
            start = seq.num_computed
            for pos in range(start, start + count):
                ids.append(seq.tokens[pos])
                positions.append(pos)
                slots.append(
                    seq.blocks[pos // self.block_size] * self.block_size + pos % self.block_size
                )
            q_lens.append(q_lens[-1] + count)
            seq_lens.append(start + count)
        tables = torch.tensor([seq.blocks for seq, _ in work], dtype=torch.int32)
        return ForwardBatch(
            input_ids=torch.tensor(ids, dtype=torch.int64),
            positions=torch.tensor(positions, dtype=torch.int64),
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            block_tables=tables,
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
            query_start_loc=torch.tensor(q_lens, dtype=torch.int32),
            max_seq_len=max(seq_lens),
            max_query_len=max(b - a for a, b in zip(q_lens, q_lens[1:], strict=False)),
        )

    def step(self, work: list[tuple[Sequence, int]]) -> None:
        """Run one forward pass; sequences whose known tokens are all computed get a greedy token."""
        batch = self.build_batch(work)
        hidden = self.model(batch, self.kv_caches)
        ends = batch.query_start_loc[1:].long() - 1
        logprobs = torch.log_softmax(self.model.compute_logits(hidden[ends]), dim=-1)
        for (seq, count), row in zip(work, logprobs, strict=True):
            seq.num_computed += count
            if seq.num_computed < len(seq.tokens):
                continue  # a prefill chunk: nothing to sample
            top = row.topk(5)
            seq.tokens.append(int(top.indices[0]))
            seq.logprobs.append(float(top.values[0]))
            seq.top5.append(top.indices.tolist())

    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        prefill_chunks: int = 1,
        stagger: bool = False,
    ) -> list[Sequence]:
        """Greedy-decode ``max_new_tokens`` tokens for every prompt.

        All prompts are prefilled together in one varlen call, or split over ``prefill_chunks``
        calls; with ``stagger`` the first prompt is prefilled alone first and then decodes in
        the same calls that prefill the others. Decoding then runs in lockstep.
        """
        seqs = self.new_sequences(prompts)
        waiting = list(range(len(seqs)))
        if stagger:
            self.step([(seqs[0], len(seqs[0].tokens))])
            waiting = waiting[1:]
        for chunk in range(prefill_chunks):
            work = [
                (s, 1)
                for i, s in enumerate(seqs)
                if i not in waiting and _generated(s) < max_new_tokens
            ]
            for i in waiting:
                end = len(seqs[i].tokens) * (chunk + 1) // prefill_chunks
                work.append((seqs[i], end - seqs[i].num_computed))
            self.step(work)
        while unfinished := [s for s in seqs if _generated(s) < max_new_tokens]:
            self.step([(s, 1) for s in unfinished])
        return seqs


def _generated(seq: Sequence) -> int:
    return len(seq.logprobs)


@dataclass
class Reference:
    tokens: list[int]
    logprobs: list[float]
    top2_gap: list[float]
    top5: list[list[int]]


@torch.inference_mode()
def hf_greedy(
    model: transformers.PreTrainedModel, prompt: list[int], max_new_tokens: int
) -> Reference:
    """Greedy continuation by transformers, recomputing the full sequence each step (no KV cache)."""
    tokens = list(prompt)
    ref = Reference([], [], [], [])
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([tokens])).logits[0, -1].float()
        top = torch.log_softmax(logits, dim=-1).topk(5)
        token = int(top.indices[0])
        tokens.append(token)
        ref.tokens.append(token)
        ref.logprobs.append(float(top.values[0]))
        ref.top2_gap.append(float(top.values[0] - top.values[1]))
        ref.top5.append(top.indices.tolist())
    return ref


def compare_greedy(
    ours: list[Sequence], refs: list[Reference], prompts: list[list[int]], atol: float = 1e-4
) -> int:
    """Assert that kvpage matches the reference; returns how many sequences diverged at a near-tie.

    Tokens must be identical and the chosen tokens' logprobs within ``atol``. The only allowed
    divergence is at a genuine near-tie (the reference's two best logprobs within ``atol``),
    and then each side's token must be in the other's top 5; the comparison stops there.
    """
    near_ties = 0
    for i, (seq, ref) in enumerate(zip(ours, refs, strict=True)):
        generated = seq.tokens[len(prompts[i]) :]
        assert len(generated) == len(ref.tokens)
        for step, (a, b) in enumerate(zip(generated, ref.tokens, strict=True)):
            if a != b:
                assert ref.top2_gap[step] < atol, (
                    f"sequence {i} step {step}: kvpage chose {a}, transformers {b} "
                    f"(gap {ref.top2_gap[step]:.2e} is no near-tie)"
                )
                assert a in ref.top5[step] and b in seq.top5[step]
                near_ties += 1
                break
            assert abs(seq.logprobs[step] - ref.logprobs[step]) < atol, (
                f"sequence {i} step {step}: logprob {seq.logprobs[step]} vs {ref.logprobs[step]}"
            )
    return near_ties


def hf_reference(folder: Path, prompts: list[list[int]], max_new_tokens: int) -> list[Reference]:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return [hf_greedy(model, p, max_new_tokens) for p in prompts]
