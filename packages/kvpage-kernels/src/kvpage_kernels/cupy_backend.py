"""CuPy backend: raw CUDA C kernels (csrc/*.cu) compiled at run time with NVRTC.

write_kv and decode attention (one query token per sequence) run the CUDA kernels; a batch
that holds prefill chunks is served by the torch backend, and block copies use torch
indexing. Tensors are handed to the kernels as raw device pointers, so every dtype works
(bf16 included) without a CuPy array type for it.
"""

from __future__ import annotations

import functools
from pathlib import Path

import cupy
import numpy as np
import torch

from . import torch_backend
from ._common import check_inner_contiguous, copy_blocks_indexed, swap_blocks_indexed

SOURCE_DIR = Path(__file__).parent / "csrc"
SOURCES = ("write_kv.cu", "paged_decode.cu")
MAX_HEAD_DIM = 256
_DECODE_KERNELS = {torch.float32: "paged_decode_fp32", torch.float16: "paged_decode_fp16",
                   torch.bfloat16: "paged_decode_bf16"}
_THREADS = 128  # KVPAGE_WARPS (paged_decode.cu) warps of 32

copy_blocks = copy_blocks_indexed
swap_blocks = swap_blocks_indexed


@functools.cache
def _module(source: str) -> cupy.RawModule:
    code = (SOURCE_DIR / source).read_text()
    return cupy.RawModule(code=code, options=("-std=c++17", f"-I{SOURCE_DIR}"))


def _kernel(source: str, name: str) -> cupy.RawKernel:
    return _module(source).get_function(name)



def _ptr(t: torch.Tensor) -> np.uint64:
    return np.uint64(t.data_ptr())


def _launch(device: torch.device, kernel: cupy.RawKernel, grid, block, args) -> None:
    """Runs on torch's current stream of `device`."""
    stream = torch.cuda.current_stream(device)
    with cupy.cuda.Device(device.index), cupy.cuda.ExternalStream(stream.cuda_stream, device.index):
        kernel(grid, block, args)


def write_kv(k, v, k_cache, v_cache, slot_mapping) -> None:
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    check_inner_contiguous(k, "k")
    check_inner_contiguous(v, "v")
    name = "write_kv_16" if k.element_size() == 2 else "write_kv_32"
    args = (_ptr(k), _ptr(v), _ptr(k_cache), _ptr(v_cache), _ptr(slot_mapping),
            np.int64(k.stride(0)), np.int64(k.stride(1)), np.int64(v.stride(0)),
            np.int64(v.stride(1)), np.int32(num_kv_heads), np.int32(head_dim))
    _launch(k.device, _kernel("write_kv.cu", name), (num_tokens,), (_THREADS,), args)


def paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, *,
                    sliding_window=None, softcap=None, max_seq_len=None, max_query_len=None,
                    out) -> torch.Tensor:
    num_seqs, head_dim = block_tables.shape[0], q.shape[2]
    if max_query_len is None:
        max_query_len = int(query_start_loc.diff().max()) if num_seqs else 0
    if max_query_len != 1 or q.shape[0] != num_seqs or head_dim > MAX_HEAD_DIM:
        return torch_backend.paged_attention(
            q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
            sliding_window=sliding_window, softcap=softcap, max_seq_len=max_seq_len,
            max_query_len=max_query_len, out=out)
    check_inner_contiguous(q, "q")
    check_inner_contiguous(out, "out")
    block_tables, seq_lens = block_tables.contiguous(), seq_lens.contiguous()
    args = (_ptr(out), _ptr(q), _ptr(k_cache), _ptr(v_cache), _ptr(block_tables),
            _ptr(seq_lens), np.float32(scale), np.float32(softcap or 0.0),
            np.int32(sliding_window or 0), np.int32(k_cache.shape[2]), np.int32(head_dim),
            np.int32(k_cache.shape[1]), np.int32(block_tables.stride(0)),
            np.int64(q.stride(0)), np.int64(q.stride(1)), np.int64(out.stride(0)),
            np.int64(out.stride(1)))
    kernel = _kernel("paged_decode.cu", _DECODE_KERNELS[q.dtype])
    _launch(q.device, kernel, (num_seqs, q.shape[1]), (_THREADS,), args)
    return out
