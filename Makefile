# The two README commands are `make demo` (the main job) and `make test` (the whole suite).
# Both set the machine up first from the project's own files (scripts/setup.sh).
PY := .venv/bin/python

.PHONY: setup demo test unit integration lint fmt generate check-generated bench

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m moe_reuse.plugin.cli demo

test: setup check-generated lint
	$(PY) -m pytest -q -p no:cacheprovider tests

unit: setup
	$(PY) -m pytest -q -m "not integration" tests

integration: setup
	$(PY) -m pytest -q -m integration tests

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
