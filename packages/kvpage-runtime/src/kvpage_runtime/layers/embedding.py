"""Token embedding, and the LM head of models that multiply by the embedding table (an untied
LM head is a plain ``Linear``).

The embedding table [vocab_size, hidden_size] is the weight of a linear layer from the hidden
size to the vocabulary, held by a ``LinearMethod``: dense, or low-bit where a GGUF file
quantized it (looked up with ``kvpage_kernels.embedding_rows``). A tied LM head multiplies by
the table as that method stores it, so a quantized table is stored once.
"""

from __future__ import annotations

import torch
from torch import nn

from kvpage_runtime.layers.linear import Linear, LinearMethod, UnquantizedLinearMethod


class VocabEmbedding(Linear):
    """``forward(ids)`` looks rows of the table up; ``logits(hidden)`` multiplies by it."""

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        dtype: torch.dtype,
        device=None,
        method: LinearMethod | None = None,
    ) -> None:
        super().__init__(hidden_size, [vocab_size], dtype=dtype, device=device, method=method)
        self.serves_lm_head = False  # set by TiedLMHead

    def pack_weights(self) -> None:
        """A dense table is looked up as it is, and packed for the GEMM only when it is also
        the LM head; a low-bit one is always packed (its lookups read the packed form)."""
        if self.serves_lm_head or not isinstance(self.method, UnquantizedLinearMethod):
            super().pack_weights()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.method.embedding(self, ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, hidden, None)


class TiedLMHead(nn.Module):
    """The LM head of a model whose output projection is its embedding table: logits in the
    model dtype, with no weights of its own (the table is not registered here, so it is
    loaded and saved once)."""

    def __init__(self, embedding: VocabEmbedding) -> None:
        super().__init__()
        embedding.serves_lm_head = True
        self.__dict__["embedding"] = embedding  # a plain reference, not a submodule

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.embedding.logits(hidden)
