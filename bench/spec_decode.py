"""Speculative decoding on the default model: acceptance rate and output tok/s against none.

Two workloads on SmolLM2-135M-Instruct (the default GGUF, weights low-bit), greedy:

- chat: bench/workload_chat64.json (varied questions, 128 new tokens each, ignore_eos);
- copy: bench/workload_copy16.json (repeat, correct, comment or reorder a given piece of
  code or prose, up to 192 new tokens each, stopping at EOS): outputs that reuse the
  prompt's text, as in code editing and retrieval-augmented answers.

For each method (``ngram`` with vLLM's defaults prompt_lookup_max 4 / min 1, and
``draft_model``) and k in {2, 4, 8}: the acceptance rate (accepted / drafted tokens) and the
output tokens/s of one ``LLM.generate`` at concurrency 1 (``max_num_seqs=1``: the requests
one after another) and at 16 (``max_num_seqs=16``), with the ratio to no speculation
measured in the same run (the baseline runs first and last; their mean is the reference).
The draft length is adaptive, as by default (``spec_decode.adaptive``: up to k, chosen per
batch size by the tokens/s measured; each engine is warmed up on a short generate at the
measured concurrency, so that it has tried its lengths once); ``--fixed`` always drafts k.
Only one real model exists here, so the draft model is built from the default model: its
first ``--draft-layers`` of 30 layers with the same embeddings, final norm and (tied) head,
written as a GGUF file with the tensors' blocks copied as they are (so low-bit too).

    python bench/spec_decode.py [--quick] [--fixed] [--json] [--results bench/RESULTS.md]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import gguf
import kvpage_runtime
import machine
import torch
from kvpage_runtime import LLM, SamplingParams
from kvpage_runtime.loaders.default_model import default_model_path

WORKLOADS = {"chat": Path(__file__).with_name("workload_chat64.json"),
             "copy": Path(__file__).with_name("workload_copy16.json")}


@dataclass(frozen=True)
class Run:
    workload: str
    concurrency: int
    method: str  # "none", "ngram" or "draft_model"
    k: int
    tokens: int
    seconds: float
    drafted: int
    accepted: int

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds

    @property
    def acceptance(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None


def truncated_gguf(source: Path, dest: Path, num_layers: int) -> Path:
    """A copy of the GGUF model ``source`` keeping its first ``num_layers`` layers (metadata,
    embeddings, final norm and head unchanged; every tensor's blocks copied as stored)."""
    reader = gguf.GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(str(dest), arch)
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = num_layers if field.name == f"{arch}.block_count" else field.contents()
        sub_type = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, field.types[0], sub_type=sub_type)
    for tensor in reader.tensors:
        if tensor.name.startswith("blk.") and int(tensor.name.split(".")[1]) >= num_layers:
            continue
        writer.add_tensor(tensor.name, tensor.data, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest


def workload(name: str, count: int) -> tuple[list[list[int]], SamplingParams]:
    spec = json.loads(WORKLOADS[name].read_text())
    params = SamplingParams(temperature=0.0, max_tokens=spec["max_tokens"],
                            ignore_eos=spec["ignore_eos"])
    return spec["conversations"][:count], params


def run(llm_args: dict, name: str, conversations: list, params: SamplingParams,
        concurrency: int, method: str, k: int) -> Run:
    llm = LLM(**llm_args, max_num_seqs=concurrency)
    tokenizer = llm.get_tokenizer()
    prompts = [list(tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False)) for c in conversations]
    # warm up, and let the adaptive draft length try its lengths at this batch size (a server
    # does so once; each configuration here starts a fresh engine)
    llm.generate(prompts[:concurrency],
                 SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=params.ignore_eos),
                 use_tqdm=False)
    engine = llm.engine
    drafted0, accepted0 = engine.num_draft_tokens, engine.num_accepted_tokens
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    result = Run(name, concurrency, method, k, tokens, seconds,
                 engine.num_draft_tokens - drafted0, engine.num_accepted_tokens - accepted0)
    del llm, engine
    gc.collect()  # one engine's KV cache at a time
    return result


