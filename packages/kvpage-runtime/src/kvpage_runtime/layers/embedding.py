"""Token embedding and the LM head (which may share the embedding's weight)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvpage_runtime.layers.packed_gemm import pack_linear_weight


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype, device=None) -> None:
        super().__init__()
        weight = torch.empty(vocab_size, hidden_size, dtype=dtype, device=device)
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class LMHead(nn.Module):
    """Projects final hidden states to vocabulary logits, in the model dtype (the sampler
    converts to fp32 where it computes anything but an argmax)."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype, device=None) -> None:
        super().__init__()
        weight = torch.empty(vocab_size, hidden_size, dtype=dtype, device=device)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.packed = None

    def tie_to(self, embedding: VocabEmbedding) -> None:
        self.weight = embedding.weight

    def pack_weights(self) -> None:
        self.packed = pack_linear_weight(self.weight)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return self.packed(hidden, None)
        return F.linear(hidden, self.weight)
