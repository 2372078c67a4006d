"""Copying checkpoint tensors into parameters."""

from __future__ import annotations

import numpy as np
import torch

from kvpage_runtime.errors import ModelLoadError

_NUMPY_DTYPES = (torch.float32, torch.float16)


def copy_weight(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    """``dst[...] = src`` (casting dtype, moving device) after checking the shapes agree.

    CPU copies between equal NumPy-representable dtypes go through NumPy, single-threaded:
    loading is many medium-sized copies into fresh memory, which torch's thread pool does
    several times slower when the cores are shared.
    """
    if dst.shape != src.shape:
        raise ModelLoadError(
            f"{what}: checkpoint shape {tuple(src.shape)} != expected {tuple(dst.shape)}"
        )
    if (
        dst.device.type == src.device.type == "cpu"
        and dst.dtype == src.dtype
        and dst.dtype in _NUMPY_DTYPES
    ):
        np.copyto(dst.numpy(), src.numpy())
    else:
        dst.copy_(src)
