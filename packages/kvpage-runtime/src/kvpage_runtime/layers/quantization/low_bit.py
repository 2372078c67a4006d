"""The linear method of low-bit weights, whatever checkpoint format they come in.

Each shard's checkpoint tensors are collected as they arrive and converted, once all are
there, into kvpage's one low-bit form (``kvpage_kernels.QuantizedWeight``) by the format's
converter (``formats``); once a layer's shards are all converted, they are stacked (q/k/v,
gate/up) and packed by ``kvpage_kernels.pack_weight`` into ``QuantizedPanels``, which stay
low-bit in memory and which ``packed_linear`` multiplies by (and ``embedding_rows`` looks rows
up in). The formats differ only in their tensor names and converter: a ``LowBitFormat`` each.
"""

from __future__ import annotations

import logging
from typing import Protocol

import torch
from kvpage_kernels import (
    KernelInputError,
    QuantizedPanels,
    QuantizedWeight,
    bf16_dot_rows,
    embedding_rows,
    pack_weight,
    packed_linear,
)

from kvpage_runtime.errors import ModelLoadError
from kvpage_runtime.layers.linear import Linear
from kvpage_runtime.layers.quantization.formats import QuantizationFormatError

logger = logging.getLogger(__name__)

_PACKED_FIELDS = ("codes", "scales", "offsets", "input_order")  # the tensors of QuantizedPanels


class LowBitFormat(Protocol):
    """A checkpoint format of low-bit linear weights (AWQ, GPTQ, GGUF blocks)."""

    tensor_names: tuple[str, ...]  # the tensors of one shard, all needed to convert it
    ignored_names: tuple[str, ...]  # tensors a checkpoint may carry that are not needed

    def convert(
        self, tensors: dict[str, torch.Tensor], shard: int, shape: tuple[int, int]
    ) -> QuantizedWeight:
        """Shard ``shard``'s tensors as a weight of ``shape`` (out_features, in_features)."""


