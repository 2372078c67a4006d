"""LoRAManager: which adapters the engine knows, which are loaded, which sit in the slots.

Three tiers, as in vLLM: adapters *registered* (their LoRARequest, unbounded), *loaded* in
host memory (an LRU of ``max_cpu_loras``, read from disk again when evicted) and *active* in
the ``max_loras`` slots of every LoRA layer (an LRU too: a slot is reused by the adapter
that needs it, never while its adapter is in the step being prepared; the scheduler never
puts more than ``max_loras`` adapters in one step).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from kvpage_runtime.errors import EngineConfigError, LoRAAdapterError
from kvpage_runtime.layers.linear import Linear, checkpoint_parts
from kvpage_runtime.lora.adapter import LoRAAdapter, load_adapter
from kvpage_runtime.lora.layers import LoRABatch, LoRALayer
from kvpage_runtime.lora.request import LoRARequest

logger = logging.getLogger("kvpage_runtime")
# the runtime layers adapters may target, by their last name
ADAPTABLE = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


class LoRAManager:
    def __init__(self, model: nn.Module, max_loras: int, max_lora_rank: int,
                 max_cpu_loras: int | None, dtype: torch.dtype, device: torch.device):
        if max_loras < 1 or max_lora_rank < 1:
            raise EngineConfigError(f"max_loras and max_lora_rank must be >= 1, got {max_loras} "
                                    f"and {max_lora_rank}")
        if max_cpu_loras is not None and max_cpu_loras < max_loras:
            raise EngineConfigError(f"max_cpu_loras ({max_cpu_loras}) must be >= max_loras "
                                    f"({max_loras})")
        self.max_loras = max_loras
        self.max_rank = max_lora_rank
        self.max_cpu_loras = max_cpu_loras or max_loras
        self.dtype = dtype
        self.batch = LoRABatch()
        self.layers: dict[str, LoRALayer] = {}
        self.targets: dict[str, tuple[str, int]] = {}
        self._attach(model, device)
        self.registered: dict[int, LoRARequest] = {}  # what the engine lists
        self._known: dict[int, LoRARequest] = {}  # also removed ones, for requests in flight
        self._loaded: OrderedDict[int, LoRAAdapter] = OrderedDict()
        self._slots: OrderedDict[int, int] = OrderedDict()  # adapter id -> slot, LRU first

    def _attach(self, model: nn.Module, device: torch.device) -> None:
        """A LoRALayer on each adaptable Linear of the decoder layers (not Mixtral's experts,
        whose projections PEFT does not reach as linear layers)."""
        stacked = getattr(model, "stacked_params", {})
        for path, module in model.named_modules():
            leaf = path.rpartition(".")[2]
            if not isinstance(module, Linear) or leaf not in ADAPTABLE or ".experts." in path:
                continue
            layer = LoRALayer(path, module, self.max_loras, self.max_rank, self.dtype, device,
                              self.batch)
            module.lora = layer
            self.layers[path] = layer
            for shard, part in enumerate(checkpoint_parts(path, stacked)):
                self.targets[part] = (path, shard)

    # ---- registry --------------------------------------------------------------------------

    def register(self, request: LoRARequest) -> None:
        """Knows ``request`` from now on (loading it now, so a bad adapter fails here)."""
        known = self._known.get(request.lora_int_id)
        if known is not None and known != request:  # its KV may still be in the prefix cache
            raise LoRAAdapterError(f"lora_int_id {request.lora_int_id} is already adapter "
                                   f"{known.lora_name!r} at {known.lora_path!r} (ids are not "
                                   "reused, even once an adapter is removed)")
        previous = self._known.get(request.lora_int_id)
        self._known[request.lora_int_id] = request
        try:
            self._adapter(request.lora_int_id)
        except LoRAAdapterError:
            self._known.pop(request.lora_int_id)
            if previous is not None:
                self._known[request.lora_int_id] = previous
            raise
        self.registered[request.lora_int_id] = request

    def remove(self, lora_int_id: int) -> bool:
        """Unlists an adapter; False if it was not listed. Requests already queued or running
        with it finish with it (it stays loadable for them; its slot and host copy go the
        way of the least recently used)."""
        return self.registered.pop(lora_int_id, None) is not None

    def _adapter(self, lora_int_id: int) -> LoRAAdapter:
        adapter = self._loaded.get(lora_int_id)
        if adapter is None:
            adapter = load_adapter(self._known[lora_int_id], self.targets, self.max_rank,
                                   self.dtype)
            for (path, shard), (a, b) in adapter.weights.items():
                self.layers[path].check(shard, a, b, adapter.request.lora_name)
            self._loaded[lora_int_id] = adapter
            if len(self._loaded) > self.max_cpu_loras:
                self._loaded.popitem(last=False)
        self._loaded.move_to_end(lora_int_id)
        return adapter

    # ---- a step ----------------------------------------------------------------------------

    def bind(self, seq_adapters: list[int | None], q_lens: np.ndarray) -> np.ndarray | None:
        """Puts the step's adapters in slots; returns each token's slot (int32, -1 for
        tokens of base-model requests), or None when the step has no adapter at all."""
        ids = {i for i in seq_adapters if i is not None}
        if not ids:
            return None
        slot_of = self._activate(ids)
        per_seq = np.fromiter((-1 if i is None else slot_of[i] for i in seq_adapters),
                              dtype=np.int32, count=len(seq_adapters))
        return np.repeat(per_seq, q_lens)

    def _activate(self, ids: Iterable[int]) -> dict[int, int]:
        ids = set(ids)
        if len(ids) > self.max_loras:
            raise LoRAAdapterError(f"{len(ids)} adapters in one step, max_loras is "
                                   f"{self.max_loras}")
        free = [s for s in range(self.max_loras) if s not in self._slots.values()]
        for lora_int_id in ids:
            if lora_int_id in self._slots:
                self._slots.move_to_end(lora_int_id)
                continue
            if not free:  # the least recently used slot not needed now
                victim = next(i for i in self._slots if i not in ids)
                free.append(self._slots.pop(victim))
            slot = free.pop()
            self._load_slot(slot, self._adapter(lora_int_id))
            self._slots[lora_int_id] = slot
        return {i: self._slots[i] for i in ids}

    def _load_slot(self, slot: int, adapter: LoRAAdapter) -> None:
        by_layer: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        for (path, shard), pair in adapter.weights.items():
            by_layer.setdefault(path, {})[shard] = pair
        for path, layer in self.layers.items():
            layer.set_slot(slot, by_layer.get(path, {}))
        logger.info("LoRA adapter %r (id %d, rank %d) loaded into slot %d", adapter.request.lora_name,
                    adapter.request.lora_int_id, adapter.rank, slot)
