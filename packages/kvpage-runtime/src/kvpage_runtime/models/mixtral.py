"""Mixtral: the Llama architecture with a sparse mixture-of-experts feed-forward block."""

from __future__ import annotations

import re

import torch
from torch import nn

from kvpage_runtime.config import ModelConfig
from kvpage_runtime.layers.linear import LinearMethod
from kvpage_runtime.layers.moe import SparseMoE
from kvpage_runtime.layers.weight_copy import copy_weight
from kvpage_runtime.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel
from kvpage_runtime.models.weights import WeightLoader

_EXPERT = re.compile(r"(?P<moe>.*\.mlp)\.experts\.(?P<expert>\d+)\.(?P<proj>w[123])\.weight$")


class MixtralDecoderLayer(LlamaDecoderLayer):
    def build_mlp(self, config: ModelConfig, device, method: LinearMethod | None) -> nn.Module:
        return SparseMoE(
            config.hidden_size,
            config.intermediate_size,
            config.num_experts,
            config.num_experts_per_tok,
            config.dtype,
            device,
        )


class MixtralModel(LlamaModel):
    layer_class = MixtralDecoderLayer


class MixtralForCausalLM(LlamaForCausalLM):
    model_class = MixtralModel

    def load_tensor(self, loader: WeightLoader, name: str, tensor: torch.Tensor) -> None:
        name = name.replace(".block_sparse_moe.", ".mlp.")
        match = _EXPERT.match(name)
        if match is None:
            loader.load(name, tensor)
            return
        moe = loader.modules[match["moe"]]
        slot = moe.expert_slot(int(match["expert"]), match["proj"])
        copy_weight(slot, tensor, name)
        loader.mark_loaded(name.removesuffix(".weight"))
