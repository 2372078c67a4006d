"""Loading a Hugging Face model folder: config.json, safetensors weights, tokenizer files.

Weights are read only from safetensors; pickle-based ``.bin``/``.pt`` files are refused,
since unpickling can run arbitrary code. AWQ and GPTQ checkpoints load low-bit (see
``layers.quantization``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from kvpage_runtime.distributed.parallel import TensorParallel
from kvpage_runtime.errors import ModelLoadError
from kvpage_runtime.layers.quantization import quantization_from_hf
from kvpage_runtime.loaders.hf_config import model_config_from_hf
from kvpage_runtime.loaders.loaded import LoadedModel
from kvpage_runtime.models.registry import build_model

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def load_hf_folder(
    folder: Path, dtype: torch.dtype, device: torch.device, quantization: str | None = None,
    tp: TensorParallel | None = None,
) -> LoadedModel:
    """``quantization`` and ``tp``: see ``loaders.load_model``."""
    raw = read_json(folder / "config.json", "model configuration")
    config = model_config_from_hf(raw, dtype)
    quantization_config = quantization_from_hf(raw, quantization)
    files = safetensors_files(folder)
    if not config.tie_word_embeddings and "lm_head.weight" not in tensor_names(files):
        config.tie_word_embeddings = True
    model = build_model(config, device, quantization_config, tp)
    model.load_weights(iter_safetensors(files))
    model.eval()
    generation_config = _optional_json(folder / "generation_config.json")
    tokenizer = load_tokenizer(folder)
    return LoadedModel(
        model=model,
        config=config,
        tokenizer=tokenizer,
        generation_config=generation_config,
        eos_token_ids=eos_ids(generation_config, raw, tokenizer),
        chat_template=getattr(tokenizer, "chat_template", None),
    )


def read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise ModelLoadError(f"{path.parent} has no {path.name} ({what})")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e


def _optional_json(path: Path) -> dict[str, Any]:
    return read_json(path, "") if path.is_file() else {}


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files: the shards an index names, else every ``*.safetensors`` in the folder."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(read_json(index, "weight index").get("weight_map", {}).values()))
        missing = [name for name in shards if not (folder / name).is_file()]
        if missing:
            raise ModelLoadError(
                f"{folder} lacks weight shards named in {index.name}: {', '.join(missing)}"
            )
        return [folder / name for name in shards]
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    if pickled:
        raise ModelLoadError(
            f"{folder} has only pickle weights ({', '.join(pickled)}); kvpage never unpickles "
            "checkpoints. Convert them to safetensors (model.save_pretrained(..., safe_serialization=True))."
        )
    raise ModelLoadError(
        f"{folder} has no weights: expected *.safetensors or model.safetensors.index.json"
    )


def tensor_names(files: list[Path]) -> set[str]:
    names: set[str] = set()
    for path in files:
        with safe_open(path, framework="pt") as f:
            names.update(f.keys())
    return names


def iter_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (not a dict)
                yield name, f.get_tensor(name)


def load_tokenizer(folder: Path, **kwargs: Any) -> Any | None:
    """The folder's tokenizer via transformers, or None when it ships no tokenizer files."""
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES) and not kwargs:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the tokenizer from {folder}: {e}") from e


def eos_ids(
    generation_config: dict[str, Any], config: dict[str, Any], tokenizer: Any | None
) -> set[int]:
    """End-of-sequence ids: generation_config.json first, then config.json, then the tokenizer."""
    for source in (generation_config, config):
        value = source.get("eos_token_id")
        if value is not None:
            return set(value) if isinstance(value, list) else {value}
    eos = getattr(tokenizer, "eos_token_id", None)
    return {eos} if eos is not None else set()
