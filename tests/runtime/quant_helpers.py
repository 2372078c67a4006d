"""Tiny quantized checkpoints, written as AutoAWQ, AutoGPTQ and llama.cpp write them.

A tiny random model saved by transformers is quantized round-to-nearest per group of inputs
(``quantize_rtn``), its linear layers stored in the format's tensors (``AWQ``, ``GPTQ``:
``write_quantized``) and, dequantized, in a plain safetensors folder beside it: the
reference that transformers runs. GGUF blocks are made by the gguf package itself
(``gguf_blocks``, for ``test_loaders_gguf.write_gguf``), and transformers reads them back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from model_helpers import save_tiny_model
from safetensors.torch import load_file, save_file

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ: the output column each nibble of a word holds
# the checkpoint projections AutoAWQ and AutoGPTQ quantize (Mixtral's experts: w1, w2, w3)
QUANTIZED_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                         "down_proj", "w1", "w2", "w3")


def pack_along(values: torch.Tensor, bits: int, dim: int, order=None) -> torch.Tensor:
    """Packs 32 // bits codes per int32 along ``dim`` (word slot p holds ``order[p]``)."""
    per_word = 32 // bits
    order = order or tuple(range(per_word))
    v = values.movedim(dim, -1)
    v = v.reshape(*v.shape[:-1], -1, per_word)[..., list(order)].to(torch.int64)
    words = sum(v[..., p] << (bits * p) for p in range(per_word))
    words = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)
    return words.movedim(-1, dim)


@dataclass
class Quantized:
    """A weight [out, in] quantized per group: ``w = (codes - zeros) * scales`` with each
    input's group ``g_idx`` (a permutation of the inputs' groups under act-order)."""

    codes: torch.Tensor  # int64 [out, in]
    zeros: torch.Tensor  # int64 [out, groups]
    scales: torch.Tensor  # fp16 [out, groups]
    g_idx: torch.Tensor  # int64 [in]

    def dequantize(self) -> torch.Tensor:
        return (self.codes - self.zeros[:, self.g_idx]).float() * self.scales.float()[:, self.g_idx]


