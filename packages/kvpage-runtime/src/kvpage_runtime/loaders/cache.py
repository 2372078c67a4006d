"""On-disk cache of converted GGUF models, so that a second load skips parsing and dequantizing.

An entry is keyed by the GGUF file's name, size and modification time and by how it was
loaded (low-bit weights kept, or all dequantized; the tensor-parallel rank it is a shard
for), and holds the config (JSON), the weights in
the model's own layout (safetensors: low-bit layers packed as ``QuantizedPanels``, the other
parameters dequantized to fp32) and the converted tokenizer (``save_pretrained``). Entries are written to a temporary folder and renamed into
place, so a reader never sees a partial entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from kvpage_runtime.config import ModelConfig

CACHE_ENV = "KVPAGE_CACHE_DIR"
_FORMAT = 4  # bump whenever the cached layout or parameter names change
CONFIG_FILE = "kvpage_model.json"
WEIGHTS_FILE = "weights.safetensors"
TOKENIZER_DIR = "tokenizer"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "kvpage")


def entry_dir(gguf_path: Path, low_bit: bool, rank: int = 0, world_size: int = 1) -> Path:
    stat = gguf_path.stat()
    kind = "low-bit" if low_bit else "dense"
    if world_size > 1:
        kind += f"|tp-rank-{rank}-of-{world_size}"
    key = f"{_FORMAT}|{kind}|{gguf_path.name}|{stat.st_size}|{stat.st_mtime_ns}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    return cache_root() / "gguf" / f"{gguf_path.stem}-{digest}"


def is_complete(entry: Path) -> bool:
    return all((entry / name).exists() for name in (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_DIR))


def config_to_json(config: ModelConfig, extra: dict[str, Any]) -> str:
    fields = dataclasses.asdict(config)
    fields["dtype"] = str(config.dtype).removeprefix("torch.")
    return json.dumps({"config": fields, **extra})


def config_from_json(text: str, dtype: torch.dtype) -> tuple[ModelConfig, dict[str, Any]]:
    data = json.loads(text)
    fields = data.pop("config")
    fields["dtype"] = dtype
    return ModelConfig(**fields), data


def write_entry(
    entry: Path, config_json: str, weights: dict[str, torch.Tensor], tokenizer: Any
) -> None:
    """Write a complete entry atomically; a failure (e.g. a read-only disk) leaves nothing behind."""
    from safetensors.torch import save_file

    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=entry.parent))
    try:
        (tmp / CONFIG_FILE).write_text(config_json)
        save_file(weights, str(tmp / WEIGHTS_FILE))
        tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
        if not entry.exists():  # another process may have written the same entry meanwhile
            os.replace(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
