# Entry points; the README's two commands are `make run` and `make test`.
PY := .venv/bin/python
PACKAGES := runtime/parallama_runtime operator/parallama_operator

.PHONY: run test lint typecheck pytest bootstrap bench crd clean

run:  ## plan the seed's scenarios from built-in model presets: no cluster, GPU or download needed
	@scripts/bootstrap.sh --light >/dev/null 2>&1 || scripts/bootstrap.sh --light
	.venv/bin/parallama plan --model llama-3.1-8b --gpus 1xL4
	.venv/bin/parallama plan --model deepseek-r1-q2 --gpus 1xL4,8xL20 --num-ctx 8192

bootstrap:
	scripts/bootstrap.sh

test: bootstrap lint typecheck pytest  ## everything CI runs

lint:
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

typecheck:
	.venv/bin/mypy $(PACKAGES)

pytest:
	$(PY) -m pytest -ra

bench:  ## throughput against the stock server and a bare decode loop (minutes; not in CI)
	.venv/bin/pip install -q -e ".[bench]"
	$(PY) bench/throughput.py

clean:
	rm -rf .venv .mypy_cache .ruff_cache .pytest_cache
