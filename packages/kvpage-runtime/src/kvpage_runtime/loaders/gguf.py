"""Loading a GGUF file (llama.cpp's format): tokenizer via transformers, and weights that stay in
their low-bit blocks where kvpage multiplies by those (Q4_0, Q4_1, Q8_0), dequantized at load
otherwise (K-quants and the rest, logged) or everywhere with ``quantization="none"``.

The first load of a file converts it and stores the result in the cache (see ``cache``): the
weights in the model's own fused layout, low-bit layers packed, the other parameters in fp32.
Later loads read those weights and use them directly (no conversion, no copy in fp32), and
read the saved tokenizer.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path

import torch
from safetensors import safe_open

from kvpage_runtime.config import ModelConfig
from kvpage_runtime.distributed.parallel import TensorParallel
from kvpage_runtime.errors import ModelLoadError
from kvpage_runtime.layers.quantization import DENSE_LOAD, GGUFQuantization
from kvpage_runtime.layers.quantization.config import check_requested
from kvpage_runtime.layers.quantization.gguf import KEPT_TYPES
from kvpage_runtime.loaders import cache
from kvpage_runtime.loaders.gguf_file import GGUFModelFile
from kvpage_runtime.loaders.hf import load_tokenizer
from kvpage_runtime.loaders.loaded import LoadedModel
from kvpage_runtime.models.registry import model_class

logger = logging.getLogger(__name__)
_writers: dict[Path, threading.Thread] = {}  # cache entries being written by this process


def load_gguf(
    path: Path,
    dtype: torch.dtype,
    device: torch.device,
    quantization: str | None = None,
    use_cache: bool = True,
    tp: TensorParallel | None = None,
) -> LoadedModel:
    """``quantization``: None or "gguf" keeps the low-bit blocks kvpage multiplies by, "none"
    dequantizes every tensor (the dense load). ``tp``: the rank whose shard to load (each
    rank converts and caches its own)."""
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {path} does not exist")
    low_bit = quantization != DENSE_LOAD
    if low_bit:
        check_requested(quantization, "gguf")
    tp = tp or TensorParallel()
    entry = cache.entry_dir(path, low_bit, tp.rank, tp.size)
    writer = _writers.pop(entry, None)
    if writer is not None:
        writer.join()
    if use_cache and cache.is_complete(entry):
        return _load_cached(entry, dtype, device, tp)
    return _convert(path, entry if use_cache else None, low_bit, dtype, device, tp)


def _load_cached(entry: Path, dtype: torch.dtype, device: torch.device,
                 tp: TensorParallel) -> LoadedModel:
    config, extra = cache.config_from_json((entry / cache.CONFIG_FILE).read_text(), dtype)
    with safe_open(entry / cache.WEIGHTS_FILE, framework="pt") as f:
        state = {name: f.get_tensor(name).to(device) for name in f.keys()}  # noqa: SIM118 (not a dict)
    model, _ = _build(config, device, extra["tensor_types"], tp)
    model.adopt_state(state)
    tokenizer = load_tokenizer(entry / cache.TOKENIZER_DIR)
    return _loaded(model, config, tokenizer, set(extra["eos_token_ids"]))


def _build(config: ModelConfig, device: torch.device, tensor_types: dict[str, str] | None,
           tp: TensorParallel | None):
    """The model for ``config`` and its GGUF quantization: ``tensor_types`` (the file's GGML
    types by the model's tensor names) decides which layers stay low-bit, None that none
    does."""
    quantization = None if tensor_types is None else GGUFQuantization(tensor_types)
    return model_class(config.architecture)(config, device, quantization, tp), quantization


def build_gguf_model(
    gguf_file: GGUFModelFile, config: ModelConfig, device: torch.device, low_bit: bool,
    tp: TensorParallel | None = None,
):
    """The model of ``gguf_file`` with its weights loaded (dense ones in ``config.dtype``) and
    the GGUF quantization it was built with (None for a dense load)."""
    rename = model_class(config.architecture).model_name
    tensor_types = ({rename(name): t for name, t in gguf_file.tensor_types().items()}
                    if low_bit else None)
    model, quantization = _build(config, device, tensor_types, tp)
    kept = quantization.kept if quantization is not None else set()
    model.load_weights(gguf_file.hf_tensors(config, lambda name: rename(name) in kept))
    if quantization is not None and (dequantized := quantization.dequantized_types()):
        logger.info("GGUF tensors dequantized at load (low-bit kept for %s only): %s",
                    ", ".join(KEPT_TYPES),
                    ", ".join(f"{n} of type {t}" for t, n in sorted(dequantized.items())))
    return model, quantization


def _convert(
    path: Path, entry: Path | None, low_bit: bool, dtype: torch.dtype, device: torch.device,
    tp: TensorParallel,
) -> LoadedModel:
    """Convert into a model whose dense parameters are fp32 (cached as is), then take its
    state into a model of ``dtype``, as a cached load does.

    The cache is written by a background thread once the model is ready. (Overlapping the
    tokenizer conversion with dequantization in threads was tried: both hold the GIL most of the
    time, and contention made the load slower.)
    """
    gguf_file = GGUFModelFile(path)
    config = gguf_file.model_config(dtype)
    eos = gguf_file.eos_token_ids()
    converted, quantization = build_gguf_model(
        gguf_file, dataclasses.replace(config, dtype=torch.float32), device, low_bit, tp)
    state = converted.export_state()
    tensor_types = None if quantization is None else quantization.tensor_types
    tokenizer = load_tokenizer(path.parent, gguf_file=path.name)
    if entry is not None:
        extra = {"eos_token_ids": sorted(eos), "tensor_types": tensor_types}
        args = (entry, cache.config_to_json(config, extra), state, tokenizer)
        writer = threading.Thread(target=_write_cache, args=args, name="kvpage-cache-writer")
        writer.start()
        _writers[entry] = writer
    model, _ = _build(config, device, tensor_types, tp)
    model.adopt_state(state)
    return _loaded(model, config, tokenizer, eos)


def _write_cache(entry: Path, config_json: str, state: dict[str, torch.Tensor], tokenizer) -> None:
    try:
        cpu_state = {name: t.cpu() for name, t in state.items()}
        cache.write_entry(entry, config_json, cpu_state, tokenizer)
    except OSError as e:
        logger.warning("could not cache the converted model in %s: %s", entry, e)


def _loaded(model, config, tokenizer, eos: set[int]) -> LoadedModel:
    model.eval()
    return LoadedModel(
        model=model,
        config=config,
        tokenizer=tokenizer,
        generation_config={"eos_token_id": sorted(eos)},
        eos_token_ids=eos,
        chat_template=getattr(tokenizer, "chat_template", None),
    )
