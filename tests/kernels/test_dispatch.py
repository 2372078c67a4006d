"""Backend selection, argument checks and the block copy ops."""

from __future__ import annotations

import pytest
import torch
from kvpage_kernels import (
    KernelBackendUnavailable,
    KernelInputError,
    copy_blocks,
    paged_attention,
    select_backend,
    swap_blocks,
    write_kv,
)

from .cases import make_problem


def test_cpu_defaults_to_the_compiled_backend_else_torch(monkeypatch):
    from kvpage_kernels import cpu_backend, ops

    monkeypatch.delenv("KVPAGE_KERNEL_BACKEND", raising=False)
    expected = "cpu" if cpu_backend.unavailable_reason() is None else "torch"
    assert select_backend("cpu") == expected
    assert select_backend(torch.device("cpu"), "reference") == "reference"
    monkeypatch.setattr(cpu_backend, "unavailable_reason", lambda: "no compiler")
    ops._select.cache_clear()
    try:
        assert select_backend("cpu") == "torch"
        with pytest.raises(KernelBackendUnavailable, match="no compiler"):
            select_backend("cpu", "cpu")
    finally:
        ops._select.cache_clear()


def test_environment_forces_and_argument_wins(monkeypatch):
    monkeypatch.setenv("KVPAGE_KERNEL_BACKEND", "reference")
    assert select_backend("cpu") == "reference"
    assert select_backend("cpu", "torch") == "torch"


def test_unknown_backend_is_an_input_error():
    with pytest.raises(KernelInputError, match="unknown kernel backend 'fast'"):
        select_backend("cpu", "fast")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a CPU machine")
def test_triton_without_gpu_or_interpreter_names_what_is_missing(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(KernelBackendUnavailable, match="TRITON_INTERPRET=1|not installed"):
        select_backend("cpu", "triton")


def test_shape_errors_name_the_argument():
    problem = make_problem([5], [1], num_kv_heads=2, group=2)
    with pytest.raises(KernelInputError, match="head_dim 32 differs"):
        paged_attention(problem.q[..., :32], *problem.args()[1:])
    with pytest.raises(KernelInputError, match="seq_lens must be int32"):
        paged_attention(*problem.args()[:4], problem.seq_lens.long(), *problem.args()[5:])
    with pytest.raises(KernelInputError, match="not a multiple of num_kv_heads"):
        paged_attention(problem.q[:, :3], *problem.args()[1:])
    k = torch.randn(1, 2, 64)
    with pytest.raises(KernelInputError, match="slot_mapping must be int64"):
        write_kv(k, k, problem.k_cache, problem.v_cache, torch.zeros(1, dtype=torch.int32))


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("as_tensor", [False, True])
def test_copy_blocks(backend, as_tensor):
    caches = [(torch.randn(6, 4, 2, 8), torch.randn(6, 4, 2, 8)) for _ in range(3)]
    expected = [(k.clone(), v.clone()) for k, v in caches]
    pairs = [(0, 3), (5, 1), (0, 4)]
    for k, v in expected:
        for src, dst in pairs:
            k[dst], v[dst] = k[src], v[src]
    copy_blocks(caches, torch.tensor(pairs) if as_tensor else pairs, backend=backend)
    for (k, v), (ek, ev) in zip(caches, expected, strict=True):
        assert torch.equal(k, ek) and torch.equal(v, ev)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_swap_blocks(backend):
    src = torch.randn(5, 4, 2, 8).bfloat16()
    dst = torch.randn(3, 4, 2, 8).bfloat16()
    expected = dst.clone()
    expected[0], expected[2] = src[4], src[1]
    swap_blocks(src, dst, torch.tensor([[4, 0], [1, 2]]), backend=backend)
    assert torch.equal(dst, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_swap_between_devices_and_auto_selection():
    assert select_backend("cuda") in ("triton", "cupy", "torch")
    gpu = torch.randn(4, 16, 2, 64, device="cuda")
    host = torch.zeros(4, 16, 2, 64).pin_memory()
    swap_blocks(gpu, host, [(1, 0), (3, 2)])
    torch.cuda.synchronize()
    assert torch.equal(host[0], gpu[1].cpu()) and torch.equal(host[2], gpu[3].cpu())
    back = torch.zeros_like(gpu)
    swap_blocks(host, back, [(2, 1)])
    assert torch.equal(back[1], gpu[3])
