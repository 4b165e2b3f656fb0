# The two README commands are `make demo` (the main job) and `make test` (the whole suite).
# Both set the machine up first from the project's own files (scripts/setup.sh).
#
# `make test` tests what users install, the way tox does: it builds the sdist and, from it, the
# wheel (`python -m build`), replaces the editable install in .venv with that wheel plus its cpu and
# test extras, runs `pip check`, and runs the suite against the installed package (the checkout's
# plugin/, predictor/ and dashboards/ folders are not importable as `moe_reuse`, so they cannot
# shadow it; tests/test_packaging.py asserts that). `make dev` goes back to the editable install.
PY := .venv/bin/python
DIST := build/dist

.PHONY: setup dev dist install-wheel demo test unit integration lint fmt generate check-generated bench

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m moe_reuse.plugin.cli demo

# Two pytest-xdist workers: a vLLM server's start-up is mostly single-threaded imports, so two tests
# side by side keep both cores of a 2-core CI machine busy (tests/conftest.py gives each worker's
# servers a core of their own). TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist worksteal

test: setup lint install-wheel check-generated
	MOE_REUSE_EXPECT_INSTALLED=1 MOE_REUSE_DIST_DIR=$(DIST) $(PY) -m pytest -q -p no:cacheprovider --durations=40 $(XDIST) tests

# The sdist, and the wheel built from it, under $(DIST).
dist: setup
	rm -rf $(DIST)
	$(PY) -m build --quiet --outdir $(DIST) .

# The built wheel (not editable) with the cpu and test extras, in place of whatever was installed.
install-wheel: dist
	bash scripts/install-wheel.sh $(DIST) $(PY)

# Back to the editable install that setup makes (after `make test`, edits need this to take effect).
dev: setup
	$(PY) -m pip install -q -e ".[test]"

unit: setup
	$(PY) -m pytest -q -m "not integration" tests

integration: setup
	$(PY) -m pytest -q -m integration $(XDIST) tests

lint: setup
	$(PY) -m ruff check plugin predictor dashboards tests benchmarks
	$(PY) -m mypy plugin predictor dashboards

fmt: setup
	$(PY) -m ruff format plugin predictor dashboards tests benchmarks

generate: setup
	$(PY) -m moe_reuse.dashboards.generate

check-generated: setup
	$(PY) -m moe_reuse.dashboards.generate --check

bench: setup
	$(PY) benchmarks/bench_predictor.py
	$(PY) benchmarks/bench_overhead.py