def quantize_rtn(weight: torch.Tensor, bits: int, group_size: int, sym: bool,
                 act_order: bool = False, min_zero: int = 0) -> Quantized:
    """Round-to-nearest quantization of ``weight`` [out, in] in groups of ``group_size``
    inputs (-1: one group), symmetric (zero point at mid-range) or with a zero point per
    group; with ``act_order`` the groups take the inputs in a random order, as GPTQ's
    act-order does. Zero points are at least ``min_zero`` (GPTQ's v1 format stores them minus
    one)."""
    out_f, in_f = weight.shape
    size = in_f if group_size == -1 else group_size
    # one order per input size: layers of one input (q/k/v, gate/up) share it, as in GPTQ
    order = (torch.randperm(in_f, generator=torch.Generator().manual_seed(in_f))
             if act_order else torch.arange(in_f))
    g_idx = torch.empty(in_f, dtype=torch.int64)
    g_idx[order] = torch.arange(in_f) // size
    groups = weight[:, order].reshape(out_f, -1, size).double()
    maxq = (1 << bits) - 1
    if sym:
        scales = (groups.abs().amax(-1) * 2 / maxq).clamp(min=1e-4).half()
        zeros = torch.full(scales.shape, (maxq + 1) // 2, dtype=torch.int64)
    else:
        low, high = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
        scales = ((high - low) / maxq).clamp(min=1e-4).half()
        zeros = torch.round(-low / scales.double()).long().clamp(min_zero, maxq)
    codes = torch.round(groups / scales.double().unsqueeze(-1)) + zeros.unsqueeze(-1)
    codes = codes.clamp(0, maxq).long().reshape(out_f, in_f)
    natural = torch.empty_like(codes)
    natural[:, order] = codes
    return Quantized(natural, zeros, scales, g_idx)


@dataclass(frozen=True)
class AWQ:
    """AutoAWQ's ``gemm`` checkpoints: 4 bits, zero points."""

    group_size: int
    modules_to_not_convert: tuple[str, ...] = ()

    def settings(self) -> dict[str, Any]:
        return {"quant_method": "awq", "bits": 4, "group_size": self.group_size,
                "zero_point": True, "version": "gemm",
                "modules_to_not_convert": list(self.modules_to_not_convert) or None}

    def tensors(self, weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The layer's checkpoint tensors and the weight they dequantize to."""
        q = quantize_rtn(weight, 4, self.group_size, sym=False)
        return {
            "qweight": pack_along(q.codes.t(), 4, dim=1, order=AWQ_ORDER),  # [in, out / 8]
            "qzeros": pack_along(q.zeros.t(), 4, dim=1, order=AWQ_ORDER),  # [groups, out / 8]
            "scales": q.scales.t().contiguous(),  # [groups, out]
        }, q.dequantize()


@dataclass(frozen=True)
class GPTQ:
    """AutoGPTQ (``checkpoint_format`` gptq: zero points stored minus one) and GPTQModel
    (gptq_v2) checkpoints."""

    bits: int
    group_size: int
    sym: bool
    desc_act: bool
    checkpoint_format: str = "gptq"
    modules_to_not_convert: tuple[str, ...] = ()

    def settings(self) -> dict[str, Any]:
        return {"quant_method": "gptq", "bits": self.bits, "group_size": self.group_size,
                "sym": self.sym, "desc_act": self.desc_act, "true_sequential": True,
                "damp_percent": 0.01, "static_groups": False,
                "checkpoint_format": self.checkpoint_format}

    def tensors(self, weight: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        v1 = self.checkpoint_format == "gptq"
        q = quantize_rtn(weight, self.bits, self.group_size, self.sym, self.desc_act,
                         min_zero=1 if v1 else 0)
        stored_zeros = q.zeros - 1 if v1 else q.zeros
        return {
            "qweight": pack_along(q.codes.t(), self.bits, dim=0),  # [in * bits / 32, out]
            "qzeros": pack_along(stored_zeros.t(), self.bits, dim=1),  # [groups, out*bits/32]
            "scales": q.scales.t().contiguous(),  # [groups, out]
            "g_idx": q.g_idx.int(),
        }, q.dequantize()


def is_quantized_linear(name: str, modules_to_not_convert: tuple[str, ...] = ()) -> bool:
    """Whether checkpoint tensor ``name`` is the weight of a decoder linear layer that the
    format quantizes (AutoAWQ's modules_to_not_convert match whole name components)."""
    module, _, kind = name.rpartition(".")
    return (kind == "weight" and module.startswith("model.layers.")
            and module.rpartition(".")[2] in QUANTIZED_PROJECTIONS
            and not any(f".{m}." in f".{module}." for m in modules_to_not_convert))


def write_quantized(dense: Path, folder: Path, reference: Path, scheme: AWQ | GPTQ,
                    tokenizer: Any | None = None) -> None:
    """The transformers-saved model in ``dense`` written to ``folder`` as ``scheme``'s
    checkpoint (dense tensors in fp16, as the quantizers save them; config.json with its
    ``quantization_config``; ``tokenizer`` if given) and to ``reference`` with the weights
    those tensors hold, in fp32."""
    quantized, dequantized = {}, {}
    for name, tensor in load_file(dense / "model.safetensors").items():
        if is_quantized_linear(name, scheme.modules_to_not_convert):
            module = name.removesuffix(".weight")
            tensors, dequantized[name] = scheme.tensors(tensor)
            quantized.update({f"{module}.{kind}": t for kind, t in tensors.items()})
        else:
            quantized[name] = tensor.half()
            dequantized[name] = tensor.half().float()
    config = json.loads((dense / "config.json").read_text())
    _save(folder, {**config, "torch_dtype": "float16",
                   "quantization_config": scheme.settings()}, quantized)
    _save(reference, config, dequantized)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def tiny_quantized(config, scheme: AWQ | GPTQ, folder: Path,
                   tokenizer: Any | None = None) -> tuple[Path, Path]:
    """A tiny random model for transformers ``config`` written as ``scheme``'s checkpoint:
    (the quantized folder, the reference folder with its dequantized weights)."""
    dense = save_tiny_model(config, folder / "dense")
    quantized, reference = folder / "quantized", folder / "reference"
    write_quantized(dense, quantized, reference, scheme, tokenizer)
    return quantized, reference


def _save(folder: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))


def gguf_type(name: str, types: dict[str, str]) -> str | None:
    """The GGML type GGUF tensor ``name`` is stored in: ``types`` maps llama.cpp tensor stems
    (``attn_q``, ``ffn_down_exps``, ``token_embd``, ``output``; "*" for any other) to type
    names; norms and biases stay F32."""
    stem = name.removesuffix(".weight")
    if stem == name or stem.endswith("_norm"):
        return None
    return types.get(stem.rpartition(".")[2], types.get("*"))


def gguf_blocks(array: np.ndarray, qtype: str) -> np.ndarray:
    """``array`` [..., rows, cols] quantized by the gguf package into blocks of ``qtype``
    along its rows (raw bytes [..., rows, bytes per row])."""
    return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32),
                                gguf.GGMLQuantizationType[qtype])
