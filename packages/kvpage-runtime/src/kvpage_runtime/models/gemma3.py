"""Gemma 3's multimodal checkpoints (``Gemma3ForConditionalGeneration``: 4B and larger) served
as the text model they hold: the language model's tensors under their Llama-family names; the
vision tower and its projector are not loaded, so prompts are text only."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import torch

from kvpage_runtime.models.llama import LlamaForCausalLM

# where checkpoints keep the language model (older and newer transformers), and its names here
_LANGUAGE_MODEL = (("language_model.model.", "model."), ("model.language_model.", "model."),
                   ("language_model.lm_head.", "lm_head."))
_VISION = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
           "model.multi_modal_projector.")
logger = logging.getLogger(__name__)


class Gemma3ForConditionalGeneration(LlamaForCausalLM):
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        logger.info("Gemma3ForConditionalGeneration: serving its language model; the vision "
                    "tower is not loaded (prompts are text only)")
        super().load_weights(_language_model(weights))


def _language_model(weights: Iterable[tuple[str, torch.Tensor]]
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in weights:
        if name.startswith(_VISION):
            continue
        for old, new in _LANGUAGE_MODEL:
            if name.startswith(old):
                name = new + name.removeprefix(old)
                break
        yield name, tensor
