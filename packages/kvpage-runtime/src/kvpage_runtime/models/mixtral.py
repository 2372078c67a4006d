"""Mixtral: the Llama architecture with a sparse mixture-of-experts feed-forward block in every
layer (``config.num_experts``), whose checkpoint names its experts' projections w1/w2/w3."""

from __future__ import annotations

import re

from kvpage_runtime.models.llama import LlamaForCausalLM

# checkpoint expert projection -> the name of the same projection in a GatedMLP
_EXPERT_PROJECTIONS = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
_EXPERT = re.compile(r"\.experts\.(\d+)\.(w[123])\.")


class MixtralForCausalLM(LlamaForCausalLM):
    @classmethod
    def model_name(cls, checkpoint_name: str) -> str:
        """``...block_sparse_moe.experts.3.w1.weight`` -> ``...mlp.experts.3.gate_proj.weight``
        (each expert is a GatedMLP; w1 is its gate, w3 its up and w2 its down projection)."""
        name = checkpoint_name.replace(".block_sparse_moe.", ".mlp.")
        return _EXPERT.sub(
            lambda m: f".experts.{m[1]}.{_EXPERT_PROJECTIONS[m[2]]}.", name)
