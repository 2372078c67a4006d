"""Loading a GGUF file (llama.cpp's format): weights dequantized at load, tokenizer via transformers.

The first load of a file converts it and stores the result in the cache (see ``cache``): the
weights in the model's own fused layout, in fp32. Later loads memory-map those weights and
use them as the parameters directly (no copy in fp32), and read the saved tokenizer.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path

import torch
from safetensors import safe_open

from kvpage_runtime.errors import ModelLoadError
from kvpage_runtime.loaders import cache
from kvpage_runtime.loaders.gguf_file import GGUFModelFile
from kvpage_runtime.loaders.hf import load_tokenizer
from kvpage_runtime.loaders.loaded import LoadedModel
from kvpage_runtime.models.registry import build_model

logger = logging.getLogger(__name__)
_writers: dict[Path, threading.Thread] = {}  # cache entries being written by this process


def load_gguf(
    path: Path, dtype: torch.dtype, device: torch.device, use_cache: bool = True
) -> LoadedModel:
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {path} does not exist")
    entry = cache.entry_dir(path)
    writer = _writers.pop(entry, None)
    if writer is not None:
        writer.join()
    if use_cache and cache.is_complete(entry):
        return _load_cached(entry, dtype, device)
    return _convert(path, entry if use_cache else None, dtype, device)


def _load_cached(entry: Path, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    config, extra = cache.config_from_json((entry / cache.CONFIG_FILE).read_text(), dtype)
    with safe_open(entry / cache.WEIGHTS_FILE, framework="pt") as f:
        state = {name: f.get_tensor(name).to(device=device, dtype=dtype) for name in f.keys()}  # noqa: SIM118 (not a dict)
    model = build_model(config, device)
    model.adopt_state(state)
    tokenizer = load_tokenizer(entry / cache.TOKENIZER_DIR)
    return _loaded(model, config, tokenizer, set(extra["eos_token_ids"]))


def _convert(
    path: Path, entry: Path | None, dtype: torch.dtype, device: torch.device
) -> LoadedModel:
    """Dequantize into an fp32 model (cached as is), then cast it to ``dtype``.

    The cache is written by a background thread once the model is ready. (Overlapping the
    tokenizer conversion with dequantization in threads was tried: both hold the GIL most of the
    time, and contention made the load slower.)
    """
    gguf_file = GGUFModelFile(path)
    config = gguf_file.model_config(dtype)
    eos = gguf_file.eos_token_ids()
    model = build_model(dataclasses.replace(config, dtype=torch.float32), device)
    model.load_weights(gguf_file.hf_tensors(config))
    tokenizer = load_tokenizer(path.parent, gguf_file=path.name)
    if entry is not None:
        config_json = cache.config_to_json(config, {"eos_token_ids": sorted(eos)})
        args = (entry, config_json, model.export_state(), tokenizer)
        writer = threading.Thread(target=_write_cache, args=args, name="kvpage-cache-writer")
        writer.start()
        _writers[entry] = writer
    model.to(dtype)
    model.config = config
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
