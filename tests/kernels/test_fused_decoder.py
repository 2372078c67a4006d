"""The fused decoder stack against the same ops run one by one: bit-identical in fp32 (the
same GEMM: packed_linear's on pack_weight's panels, fp32 or low-bit, or MKL's on its packs),
equal to bf16 rounding in bf16 (MKL's bf16 GEMM against torch's linear), on every CPU tier of
the cpu backend this CPU offers."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import pytest
import torch
from kvpage_kernels import (
    KernelInputError,
    PackedWeight,
    QuantizedPanels,
    QuantizedWeight,
    lora_expand,
    lora_shrink,
    pack_weight,
    packed_linear,
    paged_attention,
    rms_norm,
    rotary_embedding,
    route_experts,
    silu_and_mul,
    write_kv,
)
from kvpage_kernels.fused_decoder import (
    DecoderLayerWeights,
    DecoderShape,
    FusedDecoder,
    LoRAWeights,
    WeightFormat,
    unavailable_reason,
)

if unavailable_reason() is not None:
    pytest.skip(f"fused decoder unavailable: {unavailable_reason()}", allow_module_level=True)


def mkl_pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkl._mkl_reorder_linear_weight(weight, 64)


def quantize(weight: torch.Tensor, bits: int, ordered: bool, fp16: bool) -> QuantizedWeight:
    """weight in groups of 32 inputs, each mapped onto the codes 0 .. 2**bits - 1 between its
    minimum and maximum (the inputs first shuffled when ``ordered``); ``fp16``: the scales and
    minimums rounded to fp16 (as GGUF stores them; packed in fp16 then)."""
    order = torch.randperm(weight.shape[1]) if ordered else None
    stored = weight if order is None else weight[:, order]
    groups = stored.reshape(weight.shape[0], -1, 32)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scales = (high - low) / (2**bits - 1)
    if fp16:
        low, scales = low.half().float(), scales.half().float()
    codes = ((groups - low[..., None]) / scales[..., None]).round().clamp(0, 2**bits - 1)
    return QuantizedWeight(codes.to(torch.uint8).reshape(stored.shape), scales, low, bits, 32,
                           order)


def pack_quantized(weight: torch.Tensor) -> QuantizedPanels:
    """Low-bit weights of either width, some with an input order (GPTQ act-order), some with
    fp16 scales and offsets: wide ones in 4 bits with fp16 groups, square ones in 8, long ones
    in order."""
    out_features, in_features = weight.shape
    bits = 4 if out_features > in_features else 8
    packed = pack_weight(quantize(weight, bits, ordered=in_features > out_features,
                                  fp16=bits == 4))
    assert (packed.scales.dtype == torch.float16) == (bits == 4)
    return packed


PACKS = {WeightFormat.PANELS: pack_weight, WeightFormat.MKL_PACKED: mkl_pack,
         WeightFormat.BF16: lambda w: w, WeightFormat.QUANTIZED: pack_quantized}


def linear(x: torch.Tensor, weight: torch.Tensor, layer_weight, bias=None):
    """What the per-layer path computes: packed_linear or MKL's packed GEMM in fp32 (as the
    weight is packed), torch's linear in bf16."""
    if isinstance(layer_weight, PackedWeight | QuantizedPanels):
        return packed_linear(x, layer_weight, bias)
    if x.dtype == torch.float32:
        return torch.ops.mkl._mkl_linear(x, layer_weight, weight, bias, x.shape[0])
    return torch.nn.functional.linear(x, weight, bias)


@dataclass
class Stack:
    shape: DecoderShape
    weights: list[dict[str, torch.Tensor | None]]  # plain weights, for the one-by-one path
    layers: list[DecoderLayerWeights]


