#!/usr/bin/env bash
# Prepares .venv with everything the tests need. Idempotent: a second run takes seconds.
#   scripts/bootstrap.sh          package + runtime (llama.cpp) + gpu + dev tools + Prometheus
#   scripts/bootstrap.sh --light  the package alone: enough for `parallama plan`
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

if [ ! -x .venv/bin/python ]; then
  echo "==> creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi

if [ "${1:-}" = "--light" ]; then
  .venv/bin/pip install -q -e .
  exit 0
fi

if ! .venv/bin/python -c "import llama_cpp" 2>/dev/null; then
  echo "==> building llama-cpp-python 0.3.36: compiles llama.cpp, about 5 minutes on 2 cores (pip caches the wheel)"
  start=$SECONDS
  ( while sleep 30; do echo "    ... still compiling llama.cpp ($(( (SECONDS - start) / 60 )) min $(( (SECONDS - start) % 60 )) s)"; done ) &
  ticker=$!
  trap 'kill $ticker 2>/dev/null || true' EXIT
  CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) .venv/bin/pip install -q "llama-cpp-python==0.3.36"
  kill $ticker 2>/dev/null || true
  trap - EXIT
  echo "==> llama-cpp-python ready after $(( SECONDS - start )) s"
fi

echo "==> installing parallama with the runtime, gpu and dev extras"
.venv/bin/pip install -q -e ".[runtime,gpu,dev]"

# Debian's Prometheus gives a real server and promtool for the observability tests.
if ! command -v promtool >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "==> installing Debian's prometheus package (server and promtool)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  else
    echo "warning: promtool is missing and this is not root: apt-get install prometheus, or its tests fail" >&2
  fi
fi
echo "==> environment ready"
