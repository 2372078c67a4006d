# Two entry points that work on a fresh machine (Python >= 3.10 and pip):
#   make serve   set up .venv and serve the default model on 127.0.0.1:8000
#   make test    set up .venv and run the whole test suite
.PHONY: setup serve test test-fast lint bench

setup: .venv/.installed

.venv/.installed: scripts/dev-setup.sh requirements-dev.txt packages/*/pyproject.toml
	./scripts/dev-setup.sh
	touch $@

serve: setup
	.venv/bin/kvpage serve

test: setup
	.venv/bin/python -m pytest tests -q

# everything but the tests marked slow (the default model against transformers, the soak,
# the CPU-tier reruns): a quicker loop while developing; CI runs `make test`
test-fast: setup
	.venv/bin/python -m pytest tests -q -m "not slow"

lint: setup
	.venv/bin/ruff check packages tests bench
