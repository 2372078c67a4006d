"""Token embedding and LM head: a vocabulary's table, looked up or multiplied by (an untied LM
head is a table of its own, a tied one multiplies by the embedding's).

The embedding table [vocab_size, hidden_size] is the weight of a linear layer from the hidden
size to the vocabulary, held by a ``LinearMethod``: dense, or low-bit where a GGUF file
quantized it (looked up with ``kvpage_kernels.embedding_rows``). A tied LM head multiplies by
the table as that method stores it, so a quantized table is stored once.

Under tensor parallelism each rank holds an equal part of the vocabulary's rows (the last
part shorter): a lookup gives zeros for the ids of other parts and the ranks' rows are summed,
and the logits of every part are gathered on the driver.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kvpage_runtime.distributed.parallel import TensorParallel
from kvpage_runtime.layers.linear import Linear, LinearMethod, Parallel, UnquantizedLinearMethod


class VocabEmbedding(Linear):
    """``forward(ids)`` looks rows of the table up; ``logits(hidden)`` multiplies by it
    (``serves_lm_head``: the table is, or is also, the LM head)."""

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        dtype: torch.dtype,
        device=None,
        method: LinearMethod | None = None,
        tp: TensorParallel | None = None,
        serves_lm_head: bool = False,
    ) -> None:
        self.tp = tp or TensorParallel()
        self.vocab_size = vocab_size
        self.vocab_start, rows, self.padded_rows = self.tp.padded_split(vocab_size)
        super().__init__(hidden_size, [rows], dtype=dtype, device=device, method=method,
                         parallel=Parallel.column(self.tp, [(self.vocab_start, vocab_size)]))
        self.serves_lm_head = serves_lm_head  # also set by TiedLMHead

    def pack_weights(self) -> None:
        """A dense table is looked up as it is, and packed for the GEMM only when it is also
        the LM head; a low-bit one is always packed (its lookups read the packed form)."""
        if self.serves_lm_head or not isinstance(self.method, UnquantizedLinearMethod):
            super().pack_weights()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return self.method.embedding(self, ids)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.output_size)
        rows = self.method.embedding(self, local.masked_fill(outside, 0))
        return self.tp.all_reduce(rows.masked_fill(outside.unsqueeze(-1), 0))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits [n, vocab_size] (on the driver; None on the other ranks)."""
        logits = self.method.apply(self, hidden, None)
        if self.tp.size == 1:
            return logits
        padded = F.pad(logits, (0, self.padded_rows - self.output_size))
        gathered = self.tp.gather_to_driver(padded)
        return None if gathered is None else gathered[:, : self.vocab_size]


class TiedLMHead(nn.Module):
    """The LM head of a model whose output projection is its embedding table: logits in the
    model dtype, with no weights of its own (the table is not registered here, so it is
    loaded and saved once)."""

    def __init__(self, embedding: VocabEmbedding) -> None:
        super().__init__()
        embedding.serves_lm_head = True
        self.__dict__["embedding"] = embedding  # a plain reference, not a submodule

    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return self.embedding.logits(hidden)