def test_bad_experts_are_named():
    gen = torch.Generator().manual_seed(4)
    shape = DecoderShape(64, 64, num_heads=2, num_kv_heads=1, head_dim=32, rms_norm_eps=1e-6,
                         num_experts=3, top_k=2, expert_intermediate_size=16)
    layer = make_stack(shape, 1, 8, 4, False, gen).layers[0]

    def packed(out_features: int, in_features: int) -> PackedWeight:
        return pack_weight(torch.randn(out_features, in_features, generator=gen))

    experts = [(packed(32, 64), packed(64, 16)) for _ in range(3)]
    moe = DecoderLayerWeights(**{**vars(layer), "gate_up": None, "down": None,
                                 "router": packed(3, 64), "experts": experts})
    FusedDecoder(shape, [moe, layer])  # a dense layer among them is fine

    def with_(**changes) -> list[DecoderLayerWeights]:
        return [DecoderLayerWeights(**{**vars(moe), **changes})]

    with pytest.raises(KernelInputError, match=r"num_experts \(3\) experts.* got 2 experts"):
        FusedDecoder(shape, with_(experts=experts[:2]))
    with pytest.raises(KernelInputError, match="no gate_up or down"):
        FusedDecoder(shape, with_(gate_up=layer.gate_up))
    with pytest.raises(KernelInputError, match="give gate_up and down, or a router and experts"):
        FusedDecoder(shape, with_(router=None))
    with pytest.raises(KernelInputError, match=r"experts\[1\].down must be \[out, in\] = "
                                               r"\[64, 16\], got \[64, 8\]"):
        FusedDecoder(shape, with_(experts=[experts[0], (experts[1][0], packed(64, 8)),
                                           experts[2]]))
    with pytest.raises(KernelInputError, match="layer 1: its router is not PANELS"):
        FusedDecoder(shape, [moe, *with_(router=mkl_pack(torch.randn(3, 64)))])
    with pytest.raises(KernelInputError, match="a mixture of experts takes no LoRA weights"):
        lora = LoRAWeights(torch.zeros(2, 4, 64), [torch.zeros(2, 32, 4)])
        FusedDecoder(shape, with_(lora=(None, None, lora, None)))


def make_stack(shape: DecoderShape, num_layers: int, num_blocks: int, block_size: int,
               bias: bool, gen: torch.Generator,
               weight_format: WeightFormat = WeightFormat.PANELS) -> Stack:
    """Random layers; the fused decoder gets their weights in `weight_format` (BF16: the stack
    in bf16, else fp32)."""
    dtype = torch.bfloat16 if weight_format == WeightFormat.BF16 else torch.float32
    pack = PACKS[weight_format]
    d, h = shape.head_dim, shape.hidden_size
    qkv_out = (shape.num_heads + 2 * shape.num_kv_heads) * d
    weights, layers = [], []
    for _ in range(num_layers):
        w = {
            "input_norm": 1 + 0.1 * torch.randn(h, generator=gen),
            "qkv": torch.randn(qkv_out, h, generator=gen) * h**-0.5,
            "qkv_bias": torch.randn(qkv_out, generator=gen) if bias else None,
            "o": torch.randn(h, shape.num_heads * d, generator=gen) * d**-0.5,
            "post_attention_norm": 1 + 0.1 * torch.randn(h, generator=gen),
            "gate_up": torch.randn(2 * shape.intermediate_size, h, generator=gen) * h**-0.5,
            "down": torch.randn(h, shape.intermediate_size, generator=gen) * h**-0.5,
        }
        w = {name: None if t is None else t.to(dtype) for name, t in w.items()}
        cache_shape = (num_blocks, block_size, shape.num_kv_heads, d)
        caches = [torch.randn(cache_shape, generator=gen).to(dtype) for _ in range(2)]
        weights.append(w)
        layers.append(DecoderLayerWeights(
            input_norm=w["input_norm"], qkv=pack(w["qkv"]), qkv_bias=w["qkv_bias"],
            o=pack(w["o"]), post_attention_norm=w["post_attention_norm"],
            gate_up=pack(w["gate_up"]), down=pack(w["down"]),
            k_cache=caches[0], v_cache=caches[1]))
    return Stack(shape, weights, layers)


