"""Building blocks shared by every model: attention over the paged KV cache, RoPE, norms, linears."""