class LowBitLinearMethod:
    """Low-bit weights, in ``format``, of the layer named ``layer_name`` whose shards are the
    checkpoint modules ``parts`` (errors name them)."""

    def __init__(self, format: LowBitFormat, layer_name: str, parts: list[str]) -> None:
        self.format = format
        self.layer_name = layer_name
        self.parts = parts
        self.tensor_names = format.tensor_names
        self.ignored_names = format.ignored_names

    def create_weights(
        self, layer: Linear, input_size: int, output_size: int, dtype: torch.dtype, device
    ) -> None:
        num_shards = len(layer.output_sizes)
        layer.checkpoint_tensors = [{} for _ in range(num_shards)]  # until a shard converts
        layer.shards = [None] * num_shards  # QuantizedWeight of each shard, until packed
        layer.packed = None  # QuantizedPanels of the stacked shards
        layer.dtype = dtype  # of embedding lookups
        layer.device = torch.device(device or "cpu")
        layer.bf16_dot_rows = bf16_dot_rows(layer.device)  # chosen once, as the backend

    def load_shard(self, layer: Linear, name: str, tensor: torch.Tensor, shard: int) -> None:
        if name in self.ignored_names:
            return
        tensors = layer.checkpoint_tensors[shard]
        tensors[name] = tensor
        if tensors.keys() == set(self.tensor_names):
            layer.shards[shard] = self._convert(layer, tensors, shard)
            layer.checkpoint_tensors[shard] = {}
            if all(s is not None for s in layer.shards):
                self._pack(layer)

    def _convert(
        self, layer: Linear, tensors: dict[str, torch.Tensor], shard: int
    ) -> QuantizedWeight:
        """The shard's whole weight converted, then (tensor parallel) this rank's slice."""
        shape = layer.checkpoint_shape(shard)
        try:
            weight = self.format.convert(tensors, shard, shape)
        except QuantizationFormatError as e:
            raise QuantizationFormatError(f"{self.parts[shard]}: {e}") from e
        if weight.shape != shape:
            raise QuantizationFormatError(
                f"{self.parts[shard]}: its tensors hold a {weight.out_features} x "
                f"{weight.in_features} weight, the model expects {shape[0]} x {shape[1]}")
        try:
            return layer.rank_slice(weight, shard)
        except KernelInputError as e:
            raise QuantizationFormatError(
                f"{self.parts[shard]} cannot be split for tensor parallelism: {e}") from e

    def _pack(self, layer: Linear) -> None:
        """Stack the shards and pack them, as soon as the last one is converted (so that the
        layer holds one form at a time)."""
        try:
            weight = QuantizedWeight.stack(layer.shards)
            layer.packed = pack_weight(_on_device(weight, layer.device))
        except KernelInputError as e:
            raise QuantizationFormatError(f"{self.layer_name}: {e}") from e
        layer.shards = [None] * len(layer.shards)

    def process_weights_after_loading(self, layer: Linear) -> None:
        """Nothing left to do: the weight was packed as its last shard arrived."""

    def apply(self, layer: Linear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``packed_linear``, giving activations of another dtype back in theirs. bf16/fp16
        activations go in as they are on a GPU (its kernel multiplies them on tensor cores, the
        weights rounded to their dtype, summing in fp32), and bf16 ones on a CPU with
        AVX512-BF16 from as many rows as its dot products need to be faster (then likewise);
        otherwise they are computed on in fp32 (with the weights in fp32: in bf16, a row's
        result may differ by that rounding with the size of its batch)."""
        rows = x.reshape(-1, x.shape[-1])
        dot_rows = layer.bf16_dot_rows
        if not (rows.is_cuda or (rows.dtype == torch.bfloat16 and dot_rows is not None
                                 and rows.shape[0] >= dot_rows)):
            rows = rows.float()
        out = packed_linear(rows, layer.packed, None if bias is None else bias.float())
        return out.view(*x.shape[:-1], out.shape[-1]).to(x.dtype)

    def embedding(self, layer: Linear, ids: torch.Tensor) -> torch.Tensor:
        return embedding_rows(layer.packed, ids.reshape(-1)).to(layer.dtype).view(
            *ids.shape, layer.input_size)

    def packed_state(self, layer: Linear) -> dict[str, torch.Tensor]:
        tensors = {name: getattr(layer.packed, name) for name in _PACKED_FIELDS}
        return {name: t for name, t in tensors.items() if t is not None}

    def adopt_packed_state(self, layer: Linear, state: dict[str, torch.Tensor]) -> None:
        """Rebuild the packed weight; bits and group size follow from the tensors' shapes."""
        codes, scales = state["codes"], state["scales"]
        bits = 32 * codes.shape[1] // layer.input_size
        layer.packed = QuantizedPanels(
            codes, scales, state["offsets"], bits, layer.input_size // scales.shape[1],
            state.get("input_order"), layer.output_size, layer.input_size)


def _on_device(weight: QuantizedWeight, device: torch.device) -> QuantizedWeight:
    if weight.codes.device == device:
        return weight
    order = None if weight.input_order is None else weight.input_order.to(device)
    return QuantizedWeight(weight.codes.to(device), weight.scales.to(device),
                           weight.offsets.to(device), weight.bits, weight.group_size, order)


def use_int8_activations(model: torch.nn.Module) -> int:
    """Switches every 4-bit layer of ``model`` to int8 activations (``QuantizedPanels.
    with_int8_activations``: x rounded in blocks of 32 inputs, the products summed in integers
    on the CPU, as llama.cpp multiplies); 8-bit layers keep fp32 activations. Returns the
    number of layers switched, and raises ``ModelLoadError`` when there is none."""
    switched = kept = 0
    for module in model.modules():
        if not (isinstance(getattr(module, "method", None), LowBitLinearMethod)
                and isinstance(getattr(module, "packed", None), QuantizedPanels)):
            continue
        if module.packed.bits == 4:
            module.packed = module.packed.with_int8_activations()
            switched += 1
        else:
            kept += 1
    if not switched:
        raise ModelLoadError("int8 activations apply to 4-bit weights (AWQ, GPTQ, GGUF Q4_0 and "
                             "Q4_1), and this model has none")
    logger.info("int8 activations for %d 4-bit layers (%d 8-bit layers keep fp32 ones)",
                switched, kept)
    return switched