def configurations(draft: Path, ks: list[int], adaptive: bool
                   ) -> list[tuple[str, int, dict | None]]:
    configs = [("none", 0, None)]
    for k in ks:
        configs.append(("ngram", k, {"method": "ngram", "num_speculative_tokens": k,
                                     "adaptive": adaptive}))
    for k in ks:
        configs.append(("draft_model", k, {"method": "draft_model", "model": str(draft),
                                           "num_speculative_tokens": k, "adaptive": adaptive}))
    return configs + [("none", 0, None)]


def measure(args: argparse.Namespace, draft: Path) -> list[Run]:
    sizes = {("chat", 1): 4 if args.quick else 8, ("chat", 16): 16 if args.quick else 64,
             ("copy", 1): 4 if args.quick else 16, ("copy", 16): 16}
    runs = []
    for (name, concurrency), count in sizes.items():
        conversations, params = workload(name, count)
        for method, k, spec in configurations(draft, args.k, not args.fixed):
            result = run({"speculative_config": spec}, name, conversations, params, concurrency,
                         method, k)
            print(f"{name} x{concurrency} {method} k={k}: {result.tok_s:.1f} tok/s, "
                  f"acceptance {result.acceptance}", flush=True)
            runs.append(result)
    return runs


def table(runs: list[Run]) -> list[dict]:
    rows = []
    for name in WORKLOADS:
        for concurrency in (1, 16):
            group = [r for r in runs if r.workload == name and r.concurrency == concurrency]
            if not group:
                continue
            base = statistics.mean(r.tok_s for r in group if r.method == "none")
            for r in group:
                if r.method == "none" and r is not group[0]:
                    continue  # one row for the baseline
                rows.append({"workload": name, "concurrency": concurrency, "method": r.method,
                             "k": r.k, "acceptance": r.acceptance, "tok_s": round(r.tok_s, 1),
                             "base_tok_s": round(base, 1), "ratio": round(r.tok_s / base, 2)})
    return rows


def markdown(rows: list[dict], args: argparse.Namespace, draft_layers: int) -> str:
    command = ("python bench/spec_decode.py" + (" --quick" if args.quick else "")
               + (" --fixed" if args.fixed else ""))
    lines = [
        f"\n## spec_decode.py — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n",
        f"- machine: {machine.describe()}",
        f"- command: `{command}`",
        f"- versions: kvpage-runtime {kvpage_runtime.__version__}, torch {torch.__version__}",
        "- model: the default GGUF (low-bit); draft model: its first "
        f"{draft_layers} of 30 layers, same embeddings and head (built by the bench)",
        "- tok/s: output tokens / wall time of one `LLM.generate`, greedy; ratio: to no "
        "speculation in the same run (mean of a run before and after); draft length "
        + ("always k" if args.fixed else "adaptive (the default: up to k, chosen per batch "
           "size by measured tokens/s)"),
        "",
        "| workload | concurrency | method | k | acceptance | tok/s | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        acceptance = "-" if r["acceptance"] is None else f"{100 * r['acceptance']:.0f}%"
        tok_s = r["base_tok_s"] if r["method"] == "none" else r["tok_s"]
        ratio = "1.00" if r["method"] == "none" else f"{r['ratio']:.2f}"
        k = "-" if r["method"] == "none" else r["k"]
        lines.append(f"| {r['workload']} | {r['concurrency']} | {r['method']} | {k} | "
                     f"{acceptance} | {tok_s:.1f} | {ratio} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer prompts")
    parser.add_argument("--k", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--draft-layers", type=int, default=4)
    parser.add_argument("--fixed", action="store_true",
                        help="always draft k (adaptive off) to show what adaptivity saves")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--results", type=Path, help="append a markdown section to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        draft = truncated_gguf(Path(default_model_path()), Path(tmp) / "draft.gguf",
                               args.draft_layers)
        rows = table(measure(args, draft))
    text = markdown(rows, args, args.draft_layers)
    print(json.dumps(rows) if args.json else text)
    if args.results:
        with args.results.open("a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
