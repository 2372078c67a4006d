"""Linear layers whose weight format is delegated to a quantization method.

A ``Linear`` may stack several logical projections along its output (q/k/v, gate/up): each
is a *shard* loaded separately from the checkpoint. How the weight is stored and multiplied
is the ``LinearMethod``'s business, so that low-bit methods (AWQ, GPTQ, GGUF blocks: see
``layers.quantization``) can replace the dense one without touching the models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from kvpage_runtime.distributed.parallel import TensorParallel
from kvpage_runtime.errors import ModelLoadError
from kvpage_runtime.layers.packed_gemm import pack_linear_weight
from kvpage_runtime.layers.weight_copy import copy_weight


class LinearMethod(Protocol):
    """How a ``Linear`` stores and applies its weight.

    ``tensor_names`` are the checkpoint tensors every shard has ("weight" for a dense layer;
    "qweight", "qzeros", "scales" for AWQ); ``ignored_names`` are tensors a checkpoint may
    carry that the method does not need (they are accepted and dropped).
    """

    tensor_names: tuple[str, ...]
    ignored_names: tuple[str, ...]

    def create_weights(
        self, layer: Linear, input_size: int, output_size: int, dtype: torch.dtype, device
    ) -> None:
        """Register the layer's weight parameters (uninitialized)."""

    def load_shard(self, layer: Linear, name: str, tensor: torch.Tensor, shard: int) -> None:
        """Take checkpoint tensor ``name`` (one of ``tensor_names``) of shard ``shard``: the
        whole tensor, of which a tensor-parallel layer keeps its slice (``layer.parallel``)."""

    def process_weights_after_loading(self, layer: Linear) -> None:
        """Final layout for the device, once the weights are loaded, cast and placed."""

    def apply(self, layer: Linear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ W.T + bias``."""

    def embedding(self, layer: Linear, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of W (the layer is an embedding table), in the model dtype."""

    def packed_state(self, layer: Linear) -> dict[str, torch.Tensor]:
        """Tensors beyond the layer's parameters that hold its weight once processed (what a
        converted-model cache stores); empty where the parameters are the whole weight."""

    def adopt_packed_state(self, layer: Linear, state: dict[str, torch.Tensor]) -> None:
        """Take the weight from ``packed_state``'s tensors instead of loading a checkpoint."""


class UnquantizedLinearMethod:
    """Dense weight [output_size, input_size] in the model dtype, packed for the CPU's GEMM
    library where that is faster (see ``packed_gemm``)."""

    tensor_names = ("weight",)
    ignored_names = ()

    def create_weights(
        self, layer: Linear, input_size: int, output_size: int, dtype: torch.dtype, device
    ) -> None:
        weight = torch.empty(output_size, input_size, dtype=dtype, device=device)
        layer.weight = nn.Parameter(weight, requires_grad=False)
        layer.packed = None  # set by process_weights_after_loading where packing pays

    def load_shard(self, layer: Linear, name: str, tensor: torch.Tensor, shard: int) -> None:
        offset, size = layer.shard_offsets[shard], layer.output_sizes[shard]
        copy_weight(layer.weight.data[offset : offset + size], layer.rank_slice(tensor, shard),
                    f"{name} shard {shard}")

    def process_weights_after_loading(self, layer: Linear) -> None:
        layer.packed = pack_linear_weight(layer.weight)

    def apply(self, layer: Linear, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if layer.packed is not None:
            return layer.packed(x, bias)
        return F.linear(x, layer.weight, bias)

    def embedding(self, layer: Linear, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, layer.weight)

    def packed_state(self, layer: Linear) -> dict[str, torch.Tensor]:
        return {}

    def adopt_packed_state(self, layer: Linear, state: dict[str, torch.Tensor]) -> None:
        """Nothing to adopt: the weight is a parameter (restored with the state dict)."""


DENSE = UnquantizedLinearMethod()


@dataclass(frozen=True)
class Parallel:
    """A tensor-parallel layer's slice of the checkpoint's weight [out, in].

    ``dim`` 0 (column parallel): of shard i's ``totals[i]`` output rows, the layer holds
    ``output_sizes[i]`` from ``starts[i]``. ``dim`` 1 (row parallel): of the ``totals[0]``
    inputs, the layer holds ``input_size`` from ``starts[0]``; its output is a partial sum,
    summed over the ranks by an all-reduce unless ``reduce`` is False (a block that sums
    several layers' outputs reduces once, itself). The bias of a row-parallel layer is added
    once, after the sum.
    """

    tp: TensorParallel
    dim: int
    starts: tuple[int, ...]
    totals: tuple[int, ...]
    reduce: bool = True

    @classmethod
    def column(cls, tp: TensorParallel, parts: Sequence[tuple[int, int]]) -> Parallel | None:
        """Column parallel, shard i's rows from ``parts[i] = (start, total)``; None for a
        single rank."""
        if tp.size == 1:
            return None
        return cls(tp, 0, tuple(p[0] for p in parts), tuple(p[1] for p in parts))

    @classmethod
    def row(cls, tp: TensorParallel, start: int, total: int, reduce: bool = True
            ) -> Parallel | None:
        """Row parallel, inputs from ``start`` of ``total``; None for a single rank."""
        return None if tp.size == 1 else cls(tp, 1, (start,), (total,), reduce)


def checkpoint_parts(name: str, stacked: dict[str, tuple[str, int]]) -> list[str]:
    """The checkpoint modules layer ``name`` holds, by shard: ``stacked`` maps a checkpoint
    projection (``q_proj``) to the fused layer holding it and its shard (``("qkv_proj", 0)``),
    so ``...self_attn.qkv_proj`` holds ``...self_attn.q_proj``, ``k_proj`` and ``v_proj``."""
    parent, dot, leaf = name.rpartition(".")
    parts = sorted((shard, part) for part, (fused, shard) in stacked.items() if fused == leaf)
    return [f"{parent}{dot}{part}" for _, part in parts] or [name]


class Linear(nn.Module):
    """y = x W^T (+ b), W stacking ``output_sizes`` shards along the output dimension."""

    def __init__(
        self,
        input_size: int,
        output_sizes: Sequence[int],
        *,
        bias: bool = False,
        dtype: torch.dtype = torch.float32,
        device=None,
        method: LinearMethod | None = None,
        parallel: Parallel | None = None,
    ) -> None:
        super().__init__()
        self.parallel = parallel
        self.input_size = input_size
        self.output_sizes = list(output_sizes)
        self.output_size = sum(self.output_sizes)
        self.shard_offsets = [sum(self.output_sizes[:i]) for i in range(len(self.output_sizes))]
        self.method = method or DENSE
        self.method.create_weights(self, input_size, self.output_size, dtype, device)
        self.bias = (
            nn.Parameter(
                torch.empty(self.output_size, dtype=dtype, device=device), requires_grad=False
            )
            if bias
            else None
        )
        self.lora = None  # a lora.layers.LoRALayer where the engine serves adapters

    def tensor_names(self) -> tuple[str, ...]:
        """The checkpoint tensors each shard loads (the method's, and "bias" if it has one)."""
        return self.method.tensor_names + (("bias",) if self.bias is not None else ())

    def accepts(self, name: str) -> bool:
        return name in self.tensor_names() or name in self.method.ignored_names

    def load(self, name: str, tensor: torch.Tensor, shard: int = 0) -> None:
        """Load checkpoint tensor ``name`` (one the layer ``accepts``) for one shard."""
        if name == "bias":
            offset, size = self.shard_offsets[shard], self.output_sizes[shard]
            if self.parallel is not None and self.parallel.dim == 0:
                tensor = self.rank_slice(tensor, shard)
            copy_weight(self.bias.data[offset : offset + size], tensor, f"bias shard {shard}")
        else:
            self.method.load_shard(self, name, tensor, shard)

    def checkpoint_shape(self, shard: int) -> tuple[int, int]:
        """Shard ``shard``'s whole weight (out, in) in the checkpoint, before any split."""
        split = self.parallel
        out, inputs = self.output_sizes[shard], self.input_size
        if split is None:
            return out, inputs
        return (split.totals[shard], inputs) if split.dim == 0 else (out, split.totals[0])

    def rank_slice(self, tensor: torch.Tensor, shard: int) -> torch.Tensor:
        """This rank's slice of shard ``shard``'s whole checkpoint weight [out, in] (a tensor,
        or a low-bit ``QuantizedWeight``) or bias [out] of a column-parallel layer; the weight
        itself where the layer is not split."""
        split = self.parallel
        if split is None:
            return tensor
        index = shard if split.dim == 0 else 0
        size = self.output_sizes[shard] if split.dim == 0 else self.input_size
        if tensor.shape[split.dim] != split.totals[index]:
            side = "outputs" if split.dim == 0 else "inputs"
            raise ModelLoadError(
                f"checkpoint tensor of shape {tuple(tensor.shape)} has "
                f"{tensor.shape[split.dim]} {side}, the model expects {split.totals[index]}")
        return tensor.narrow(split.dim, split.starts[index], size)

    def pack_weights(self) -> None:
        self.method.process_weights_after_loading(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.parallel is not None and self.parallel.dim == 1:
            return self._row_parallel(x)
        y = self.method.apply(self, x, self.bias)
        if self.lora is not None:
            self.lora.add(x, y)
        return y

    def _row_parallel(self, x: torch.Tensor) -> torch.Tensor:
        y = self.method.apply(self, x, None)
        if self.parallel.reduce:
            self.parallel.tp.all_reduce(y)
        return y if self.bias is None else y + self.bias
