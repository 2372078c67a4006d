"""CuPy backend: the CUDA source must compile for sm_90 wherever nvcc exists; the kernels
run against the reference only where a CUDA device and cupy are present."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import kvpage_kernels
import pytest
import torch
from kvpage_kernels import KernelBackendUnavailable, paged_attention, select_backend, write_kv

from .cases import assert_close, check_large_num_blocks, make_problem, poisoned_like

CSRC = Path(kvpage_kernels.__file__).parent / "csrc"
ENTRIES = {"write_kv.cu": ["write_kv_16", "write_kv_32"],
           "paged_decode.cu": ["paged_decode_fp32", "paged_decode_fp16", "paged_decode_bf16"]}


def _cupy_ready() -> bool:
    try:
        import cupy
    except ImportError:
        return False
    return torch.cuda.is_available() and cupy.cuda.is_available()


needs_cupy_gpu = pytest.mark.skipif(not _cupy_ready(),
                                    reason="needs a CUDA device and the cupy package")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("source", sorted(ENTRIES))
def test_source_compiles_with_nvcc(source, tmp_path):
    ptx = tmp_path / "out.ptx"
    result = subprocess.run(["nvcc", "-arch=sm_90", "-ptx", f"-I{CSRC}", str(CSRC / source),
                             "-o", str(ptx)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    text = ptx.read_text()
    for entry in ENTRIES[source]:
        assert f".entry {entry}(" in text


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a CPU machine")
def test_unavailable_on_cpu_names_the_reason():
    with pytest.raises(KernelBackendUnavailable, match="CUDA device"):
        select_backend("cpu", "cupy")


@pytest.mark.gpu
@needs_cupy_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("group", [1, 4, 8])
def test_decode_against_reference(dtype, group):
    problem = make_problem([1, 16, 17, 300, 1100], [1] * 5, num_kv_heads=2, group=group,
                           dtype=dtype, device="cuda")
    for kwargs in ({}, {"sliding_window": 64}, {"softcap": 20.0}):
        expected = paged_attention(*problem.args(), backend="reference", **kwargs)
        actual = paged_attention(*problem.args(), backend="cupy", out=poisoned_like(problem.q),
                                 **problem.hints(), **kwargs)
        assert_close(actual, expected, f"seed {problem.seed}")


@pytest.mark.gpu
@needs_cupy_gpu
@pytest.mark.parametrize("head_dim", [80, 256])
def test_mixed_batch_and_head_dims(head_dim):
    problem = make_problem([30, 7, 90], [30, 1, 1], head_dim=head_dim, group=2, device="cuda")
    expected = paged_attention(*problem.args(), backend="reference")
    actual = paged_attention(*problem.args(), backend="cupy", out=poisoned_like(problem.q))
    assert_close(actual, expected, f"seed {problem.seed}")


@pytest.mark.gpu
@needs_cupy_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_against_reference(dtype):
    k_cache = torch.randn(4, 16, 2, 96, device="cuda").to(dtype)
    v_cache = torch.randn_like(k_cache)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    slots = torch.tensor([5, -1, 63, 17], dtype=torch.int64, device="cuda")
    k = torch.randn(4, 2, 96, device="cuda").to(dtype)
    v = torch.randn(4, 2, 96, device="cuda").to(dtype)
    write_kv(k, v, k_cache, v_cache, slots, backend="cupy")
    write_kv(k, v, expected_k, expected_v, slots, backend="reference")
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)


@pytest.mark.gpu
@needs_cupy_gpu
def test_large_num_blocks_uses_64bit_offsets():
    check_large_num_blocks("cupy", "cuda")
