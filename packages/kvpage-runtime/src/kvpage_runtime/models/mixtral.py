"""Mixtral: the Llama architecture with a sparse mixture-of-experts feed-forward block."""

from __future__ import annotations

import re

from torch import nn

from kvpage_runtime.config import ModelConfig
from kvpage_runtime.distributed.parallel import TensorParallel
from kvpage_runtime.layers.moe import SparseMoE
from kvpage_runtime.layers.quantization import LinearMethods
from kvpage_runtime.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel

# checkpoint expert projection -> the name of the same projection in a GatedMLP
_EXPERT_PROJECTIONS = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}
_EXPERT = re.compile(r"\.experts\.(\d+)\.(w[123])\.")


class MixtralDecoderLayer(LlamaDecoderLayer):
    def build_mlp(
        self, config: ModelConfig, device, methods: LinearMethods, prefix: str,
        tp: TensorParallel,
    ) -> nn.Module:
        return SparseMoE(
            config.hidden_size,
            config.intermediate_size,
            config.num_experts,
            config.num_experts_per_tok,
            config.dtype,
            device,
            methods,
            prefix,
            tp,
        )


class MixtralModel(LlamaModel):
    layer_class = MixtralDecoderLayer


class MixtralForCausalLM(LlamaForCausalLM):
    model_class = MixtralModel

    @classmethod
    def model_name(cls, checkpoint_name: str) -> str:
        """``...block_sparse_moe.experts.3.w1.weight`` -> ``...mlp.experts.3.gate_proj.weight``
        (each expert is a GatedMLP; w1 is its gate, w3 its up and w2 its down projection)."""
        name = checkpoint_name.replace(".block_sparse_moe.", ".mlp.")
        return _EXPERT.sub(
            lambda m: f".experts.{m[1]}.{_EXPERT_PROJECTIONS[m[2]]}.", name)
