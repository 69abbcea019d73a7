# The two commands of the README: `make demo` and `make test`. Both set up what they need.
# `make test` without PYTEST_ARGS then runs the instrumentation's tests on each newer Python the
# machine has (scripts/compat.sh; `make compat` alone).
.PHONY: setup test compat demo bench clean

setup:
	bash scripts/setup.sh all

test: setup
	.venv/bin/python -m pytest -q $(PYTEST_ARGS)
	$(if $(PYTEST_ARGS),,bash scripts/compat.sh)

compat:
	bash scripts/compat.sh

demo:
	bash scripts/setup.sh python
	.venv/bin/python -m examples.demo $(DEMO_ARGS)

bench: setup
	.venv/bin/python benchmarks/instrumentation_overhead.py
	.venv/bin/python benchmarks/export_queue_memory.py
	.venv/bin/python benchmarks/sidecar_throughput.py
	.venv/bin/python benchmarks/detectors_inprocess.py
	.venv/bin/python benchmarks/discover_large_tree.py

clean:
	rm -rf .venv .cache .pytest_cache
