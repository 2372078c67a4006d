"""Quantization settings: parsed from config.json's quantization_config, checked against what
``quantization=`` asks for, and malformed checkpoints refused naming the tensor or setting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from kvpage_runtime.cli import _engine_fields, build_parser
from kvpage_runtime.engine.config import EngineConfig
from kvpage_runtime.errors import EngineConfigError, ModelLoadError, UnsupportedModelError
from kvpage_runtime.layers.linear import Linear
from kvpage_runtime.layers.quantization import quantization_from_hf
from kvpage_runtime.layers.quantization.awq import AWQConfig
from kvpage_runtime.layers.quantization.gptq import GPTQConfig
from kvpage_runtime.layers.quantization.low_bit import LowBitLinearMethod
from kvpage_runtime.loaders import load_model, resolve_dtype
from model_helpers import (
    TINY,
    PagedGreedyDriver,
    compare_greedy,
    hf_reference,
    one_torch_thread,  # noqa: F401 (fixture)
    random_prompts,
    save_tiny_model,
)
from quant_helpers import AWQ, GPTQ, tiny_quantized
from safetensors.torch import load_file, save_file
from test_loaders_gguf import write_gguf

LLAMA = transformers.LlamaConfig(**{**TINY, "hidden_size": 128, "intermediate_size": 256,
                                    "num_hidden_layers": 2})
AWQ_SETTINGS = {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True,
                "version": "gemm", "modules_to_not_convert": ["gate"]}
GPTQ_SETTINGS = {"quant_method": "gptq", "bits": 8, "group_size": -1, "sym": False,
                 "desc_act": True, "checkpoint_format": "gptq_v2"}


def test_settings_are_parsed():
    assert quantization_from_hf({"quantization_config": AWQ_SETTINGS}, None) == AWQConfig(
        64, ("gate",))
    gptq = quantization_from_hf({"quantization_config": GPTQ_SETTINGS}, "gptq")
    assert gptq == GPTQConfig(8, -1, desc_act=True, checkpoint_format="gptq_v2")
    assert gptq.tensor_names == ("qweight", "qzeros", "scales", "g_idx")
    without_act_order = GPTQConfig(4, 128, desc_act=False)
    assert without_act_order.tensor_names == ("qweight", "qzeros", "scales")
    assert without_act_order.ignored_names == ("g_idx",)  # not needed: groups in input order
    assert quantization_from_hf({}, None) is None


@pytest.mark.parametrize("settings, message", [
    ({"quant_method": "bitsandbytes"},
     "quantization method 'bitsandbytes' is not supported (awq, gptq, gguf are)"),
    ({**GPTQ_SETTINGS, "bits": 3}, "GPTQ with 3 bits is not supported (4 or 8 are)"),
    ({**GPTQ_SETTINGS, "group_size": 256},
     "GPTQ group_size 256 is not supported (-1, 32, 64, 128 are)"),
    ({**GPTQ_SETTINGS, "checkpoint_format": "marlin"},
     "GPTQ checkpoint_format 'marlin' is not supported (gptq, gptq_v2 are)"),
    ({**GPTQ_SETTINGS, "lm_head": True}, "GPTQ with a quantized lm_head is not supported"),
    ({**AWQ_SETTINGS, "version": "gemv"}, "AWQ version 'gemv' is not supported (gemm is)"),
    ({**AWQ_SETTINGS, "bits": 8}, "AWQ with 8 bits is not supported (4 is)"),
    ({**AWQ_SETTINGS, "zero_point": False}, "AWQ without zero points"),
    ({**AWQ_SETTINGS, "group_size": 256}, "AWQ group_size 256 is not supported (32, 64, 128 are)"),
])
def test_unsupported_settings_are_named(settings, message):
    with pytest.raises(UnsupportedModelError) as error:
        quantization_from_hf({"quantization_config": settings}, None)
    assert str(error.value).startswith(message)


@pytest.fixture(scope="module")
def awq_folder(tmp_path_factory) -> Path:
    return tiny_quantized(LLAMA, AWQ(32), tmp_path_factory.mktemp("awq"))[0]


@pytest.mark.parametrize("requested, error, message", [
    ("gptq", ModelLoadError, "quantization='gptq' was asked for, but the checkpoint is awq"),
    ("none", ModelLoadError, "quantization='none' (a dense load) applies to GGUF files only"),
    ("int3", UnsupportedModelError, "quantization method 'int3' is not supported (awq, gptq, "
                                    "gguf are; 'none' loads a GGUF file dense)"),
])
def test_asking_for_another_quantization_is_an_error(awq_folder, requested, error, message):
    with pytest.raises(error) as raised:
        load_model(str(awq_folder), "float32", quantization=requested)
    assert str(raised.value).startswith(message)


def test_asking_for_what_the_checkpoint_is_loads_it(awq_folder, tmp_path):
    loaded = load_model(str(awq_folder), "float32", quantization="awq")
    assert isinstance(loaded.model.model.layers[0].mlp.down_proj.method, LowBitLinearMethod)
    dense = save_tiny_model(LLAMA, tmp_path / "dense")
    load_model(str(dense), "float32", quantization="none")
    with pytest.raises(ModelLoadError, match="quantization='awq' was asked for, but the "
                                             "checkpoint is not quantized"):
        load_model(str(dense), "float32", quantization="awq")
    gguf = write_gguf(dense, tmp_path / "model.gguf", "llama", LLAMA, True, {"*": "Q8_0"})
    with pytest.raises(ModelLoadError, match="quantization='gptq' was asked for, but the "
                                             "checkpoint is gguf"):
        load_model(str(gguf), "float32", quantization="gptq")


def test_auto_dtype_is_fp32_for_low_bit_weights_on_the_cpu(awq_folder):
    """Low-bit layers compute in fp32: bf16 activations would only add conversions."""
    assert resolve_dtype("auto", "cpu", low_bit=True) == torch.float32
    assert resolve_dtype("auto", "cuda", low_bit=True) == torch.bfloat16
    assert load_model(str(awq_folder)).config.dtype == torch.float32


def test_engine_config_checks_the_option():
    args = build_parser().parse_args(["serve", "--quantization", "none"])
    assert EngineConfig(**_engine_fields(args, None)).quantization == "none"
    with pytest.raises(EngineConfigError, match="quantization must be one of awq, gptq, gguf, "
                                                "none or None, got 'fp8'"):
        EngineConfig(quantization="fp8")


# ------------------------------------------------------------------ malformed checkpoints


def rewrite(folder: Path, tmp_path: Path, edit) -> Path:
    """A copy of checkpoint ``folder`` whose tensors (a dict) ``edit`` changed in place."""
    copy = tmp_path / "edited"
    copy.mkdir()
    (copy / "config.json").write_text((folder / "config.json").read_text())
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(copy / "model.safetensors"))
    return copy


def test_a_tensor_of_the_wrong_shape_is_named(awq_folder, tmp_path):
    def truncate(tensors):
        name = "model.layers.1.self_attn.v_proj.qzeros"
        tensors[name] = tensors[name][:1].clone()

    with pytest.raises(ModelLoadError, match=r"^model\.layers\.1\.self_attn\.v_proj: qzeros: "
                                             r"expected torch.int32 of shape \(4, 8\)"):
        load_model(str(rewrite(awq_folder, tmp_path, truncate)), "float32")


def test_a_layer_of_the_wrong_size_is_named(awq_folder, tmp_path):
    def swap(tensors):  # k_proj (64 outputs) given q_proj's tensors (128 outputs)
        for kind in ("qweight", "qzeros", "scales"):
            tensors[f"model.layers.0.self_attn.k_proj.{kind}"] = tensors[
                f"model.layers.0.self_attn.q_proj.{kind}"].clone()

    with pytest.raises(ModelLoadError, match="^model.layers.0.self_attn.k_proj: its tensors "
                                             "hold a 128 x 128 weight, the model expects 64 x 128"):
        load_model(str(rewrite(awq_folder, tmp_path, swap)), "float32")


def test_a_missing_scales_tensor_is_named(awq_folder, tmp_path):
    def drop(tensors):
        del tensors["model.layers.1.mlp.down_proj.scales"]

    with pytest.raises(ModelLoadError, match="^checkpoint is missing 1 weights: "
                                             "model.layers.1.mlp.down_proj.scales$"):
        load_model(str(rewrite(awq_folder, tmp_path, drop)), "float32")


def test_three_bits_are_refused(tmp_path):
    folder, _ = tiny_quantized(LLAMA, GPTQ(4, 32, sym=True, desc_act=False), tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"]["bits"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="GPTQ with 3 bits is not supported"):
        load_model(str(folder), "float32")


def test_fused_parts_with_different_act_order_are_refused(tmp_path):
    folder, _ = tiny_quantized(LLAMA, GPTQ(4, 32, sym=True, desc_act=True), tmp_path)

    def reorder(tensors):  # k_proj's groups take its inputs in another order than q's and v's
        name = "model.layers.0.self_attn.k_proj.g_idx"
        tensors[name] = tensors[name].flip(0).contiguous()

    with pytest.raises(ModelLoadError, match="^model.layers.0.self_attn.qkv_proj: cannot stack "
                                             "quantized weights whose inputs are ordered "
                                             "differently"):
        load_model(str(rewrite(folder, tmp_path, reorder)), "float32")


# ------------------------------------------------------------------ modules_to_not_convert


def test_modules_to_not_convert_stay_dense(tmp_path):
    """AutoAWQ leaves the modules it names dense (fp16 weights); they load dense, the model
    still matches transformers."""
    folder, reference = tiny_quantized(LLAMA, AWQ(32, modules_to_not_convert=("o_proj",)),
                                       tmp_path)
    loaded = load_model(str(folder), "float32")
    low_bit = {path: isinstance(m.method, LowBitLinearMethod)
               for path, m in loaded.model.named_modules() if isinstance(m, Linear)}
    assert {path for path, q in low_bit.items() if not q} == {
        "model.embed_tokens", "lm_head", "model.layers.0.self_attn.o_proj",
        "model.layers.1.self_attn.o_proj"}
    prompts = random_prompts([5, 17, 9], LLAMA.vocab_size)
    seqs = PagedGreedyDriver(loaded).generate(prompts, 8)
    compare_greedy(seqs, hf_reference(reference, prompts, 8), prompts)


def test_a_fused_layer_cannot_be_half_converted(tmp_path):
    folder, _ = tiny_quantized(LLAMA, AWQ(32, modules_to_not_convert=("k_proj",)), tmp_path)
    with pytest.raises(UnsupportedModelError, match="^model.layers.0.self_attn.qkv_proj: "
                                                    "modules_to_not_convert leaves model.layers.0"
                                                    ".self_attn.k_proj dense but not the other"):
        load_model(str(folder), "float32")

