"""Kernel tests run the Triton kernels in the interpreter when there is no CUDA device.

TRITON_INTERPRET is read when a kernel is decorated, so it is set here, before any test
module imports kvpage_kernels.triton_backend.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
