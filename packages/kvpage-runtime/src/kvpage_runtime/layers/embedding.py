"""Token embedding and the LM head (which may share the embedding's weight)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvpage_runtime.layers.linear import UnquantizedLinearMethod

_DENSE = UnquantizedLinearMethod()


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype, device=None) -> None:
        super().__init__()
        weight = torch.empty(vocab_size, hidden_size, dtype=dtype, device=device)
        self.weight = nn.Parameter(weight, requires_grad=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


class LMHead(nn.Module):
    """Projects final hidden states to vocabulary logits, in the model dtype (the sampler
    converts to fp32 where it computes anything but an argmax). A dense linear layer whose
    weight may be the embedding's, applied (and packed) as ``UnquantizedLinearMethod`` does."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype, device=None) -> None:
        super().__init__()
        weight = torch.empty(vocab_size, hidden_size, dtype=dtype, device=device)
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.packed = None

    def tie_to(self, embedding: VocabEmbedding) -> None:
        self.weight = embedding.weight

    def pack_weights(self) -> None:
        _DENSE.process_weights_after_loading(self)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return _DENSE.apply(self, hidden, None)