@dataclass
class Step:
    hidden: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    slot_mapping: torch.Tensor
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor

    def args(self):
        return (self.hidden, self.cos, self.sin, self.slot_mapping, self.block_tables,
                self.seq_lens, self.query_start_loc)


def make_step(shape: DecoderShape, seq_lens: list[int], num_blocks: int, block_size: int,
              gen: torch.Generator, seed: int = 0, dtype: torch.dtype = torch.float32) -> Step:
    """Each sequence's blocks drawn at random from the pool; its new token is its last."""
    rng = random.Random(seed)
    per_seq = [-(-n // block_size) for n in seq_lens]
    blocks = rng.sample(range(num_blocks), sum(per_seq))
    width = max(per_seq)
    tables, slots, start = [], [], 0
    for n, count in zip(seq_lens, per_seq, strict=True):
        own = blocks[start:start + count]
        start += count
        tables.append(own + [0] * (width - count))
        slots.append(own[(n - 1) // block_size] * block_size + (n - 1) % block_size)
    rows, half = len(seq_lens), shape.head_dim // 2
    angles = torch.randn(rows, 1, half, generator=gen)
    cos_sin = torch.cat((angles.cos(), angles.sin()), dim=-1).to(dtype)  # strided rows
    return Step(
        hidden=torch.randn(rows, shape.hidden_size, generator=gen).to(dtype),
        cos=cos_sin[..., :half], sin=cos_sin[..., half:],
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        block_tables=torch.tensor(tables, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        query_start_loc=torch.arange(rows + 1, dtype=torch.int32),
    )


def add_lora(weights: LoRAWeights | None, x: torch.Tensor, y: torch.Tensor,
             slots: torch.Tensor | None) -> torch.Tensor:
    """y plus each row's adapter delta as the per-layer path adds it: one shrink over the
    shards, an expand into each shard's columns."""
    if weights is None or slots is None:
        return y
    h, rank, first = lora_shrink(x, weights.a, slots), weights.b[0].shape[2], 0
    for i, b in enumerate(weights.b):
        lora_expand(y[:, first:first + b.shape[1]], h[:, i * rank:(i + 1) * rank], b, slots)
        first += b.shape[1]
    return y


def one_by_one(stack: Stack, step: Step, caches: list[tuple[torch.Tensor, torch.Tensor]],
               lora_slots: torch.Tensor | None = None):
    """The per-layer path of a Llama decoder layer, op by op."""
    s, rows = stack.shape, step.hidden.shape[0]
    q_size, kv_size = s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    hidden, residual = step.hidden, None
    for w, layer, (k_cache, v_cache) in zip(stack.weights, stack.layers, caches, strict=True):
        if residual is None:
            residual, hidden = hidden, rms_norm(hidden, w["input_norm"], s.rms_norm_eps)
        else:
            hidden, residual = rms_norm(hidden, w["input_norm"], s.rms_norm_eps, residual)
        lora = layer.lora or (None,) * 4
        qkv = add_lora(lora[0], hidden, linear(hidden, w["qkv"], layer.qkv, w["qkv_bias"]),
                       lora_slots)
        qk = rotary_embedding(qkv[:, :q_size + kv_size].view(rows, -1, s.head_dim),
                              step.cos, step.sin)
        q, k = qk.split([s.num_heads, s.num_kv_heads], dim=1)
        v = qkv[:, q_size + kv_size:].view(rows, s.num_kv_heads, s.head_dim)
        write_kv(k, v, k_cache, v_cache, step.slot_mapping)
        attn = paged_attention(q, k_cache, v_cache, step.block_tables, step.seq_lens,
                               step.query_start_loc, s.head_dim**-0.5,
                               sliding_window=s.sliding_window, max_query_len=1)
        attn = attn.reshape(rows, q_size)
        hidden = add_lora(lora[1], attn, linear(attn, w["o"], layer.o), lora_slots)
        hidden, residual = rms_norm(hidden, w["post_attention_norm"], s.rms_norm_eps, residual)
        if layer.experts is not None:
            hidden = mixture_of_experts(s, w, layer, hidden)
            continue
        act = silu_and_mul(add_lora(lora[2], hidden, linear(hidden, w["gate_up"], layer.gate_up),
                                    lora_slots))
        hidden = add_lora(lora[3], act, linear(act, w["down"], layer.down), lora_slots)
    return hidden, residual


def mixture_of_experts(s: DecoderShape, w: dict, layer: DecoderLayerWeights,
                       x: torch.Tensor) -> torch.Tensor:
    """The runtime's SparseMoE, op by op: route, group the (row, choice) pairs by expert,
    each expert's gated MLP over its rows, mix in fp32."""
    weights, experts = route_experts(linear(x, w["router"], layer.router), s.top_k,
                                     s.normalize_top_k)
    order = experts.flatten().argsort(stable=True)
    counts = torch.bincount(experts.flatten(), minlength=s.num_experts).tolist()
    inputs, outputs, start = x.index_select(0, order // s.top_k), [], 0
    for e, count in enumerate(counts):
        if count:
            rows = inputs[start:start + count]
            gate_up, down = layer.experts[e]
            act = silu_and_mul(linear(rows, w["experts"][e][0], gate_up))
            outputs.append(linear(act, w["experts"][e][1], down))
        start += count
    per_choice = torch.cat(outputs).index_select(0, order.argsort())
    mixed = per_choice.view(*experts.shape, -1) * weights.unsqueeze(-1)
    return mixed.sum(dim=1).to(x.dtype)


def with_experts(stack: Stack, layers: list[int], gen: torch.Generator,
                 weight_format: WeightFormat) -> Stack:
    """The stack with the MLPs of ``layers`` made mixtures of the shape's experts (the router
    packed as a dense weight: MKL's where the others are, else panels)."""
    s, pack = stack.shape, PACKS[weight_format]
    pack_router = mkl_pack if weight_format == WeightFormat.MKL_PACKED else pack_weight
    h, inner = s.hidden_size, s.expert_intermediate_size
    for i in layers:
        w = stack.weights[i]
        w["router"] = torch.randn(s.num_experts, h, generator=gen)
        w["experts"] = [(torch.randn(2 * inner, h, generator=gen) * h**-0.5,
                         torch.randn(h, inner, generator=gen) * inner**-0.5)
                        for _ in range(s.num_experts)]
        stack.layers[i] = dataclasses.replace(
            stack.layers[i], gate_up=None, down=None, router=pack_router(w["router"]),
            experts=[(pack(gate_up), pack(down)) for gate_up, down in w["experts"]])
    return stack


SMOLLM2 = DecoderShape(hidden_size=576, intermediate_size=1536, num_heads=9, num_kv_heads=3,
                       head_dim=64, rms_norm_eps=1e-5)


@pytest.mark.parametrize("weight_format",
                         [WeightFormat.PANELS, WeightFormat.MKL_PACKED, WeightFormat.QUANTIZED])
@pytest.mark.parametrize("shape, bias, block_size", [
    (SMOLLM2, False, 16),
    (DecoderShape(64, 96, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6), True, 1),
    (DecoderShape(128, 160, num_heads=2, num_kv_heads=2, head_dim=64, rms_norm_eps=1e-6,
                  sliding_window=7), False, 32),
    (DecoderShape(256, 512, num_heads=8, num_kv_heads=1, head_dim=128, rms_norm_eps=1e-6),
     True, 16),
])
def test_bit_identical_to_the_ops_one_by_one(cpu_tier, shape, bias, block_size, weight_format):
    gen = torch.Generator().manual_seed(0)
    num_blocks = 200
    stack = make_stack(shape, 3, num_blocks, block_size, bias, gen, weight_format)
    step = make_step(shape, [1, 5, 16, 17, 40, 3, 64, 2], num_blocks, block_size, gen)
    caches = [(layer.k_cache.clone(), layer.v_cache.clone()) for layer in stack.layers]
    expected = one_by_one(stack, step, caches)
    hidden_before = step.hidden.clone()
    decoder = FusedDecoder(shape, stack.layers)
    assert decoder.weight_format == weight_format
    actual = decoder(*step.args())
    assert torch.equal(actual[0], expected[0]) and torch.equal(actual[1], expected[1])
    for layer, (k_cache, v_cache) in zip(stack.layers, caches, strict=True):
        assert torch.equal(layer.k_cache, k_cache) and torch.equal(layer.v_cache, v_cache)
    assert torch.equal(step.hidden, hidden_before)  # the input is not written


@pytest.mark.parametrize("weight_format",
                         [WeightFormat.PANELS, WeightFormat.MKL_PACKED, WeightFormat.QUANTIZED])
@pytest.mark.parametrize("top_k, normalize", [(1, True), (2, True), (3, False)])
def test_experts_bit_identical_to_the_ops_one_by_one(cpu_tier, weight_format, top_k, normalize):
    """Layers 0 and 2 mixtures of 5 experts (an expert may get no row), layer 1 a gated MLP."""
    gen = torch.Generator().manual_seed(top_k)
    shape = DecoderShape(96, 64, num_heads=4, num_kv_heads=2, head_dim=24, rms_norm_eps=1e-6,
                         num_experts=5, top_k=top_k, normalize_top_k=normalize,
                         expert_intermediate_size=32)
    stack = with_experts(make_stack(shape, 3, 64, 8, False, gen, weight_format), [0, 2], gen,
                         weight_format)
    step = make_step(shape, [1, 5, 16, 17, 40, 3], 64, 8, gen)
    caches = [(layer.k_cache.clone(), layer.v_cache.clone()) for layer in stack.layers]
    expected = one_by_one(stack, step, caches)
    actual = FusedDecoder(shape, stack.layers)(*step.args())
    assert torch.equal(actual[0], expected[0]) and torch.equal(actual[1], expected[1])


def test_int8_activations_as_the_ops_one_by_one(cpu_tier):
    """The 4-bit weights of a low-bit stack (q/k/v and gate/up here) multiplied with int8
    activations: the stack gives the bits of packed_linear layer by layer."""
    gen = torch.Generator().manual_seed(2)
    stack = make_stack(SMOLLM2, 2, 100, 16, False, gen, WeightFormat.QUANTIZED)
    step = make_step(SMOLLM2, [1, 5, 16, 17, 40, 3, 64, 2], 100, 16, gen)
    caches = [(layer.k_cache.clone(), layer.v_cache.clone()) for layer in stack.layers]
    fp32 = one_by_one(stack, step, [(k.clone(), v.clone()) for k, v in caches])
    for layer in stack.layers:
        layer.qkv = layer.qkv.with_int8_activations()
        layer.gate_up = layer.gate_up.with_int8_activations()
    expected = one_by_one(stack, step, caches)
    assert not torch.equal(fp32[0], expected[0])  # the rounding shows
    actual = FusedDecoder(SMOLLM2, stack.layers)(*step.args())
    assert torch.equal(actual[0], expected[0]) and torch.equal(actual[1], expected[1])


@pytest.mark.parametrize("weight_format", [WeightFormat.PANELS, WeightFormat.QUANTIZED,
                                           WeightFormat.BF16])
def test_lora_deltas_as_the_ops_one_by_one(cpu_tier, weight_format):
    """Adapters in 3 slots on every projection, rows of every slot and of none: bit-identical
    to the ops one by one (fp32), within bf16 rounding in bf16."""
    gen = torch.Generator().manual_seed(1)
    shape, rank, num_slots = SMOLLM2, 8, 3
    stack = make_stack(shape, 2, 100, 16, False, gen, weight_format)
    dtype = stack.layers[0].input_norm.dtype
    q, kv = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    inter, hidden = shape.intermediate_size, shape.hidden_size
    projections = [(hidden, [q, kv, kv]), (q, [hidden]), (hidden, [inter, inter]),
                   (inter, [hidden])]

    def adapter(in_features: int, sizes: list[int]) -> LoRAWeights:
        a = torch.randn(num_slots, len(sizes) * rank, in_features, generator=gen) * 0.1
        b = [torch.randn(num_slots, n, rank, generator=gen) * 0.1 for n in sizes]
        return LoRAWeights(a.to(dtype), [t.to(dtype) for t in b])

    for layer in stack.layers:
        layer.lora = tuple(adapter(*p) for p in projections)
    step = make_step(shape, [1, 5, 16, 17, 40, 3, 64, 2], 100, 16, gen, dtype=dtype)
    slots = torch.tensor([0, -1, 2, 1, 0, -1, 2, 1], dtype=torch.int32)
    caches = [(layer.k_cache.clone(), layer.v_cache.clone()) for layer in stack.layers]
    expected = one_by_one(stack, step, caches, slots)
    decoder = FusedDecoder(shape, stack.layers)
    assert decoder.has_lora
    actual = decoder(*step.args(), slots)
    plain = one_by_one(stack, step, [(k.clone(), v.clone()) for k, v in caches])
    assert not torch.equal(plain[0], expected[0])  # the adapters change the output
    if dtype == torch.float32:
        assert torch.equal(actual[0], expected[0]) and torch.equal(actual[1], expected[1])
    else:
        assert relative_error(actual[0], expected[0]) < 2e-2
    with pytest.raises(KernelInputError, match=r"lora_slots must lie in \[-1, 3\)"):
        decoder(*step.args(), torch.full((8,), 3, dtype=torch.int32))


def test_negative_slots_skip_the_write_and_no_rows_is_a_no_op():
    gen = torch.Generator().manual_seed(1)
    shape = DecoderShape(64, 64, num_heads=2, num_kv_heads=1, head_dim=32, rms_norm_eps=1e-6)
    stack = make_stack(shape, 2, 8, 4, False, gen)
    decoder = FusedDecoder(shape, stack.layers)
    step = make_step(shape, [3, 6], 8, 4, gen)
    step.slot_mapping[1] = -1
    caches = [(layer.k_cache.clone(), layer.v_cache.clone()) for layer in stack.layers]
    expected = one_by_one(stack, step, caches)
    actual = decoder(*step.args())
    assert torch.equal(actual[0], expected[0])
    for layer, (k_cache, _) in zip(stack.layers, caches, strict=True):
        assert torch.equal(layer.k_cache, k_cache)
    empty = make_step(shape, [3], 8, 4, gen)
    hidden, residual = decoder(empty.hidden[:0], empty.cos[:0], empty.sin[:0],
                               empty.slot_mapping[:0], empty.block_tables[:0],
                               empty.seq_lens[:0], empty.query_start_loc[:1])
    assert hidden.shape == residual.shape == (0, 64)


def test_a_slot_past_the_cache_is_refused_and_nothing_is_written():
    gen = torch.Generator().manual_seed(2)
    shape = DecoderShape(64, 64, num_heads=2, num_kv_heads=1, head_dim=32, rms_norm_eps=1e-6)
    stack = make_stack(shape, 2, 8, 4, False, gen)
    step = make_step(shape, [3, 6], 8, 4, gen)
    step.slot_mapping[1] = 8 * 4
    before = [layer.k_cache.clone() for layer in stack.layers]
    with pytest.raises(KernelInputError, match=r"slot_mapping\[1\] = 32 is outside the cache"):
        FusedDecoder(shape, stack.layers)(*step.args())
    assert all(torch.equal(layer.k_cache, b) for layer, b in zip(stack.layers, before, strict=True))


def test_bad_inputs_are_named():
    gen = torch.Generator().manual_seed(3)
    shape = DecoderShape(64, 64, num_heads=2, num_kv_heads=1, head_dim=32, rms_norm_eps=1e-6)
    stack = make_stack(shape, 1, 8, 4, False, gen)
    layer = stack.layers[0]

    def with_(**changes) -> list[DecoderLayerWeights]:
        return [DecoderLayerWeights(**{**vars(layer), **changes})]

    with pytest.raises(KernelInputError, match="_mkl_reorder_linear_weight"):
        FusedDecoder(shape, with_(qkv=stack.weights[0]["qkv"]))
    with pytest.raises(KernelInputError, match="all fp32 PackedWeight"):  # a mix of formats
        FusedDecoder(shape, with_(qkv=mkl_pack(stack.weights[0]["qkv"])))
    with pytest.raises(KernelInputError, match="all fp32 PackedWeight"):
        FusedDecoder(shape, with_(o=pack_weight(stack.weights[0]["o"].bfloat16())))
    with pytest.raises(KernelInputError, match=r"o must be \[out, in\] = \[64, 64\], got \[64, 48\]"):
        FusedDecoder(shape, with_(o=pack_weight(stack.weights[0]["o"][:, :48])))
    with pytest.raises(KernelInputError, match="all fp32 PackedWeight"):  # low-bit and fp32
        FusedDecoder(shape, with_(o=pack_quantized(stack.weights[0]["o"])))
    mkl_layer = make_stack(shape, 1, 8, 4, False, gen, WeightFormat.MKL_PACKED).layers[0]
    with pytest.raises(KernelInputError, match="layer 1: its weights are not PANELS"):
        FusedDecoder(shape, [layer, mkl_layer])
    low_bit = make_stack(shape, 1, 8, 4, False, gen, WeightFormat.QUANTIZED).layers[0]
    broken = dataclasses.replace(low_bit.o, scales=low_bit.o.scales[:, :1].contiguous())
    with pytest.raises(KernelInputError, match="packed.scales must be contiguous fp16 or fp32"):
        FusedDecoder(shape, [DecoderLayerWeights(**{**vars(low_bit), "o": broken})])
    with pytest.raises(KernelInputError, match="KV caches must be"):
        FusedDecoder(shape, with_(v_cache=layer.v_cache[:, :2].clone()))
    with pytest.raises(KernelInputError, match="at least one layer"):
        FusedDecoder(shape, [])
    step = make_step(shape, [3, 6], 8, 4, gen)
    with pytest.raises(KernelInputError, match="one token per sequence"):
        FusedDecoder(shape, stack.layers)(step.hidden[:1], *step.args()[1:])


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).norm() / expected.float().norm())


@pytest.mark.parametrize("shape, bias", [
    (SMOLLM2, False),
    (DecoderShape(64, 96, num_heads=4, num_kv_heads=2, head_dim=16, rms_norm_eps=1e-6,
                  sliding_window=5), True),
])
def test_bf16_agrees_to_bf16_rounding(cpu_tier, shape, bias):
    gen = torch.Generator().manual_seed(4)
    stack = make_stack(shape, 3, 200, 16, bias, gen, WeightFormat.BF16)
    step = make_step(shape, [1, 5, 16, 17, 40, 3, 64, 2], 200, 16, gen, dtype=torch.bfloat16)
    caches = [(layer.k_cache.clone(), layer.v_cache.clone()) for layer in stack.layers]
    expected = one_by_one(stack, step, caches)
    actual = FusedDecoder(shape, stack.layers)(*step.args())
    assert actual[0].dtype == actual[1].dtype == torch.bfloat16
    # bf16 keeps 8 bits: one rounding is up to 0.4% relative; three layers of GEMMs whose
    # sums round differently stay well within 2%.
    assert relative_error(actual[0], expected[0]) < 2e-2
    assert relative_error(actual[1], expected[1]) < 2e-2
    for layer, (k_cache, v_cache) in zip(stack.layers, caches, strict=True):
        assert relative_error(layer.k_cache, k_cache) < 2e-2
        assert relative_error(layer.v_cache, v_cache) < 2e-2
