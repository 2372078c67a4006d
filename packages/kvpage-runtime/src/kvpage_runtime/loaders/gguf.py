"""Loading a GGUF file (llama.cpp's format): weights dequantized at load, tokenizer via transformers.

The first load of a file converts it and stores the result in the cache (see ``cache``); later
loads read the cached safetensors weights and tokenizer, which is several times faster.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from kvpage_runtime.errors import ModelLoadError
from kvpage_runtime.loaders import cache
from kvpage_runtime.loaders.gguf_file import GGUFModelFile
from kvpage_runtime.loaders.hf import iter_safetensors, load_tokenizer
from kvpage_runtime.loaders.loaded import LoadedModel
from kvpage_runtime.models.registry import build_model

logger = logging.getLogger(__name__)


def load_gguf(path: Path, dtype: torch.dtype, device: torch.device, use_cache: bool = True) -> LoadedModel:
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {path} does not exist")
    entry = cache.entry_dir(path)
    if use_cache and cache.is_complete(entry):
        return _load_cached(entry, dtype, device)
    return _convert(path, entry if use_cache else None, dtype, device)


def _load_cached(entry: Path, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    config, extra = cache.config_from_json((entry / cache.CONFIG_FILE).read_text(), dtype)
    model = build_model(config, device)
    model.load_weights(iter_safetensors([entry / cache.WEIGHTS_FILE]))
    tokenizer = load_tokenizer(entry / cache.TOKENIZER_DIR)
    return _loaded(model, config, tokenizer, set(extra["eos_token_ids"]))


def _convert(path: Path, entry: Path | None, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    gguf_file = GGUFModelFile(path)
    config = gguf_file.model_config(dtype)
    eos = gguf_file.eos_token_ids()
    weights = dict(gguf_file.hf_tensors(config))
    model = build_model(config, device)
    model.load_weights(weights.items())
    tokenizer = load_tokenizer(path.parent, gguf_file=path.name)
    if entry is not None:
        try:
            extra = {"eos_token_ids": sorted(eos)}
            cache.write_entry(entry, cache.config_to_json(config, extra), weights, tokenizer)
        except OSError as e:
            logger.warning("could not cache the converted model in %s: %s", entry, e)
    return _loaded(model, config, tokenizer, eos)


def _loaded(model, config, tokenizer, eos: set[int]) -> LoadedModel:
    model.eval()
    generation_config = {"eos_token_id": sorted(eos)}
    return LoadedModel(
        model=model,
        config=config,
        tokenizer=tokenizer,
        generation_config=generation_config,
        eos_token_ids=eos,
        chat_template=getattr(tokenizer, "chat_template", None),
    )
