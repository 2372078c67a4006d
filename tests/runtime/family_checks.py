"""The check every model family runs: kvpage's greedy decoding against transformers'."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from kvpage_runtime.loaders import load_model
from model_helpers import (
    PagedGreedyDriver,
    compare_greedy,
    hf_reference,
    random_prompts,
    save_tiny_model,
)

PROMPT_LENGTHS = [5, 17, 33, 9, 2]
NEW_TOKENS = 16
# (block_size, prefill_chunks, stagger): batched prefill, chunked prefill, prefill next to decode
SCHEDULES = [(16, 1, False), (8, 2, False), (8, 1, True)]


class FamilyCase:
    """A tiny random model of one family, its prompts and transformers' greedy continuations."""

    def __init__(self, config: transformers.PretrainedConfig, folder: Path,
                 prompt_lengths: list[int] = PROMPT_LENGTHS, new_tokens: int = NEW_TOKENS
                 ) -> None:
        save_tiny_model(config, folder, random_norms=True)
        self.folder = folder
        self.new_tokens = new_tokens
        self.prompts = random_prompts(prompt_lengths, config.get_text_config().vocab_size)
        self.references = hf_reference(folder, self.prompts, new_tokens)
        self.loaded = load_model(str(folder), dtype=torch.float32)

    def check(self, block_size: int, prefill_chunks: int, stagger: bool) -> int:
        driver = PagedGreedyDriver(self.loaded, block_size=block_size)
        seqs = driver.generate(
            self.prompts, self.new_tokens, prefill_chunks=prefill_chunks, stagger=stagger
        )
        return compare_greedy(seqs, self.references, self.prompts)


def family_fixture(config: transformers.PretrainedConfig, **case_options):
    """A module-scoped fixture building the ``FamilyCase`` for ``config`` (and
    ``case_options``: prompt_lengths, new_tokens) once."""

    @pytest.fixture(scope="module")
    def case(tmp_path_factory: pytest.TempPathFactory) -> FamilyCase:
        return FamilyCase(config, tmp_path_factory.mktemp(config.model_type), **case_options)

    return case
