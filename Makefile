# Entry points; the README's two commands are `make run` and `make test`.
PY := .venv/bin/python
PACKAGES := runtime/parallama_runtime operator/parallama_operator

.PHONY: run test lint typecheck pytest bootstrap bench crd clean e2e

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

# A real Kubernetes 1.20 control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler;
# built once from Debian's source package and cached, see scripts/k8s-control-plane.sh) in a temporary
# directory, the e2e suite against it, then exactly those processes stopped. Needs `make bootstrap`.
# The component logs and the audit log stay in the directory when a test fails.
e2e:  ## the operator against a real API server as its least-privilege user (cold cache ~7 min, warm ~40 s)
	scripts/k8s-control-plane.sh build
	@dir=$$(mktemp -d -t parallama-e2e.XXXXXX); \
	trap 'rc=$$?; scripts/k8s-control-plane.sh stop "$$dir"; \
	      if [ $$rc = 0 ]; then rm -rf "$$dir"; else echo "control plane logs kept in $$dir"; fi' EXIT; \
	trap 'exit 130' INT TERM; \
	scripts/k8s-control-plane.sh start "$$dir" && \
	env -u KUBECONFIG PARALLAMA_E2E_DIR="$$dir" $(PY) -m pytest -ra tests/e2e

bench:  ## serving scenarios against llama-server (LLAMA_SERVER=path) and a bare decode loop (not in CI)
	.venv/bin/pip install -q -e ".[bench]"
	$(PY) bench/serving.py --scenario all $(if $(LLAMA_SERVER),--llama-server $(LLAMA_SERVER))

clean:
	rm -rf .venv .mypy_cache .ruff_cache .pytest_cache
