"""What several benchmarks share: their common options, the chat workload on the default
model's tokenizer, a report's date, machine and versions, and publishing it (JSON or
markdown, appended to a results file)."""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import kvpage_runtime
import machine
import torch
import transformers
from kvpage_runtime.loaders.default_model import default_model_path

WORKLOAD = Path(__file__).with_name("workload_chat64.json")


def parser(doc: str) -> argparse.ArgumentParser:
    """``--quick``, ``--json`` and ``--results``, described by the script's docstring."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="16 prompts x 32 tokens")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--results", type=Path, help="append a markdown section to this file")
    return p


def default_tokenizer() -> transformers.PreTrainedTokenizerBase:
    gguf = default_model_path()
    return transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


def chat_prompts(tokenizer, num_prompts: int) -> list[list[int]]:
    """The first ``num_prompts`` conversations of the workload, as generation prompts."""
    conversations = json.loads(WORKLOAD.read_text())["conversations"][:num_prompts]
    return [list(tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True,
                                               return_dict=False)) for c in conversations]


def run_facts(threads: str = "torch threads", **libraries: str) -> dict[str, str]:
    """A report's ``date``, ``machine`` (with torch's thread count, described by ``threads``)
    and ``versions``: kvpage-runtime's, torch's, those of ``libraries`` (name: version) and
    python's."""
    versions = {"kvpage-runtime": kvpage_runtime.__version__, "torch": torch.__version__,
                **libraries, "python": platform.python_version()}
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "machine": f"{machine.describe()}, {torch.get_num_threads()} {threads}",
            "versions": ", ".join(f"{name} {version}" for name, version in versions.items())}


def heading(script: str, report: dict, command: str) -> list[str]:
    """The first lines of a results section: title with the date, machine, command, versions
    and workload (``report``'s fields of those names), then a blank line."""
    return [f"\n## {script} — {report['date']}\n", f"- machine: {report['machine']}",
            f"- command: `{command}`", f"- versions: {report['versions']}",
            f"- workload: {report['workload']}", ""]


def publish(report: dict, text: str, args: argparse.Namespace) -> None:
    """Prints the report (JSON with ``--json``, else ``text``) and appends ``text`` to
    ``--results``."""
    print(json.dumps(report, indent=1) if args.json else text)
    if args.results:
        with args.results.open("a") as f:
            f.write(text)
