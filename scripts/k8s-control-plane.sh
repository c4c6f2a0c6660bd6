#!/usr/bin/env bash
# A real Kubernetes 1.20 control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler)
# on 127.0.0.1 for the end-to-end tests. Nothing can be downloaded here but Debian and PyPI packages,
# so the binaries are built from Debian's `kubernetes` source package (1.20.2, dependencies vendored).
# See docs in the header of each function; the facts behind them are in shared/k8s-control-plane.md.
#
#   scripts/k8s-control-plane.sh build        build once and cache the binaries (~6-8 min cold, seconds warm)
#   scripts/k8s-control-plane.sh start DIR    start everything, write DIR/admin.kubeconfig, DIR/operator.kubeconfig
#   scripts/k8s-control-plane.sh stop DIR     stop exactly the processes `start DIR` started (safe twice)
#
# Environment:
#   PARALLAMA_K8S_CACHE   where binaries are cached (default ~/.cache/parallama/k8s-1.20.2)
#   PARALLAMA_K8S_PORT    kube-apiserver's secure port (default: a free one); etcd uses free ports too
#   PYTHON                the Python that renders the operator's ClusterRole (default .venv/bin/python)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
K8S_VERSION=1.20.2
CACHE=${PARALLAMA_K8S_CACHE:-$HOME/.cache/parallama/k8s-$K8S_VERSION}
BIN=$CACHE/bin
# Bumped whenever the build recipe changes, so a stale cache is rebuilt instead of trusted.
RECIPE=1
COMPONENTS=(kube-apiserver kube-controller-manager kube-scheduler)
# Debian packages the build needs (reflect2 1.0.2 replaces the vendored 1.0.1 that segfaults).
BUILD_DEBS=(golang-go dpkg-dev golang-github-modern-go-reflect2-dev)
# Debian packages `start` needs.
RUN_DEBS=(etcd-server openssl curl)
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}

log() { echo "==> $(date -u +%H:%M:%S) $*"; }
die() {
  echo "error: $*" >&2
  exit 1
}

# Runs a long command and prints a line every 30 s while it runs (CI kills jobs that stay silent,
# and people watching want to know it is alive). Output of the command goes to LOGFILE; its tail is
# shown when it fails.
#   long_step LABEL LOGFILE cmd args...
long_step() {
  local label=$1 logfile=$2
  shift 2
  local start=$SECONDS next=30 pid
  "$@" >"$logfile" 2>&1 &
  pid=$!
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    if ((SECONDS - start >= next)); then
      echo "    ... still $label ($((SECONDS - start)) s)"
      next=$((next + 30))
    fi
  done
  if ! wait "$pid"; then
    echo "---- last lines of $logfile ----" >&2
    tail -n 40 "$logfile" >&2
    die "$label failed after $((SECONDS - start)) s (full log: $logfile)"
  fi
  log "$label: done in $((SECONDS - start)) s"
}

# ---------------------------------------------------------------------------------------------------
# Installing what is missing through apt (root only; a developer gets the exact command instead).
# ---------------------------------------------------------------------------------------------------
APT_UPDATED=0

apt_update_once() {
  if [ "$APT_UPDATED" = 0 ]; then
    long_step "apt-get update" "$CACHE/apt-update.log" apt-get update
    APT_UPDATED=1
  fi
}

missing_debs() {
  local pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || echo "$pkg"
  done
}

# Installs Debian packages without letting their maintainer scripts start services: etcd-server
# would otherwise start a system etcd on port 2379, and only our own processes may run.
install_debs() {
  local missing
  missing=$(missing_debs "$@")
  [ -z "$missing" ] && return 0
  # shellcheck disable=SC2086 # word splitting of the package list is intended
  if [ "$(id -u)" != 0 ]; then
    die "missing Debian packages: $(echo $missing). As root: apt-get install $(echo $missing)"
  fi
  command -v apt-get >/dev/null || die "missing packages $(echo "$missing") and no apt-get on this machine"
  apt_update_once
  local added_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\n# parallama k8s-control-plane.sh: no service starts during its apt-get install\nexit 101\n' \
      >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    added_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  # shellcheck disable=SC2086
  long_step "apt-get install $(echo $missing)" "$CACHE/apt-install.log" \
    apt-get install -y --no-install-recommends $missing
  [ "$added_policy" = 1 ] && rm -f /usr/sbin/policy-rc.d
  # A systemd host ignores policy-rc.d for units already enabled: stop a system etcd if one came up.
  if command -v systemctl >/dev/null && systemctl is-active --quiet etcd 2>/dev/null; then
    systemctl stop etcd && systemctl disable etcd >/dev/null 2>&1 || true
  fi
  return 0
}

# `apt-get source` needs a deb-src line; the machine lists only binary packages. Add one for the
# suite the binary entries use (bookworm main), in its own file so it is easy to see and remove.
ensure_deb_src() {
  if grep -rqsE '^(deb-src|Types:.*deb-src)' /etc/apt/sources.list /etc/apt/sources.list.d/; then
    return 0
  fi
  [ "$(id -u)" = 0 ] || die "apt has no deb-src entry; as root add 'deb-src http://deb.debian.org/debian bookworm main'"
  log "adding a deb-src entry for Debian bookworm main (/etc/apt/sources.list.d/parallama-deb-src.sources)"
  cat >/etc/apt/sources.list.d/parallama-deb-src.sources <<'EOF'
# Added by parallama scripts/k8s-control-plane.sh: `apt-get source kubernetes` for the e2e control plane.
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  APT_UPDATED=0 # the new entry needs an update even if one ran
}

# ---------------------------------------------------------------------------------------------------
# build
# ---------------------------------------------------------------------------------------------------
cache_is_complete() {
  local c
  [ "$(cat "$BIN/RECIPE" 2>/dev/null)" = "$RECIPE" ] || return 1
  for c in "${COMPONENTS[@]}"; do [ -x "$BIN/$c" ] || return 1; done
}

cmd_build() {
  mkdir -p "$CACHE"
  install_debs "${RUN_DEBS[@]}"
  if cache_is_complete; then
    log "Kubernetes $K8S_VERSION binaries cached in $BIN"
    return 0
  fi
  local t0=$SECONDS
  log "building Kubernetes $K8S_VERSION from Debian's source package (cold: about 6-8 min on 2 cores)"
  install_debs "${BUILD_DEBS[@]}"
  command -v go >/dev/null || die "go not on PATH after installing golang-go"

  local work=$CACHE/build
  fetch_source "$work"
  local src=$SRC
  patch_source "$src"

  # GOPATH mode, as Kubernetes 1.20's own scripts build: module mode fails with Go 1.19
  # ("updates to go.mod needed, disabled by -mod=vendor").
  local gopath=$work/gopath
  mkdir -p "$gopath/src/k8s.io"
  ln -sfn "$src" "$gopath/src/k8s.io/kubernetes"
  export GOPATH=$gopath GO111MODULE=off GOFLAGS= CGO_ENABLED=0 GOPROXY=off GOCACHE=$work/go-build
  cd "$gopath/src/k8s.io/kubernetes"

  generate_openapi "$work"

  local pkg=k8s.io/kubernetes/vendor/k8s.io ldflags="-s -w" p
  for p in component-base/version client-go/pkg/version; do
    ldflags+=" -X $pkg/$p.gitVersion=v$K8S_VERSION -X $pkg/$p.gitMajor=1 -X $pkg/$p.gitMinor=20"
    ldflags+=" -X $pkg/$p.gitTreeState=clean -X $pkg/$p.buildDate=$(date -u +%FT%TZ)"
  done
  mkdir -p "$work/out"
  local c
  for c in "${COMPONENTS[@]}"; do
    long_step "compiling $c" "$work/$c.log" \
      go build -p "$(nproc)" -trimpath -ldflags "$ldflags" -o "$work/out/$c" "./cmd/$c"
  done
  cd "$ROOT"

  # Publish the binaries only once all three exist, so an interrupted build never looks cached.
  mkdir -p "$BIN"
  for c in "${COMPONENTS[@]}"; do mv -f "$work/out/$c" "$BIN/$c"; done
  echo "$RECIPE" >"$BIN/RECIPE"
  "$BIN/kube-apiserver" --version
  # The Go build cache and the extracted tree are >1 GB; the binaries are all later runs need.
  rm -rf "$work"
  log "Kubernetes $K8S_VERSION built in $((SECONDS - t0)) s; binaries in $BIN"
}

# Downloads Debian's kubernetes source package (1.20.5+really1.20.2, 34 MB) and sets SRC to the
# extracted tree. A tree left by an interrupted build is reused.
fetch_source() {
  local work=$1 dir
  dir=$(find "$work/src" -mindepth 1 -maxdepth 1 -type d -name 'kubernetes-*' 2>/dev/null | head -n 1 || true)
  if [ -n "$dir" ] && [ -f "$dir/.parallama-extracted" ]; then
    SRC=$dir
    return 0
  fi
  rm -rf "$work/src"
  mkdir -p "$work/src"
  [ "$(id -u)" = 0 ] || command -v dpkg-source >/dev/null || die "dpkg-source missing: apt-get install dpkg-dev"
  ensure_deb_src
  if [ "$(id -u)" = 0 ]; then apt_update_once; fi
  (cd "$work/src" && long_step "apt-get source kubernetes" "$work/apt-source.log" apt-get source kubernetes)
  dir=$(find "$work/src" -mindepth 1 -maxdepth 1 -type d -name 'kubernetes-*' | head -n 1)
  [ -n "$dir" ] && [ -d "$dir/cmd/kube-apiserver" ] || die "apt-get source kubernetes gave no source tree in $work/src"
  touch "$dir/.parallama-extracted"
  SRC=$dir
}

# Two vendored libraries misbehave with Go >= 1.16/1.18 (see shared/k8s-control-plane.md).
patch_source() {
  local src=$1 f n
  # 1. kube-openapi's and go-openapi's validate/type.go treat a zero value such as "" as null
  #    (fixed upstream in kubernetes/kube-openapi#230); without this the ModelDeployment CRD,
  #    whose schema has `default: ""`, is rejected.
  n=0
  while IFS= read -r f; do
    if grep -q 'data == nil || reflect.DeepEqual(reflect.Zero(reflect.TypeOf(data)), reflect.ValueOf(data))' "$f"; then
      sed -i 's/data == nil || reflect.DeepEqual(reflect.Zero(reflect.TypeOf(data)), reflect.ValueOf(data))/data == nil/' "$f"
      log "patched $(realpath --relative-to="$src" "$f") (a zero value is not null)"
    fi
    grep -q 'reflect.DeepEqual(reflect.Zero(reflect.TypeOf(data))' "$f" && die "could not patch $f"
    n=$((n + 1))
  done < <(find "$src/vendor" -path '*/validate/type.go')
  [ "$n" -ge 1 ] || die "no vendored validate/type.go found in $src/vendor: the source layout changed"

  # 2. reflect2 1.0.1 segfaults in map iteration under Go >= 1.18 (kube-apiserver crashes on the first
  #    custom-resource create). Debian's 1.0.2 replaces the vendored copy (without its go.mod).
  local r2=/usr/share/gocode/src/github.com/modern-go/reflect2
  [ -f "$r2/reflect2.go" ] || die "$r2 missing: apt-get install golang-github-modern-go-reflect2-dev"
  if ! cmp -s "$r2/reflect2.go" "$src/vendor/github.com/modern-go/reflect2/reflect2.go"; then
    rm -rf "$src/vendor/github.com/modern-go/reflect2"
    cp -rL "$r2" "$src/vendor/github.com/modern-go/reflect2"
    rm -f "$src/vendor/github.com/modern-go/reflect2/go.mod" "$src/vendor/github.com/modern-go/reflect2/go.sum"
    log "replaced vendored reflect2 with Debian's $(dpkg-query -W -f='${Version}' golang-github-modern-go-reflect2-dev)"
  fi
}

# pkg/generated/openapi/zz_generated.openapi.go is generated, not shipped: build openapi-gen from the
# vendored kube-openapi and run it over every package tagged `+k8s:openapi-gen=`, as 1.20's
# Makefile.generated_files does.
generate_openapi() {
  local work=$1 out=pkg/generated/openapi/zz_generated.openapi.go
  # A file from an earlier, complete run is reused (the count guards against a partial one).
  local n
  n=$(grep -c '^func schema_' "$out" 2>/dev/null) || n=0
  if [ "$n" -gt 500 ]; then return 0; fi
  long_step "building openapi-gen" "$work/openapi-gen-build.log" \
    go build -o "$work/openapi-gen" ./vendor/k8s.io/kube-openapi/cmd/openapi-gen
  # vendor/k8s.io/{api,apimachinery,...} are symlinks into staging/: grep walks them through the
  # vendor path (the import path the build uses) and skips staging/ itself.
  local dirs
  dirs=$(
    {
      grep -rl --include='*.go' --exclude-dir=staging --exclude-dir=debian --exclude-dir=_output \
        -e '+k8s:openapi-gen=' .
      grep -rl --include='*.go' -e '+k8s:openapi-gen=' vendor/k8s.io/*/ | sed 's|^|./|'
    } | grep -v -e '^\./vendor/k8s\.io/code-generator/' -e '^\./vendor/k8s\.io/sample-apiserver/' |
      xargs -n1 dirname | sort -u | sed 's|^\./|k8s.io/kubernetes/|' | paste -sd, -
  )
  [ -n "$dirs" ] || die "no package carries a +k8s:openapi-gen= tag: the source layout changed"
  long_step "generating OpenAPI definitions" "$work/openapi-gen.log" \
    "$work/openapi-gen" --input-dirs "$dirs" \
    --output-package k8s.io/kubernetes/pkg/generated/openapi --output-file-base zz_generated.openapi \
    --go-header-file vendor/k8s.io/code-generator/hack/boilerplate.go.txt \
    --output-base "$GOPATH/src" --report-filename "$work/openapi-violations.report"
  n=$(grep -c '^func schema_' "$out") || n=0
  [ "$n" -gt 500 ] || die "openapi-gen wrote only $n schemas to $out (expected over 500): see $work/openapi-gen.log"
  [ -s "$out" ] || die "openapi-gen wrote no $out"
}

# ---------------------------------------------------------------------------------------------------
# start DIR
# ---------------------------------------------------------------------------------------------------
OPERATOR_USER=parallama-operator

# Prints N free TCP ports on 127.0.0.1 (all held open together, so they differ).
free_ports() {
  "$PYTHON" - "$1" <<'EOF'
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))
EOF
}

# True when every PID in DIR/pids is alive and still runs the binary it was started as.
pid_runs() {
  local pid=$1 exe=$2
  [ -r "/proc/$pid/cmdline" ] && tr '\0' '\n' <"/proc/$pid/cmdline" | head -n 1 | grep -qxF "$exe"
}

all_running() {
  local dir=$1 name pid exe n=0
  [ -s "$dir/pids" ] || return 1
  while read -r name pid exe; do
    pid_runs "$pid" "$exe" || return 1
    n=$((n + 1))
  done <"$dir/pids"
  [ "$n" = 4 ]
}

# Starts a component in the background with its output in DIR/NAME.log and records
# "NAME PID BINARY" in DIR/pids, so `stop` kills exactly it (and never a reused PID).
spawn() {
  local dir=$1 name=$2 exe=$3
  shift 3
  # setsid: a Ctrl-C in the shell that ran `start` must not kill the control plane behind `stop`'s back.
  setsid "$exe" "$@" >"$dir/$name.log" 2>&1 </dev/null &
  echo "$name $! $exe" >>"$dir/pids"
}

# Polls a URL until it answers 200 (curl -f), or fails after TIMEOUT seconds showing NAME's log.
wait_http() {
  local dir=$1 name=$2 timeout=$3
  shift 3
  local start=$SECONDS pid
  pid=$(awk -v n="$name" '$1 == n { print $2 }' "$dir/pids")
  until curl -fsS -o /dev/null --max-time 2 "$@" 2>/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -n 30 "$dir/$name.log" >&2
      fail_start "$dir" "$name exited during startup (log: $dir/$name.log)"
    fi
    if ((SECONDS - start > timeout)); then
      tail -n 30 "$dir/$name.log" >&2
      fail_start "$dir" "$name not ready after $timeout s (log: $dir/$name.log)"
    fi
    sleep 0.5
  done
  log "$name ready after $((SECONDS - start)) s"
}

fail_start() {
  cmd_stop "$1" >&2 || true
  die "$2"
}

make_certs() {
  local dir=$1
  local pki=$dir/pki
  mkdir -p "$pki"
  # A CA, the API server's serving certificate (127.0.0.1, localhost and the in-cluster names), and
  # the service-account signing key pair.
  openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=parallama-e2e-ca" \
    -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" \
    -keyout "$pki/apiserver.key" -out "$pki/apiserver.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,IP:10.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\nextendedKeyUsage=serverAuth\n' \
    >"$pki/apiserver.ext"
  openssl x509 -req -in "$pki/apiserver.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 30 -extfile "$pki/apiserver.ext" -out "$pki/apiserver.crt" 2>/dev/null
  openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
  openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
  chmod 600 "$pki"/*.key
}

# A kubeconfig that authenticates with a bearer token from DIR/tokens.csv.
write_kubeconfig() {
  local file=$1 server=$2 ca=$3 user=$4 token=$5
  cat >"$file" <<EOF
apiVersion: v1
kind: Config
clusters:
  - name: parallama-e2e
    cluster:
      server: $server
      certificate-authority: $ca
users:
  - name: $user
    user:
      token: $token
contexts:
  - name: $user@parallama-e2e
    context:
      cluster: parallama-e2e
      user: $user
current-context: $user@parallama-e2e
EOF
  chmod 600 "$file"
}

# POSTs a JSON object to the API server as the admin.
api_create() {
  local dir=$1 path=$2 body=$3
  local code
  code=$(curl -sS -o "$dir/last-response.json" -w '%{http_code}' --cacert "$dir/pki/ca.crt" \
    -H "Authorization: Bearer $(cat "$dir/admin.token")" -H 'Content-Type: application/json' \
    -X POST --data-binary "$body" "$(cat "$dir/server")$path")
  case "$code" in
  201 | 409) ;;
  *) fail_start "$dir" "POST $path answered $code: $(cat "$dir/last-response.json")" ;;
  esac
}

# The operator's user gets exactly the chart's ClusterRole: rendered from the same list the chart is
# tested against (parallama_operator.rbac.CLUSTER_RULES), so a call outside it fails with 403 in the e2e.
bind_operator_role() {
  local dir=$1 role binding
  # rbac.py is loaded by its path, not through the package (whose __init__ imports every handler):
  # the role does not depend on the rest of the operator importing cleanly.
  role=$("$PYTHON" - "$ROOT/operator/parallama_operator/rbac.py" <<'EOF'
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("parallama_rbac", sys.argv[1])
rbac = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rbac)
print(json.dumps({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                  "metadata": {"name": "parallama-operator"}, "rules": rbac.CLUSTER_RULES}))
EOF
  ) || fail_start "$dir" "could not render the ClusterRole from operator/parallama_operator/rbac.py (error above)"
  binding='{"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
    "metadata": {"name": "parallama-operator"},
    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "parallama-operator"},
    "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "'$OPERATOR_USER'"}]}'
  api_create "$dir" /apis/rbac.authorization.k8s.io/v1/clusterroles "$role"
  api_create "$dir" /apis/rbac.authorization.k8s.io/v1/clusterrolebindings "$binding"
}

cmd_start() {
  local dir
  mkdir -p "$1"
  dir=$(cd "$1" && pwd)
  if all_running "$dir"; then
    log "control plane in $dir already running ($(cat "$dir/server"))"
    return 0
  fi
  cache_is_complete || die "no Kubernetes binaries in $BIN: run '$0 build' first"
  local etcd_bin
  etcd_bin=$(command -v etcd) || die "etcd missing: apt-get install etcd-server (or run '$0 build' as root)"
  local tool
  for tool in openssl curl setsid; do
    command -v "$tool" >/dev/null || die "$tool missing: apt-get install $tool"
  done
  [ -x "$PYTHON" ] || die "$PYTHON missing: run scripts/bootstrap.sh (or set PYTHON)"
  # Leftovers of an earlier, stopped (or half-started) run: stop what may remain and start afresh.
  cmd_stop "$dir" >/dev/null
  rm -rf "$dir/etcd" "$dir"/*.log "$dir/pids"

  local t0=$SECONDS ports
  read -r -a ports <<<"$(free_ports 5)"
  local etcd_port=${ports[0]} peer_port=${ports[1]} api_port=${PARALLAMA_K8S_PORT:-${ports[2]}}
  local kcm_port=${ports[3]} sched_port=${ports[4]}
  local server=https://127.0.0.1:$api_port
  echo "$server" >"$dir/server"

  make_certs "$dir"
  # Static token users: the admin (system:masters) for the tests' own setup, the operator with no
  # group (only the ClusterRole below grants it anything), and the two components' own identities,
  # which the default RBAC policy already binds.
  local admin_token operator_token kcm_token sched_token
  admin_token=$(openssl rand -hex 16)
  operator_token=$(openssl rand -hex 16)
  kcm_token=$(openssl rand -hex 16)
  sched_token=$(openssl rand -hex 16)
  echo "$admin_token" >"$dir/admin.token"
  cat >"$dir/tokens.csv" <<EOF
$admin_token,admin,uid-admin,"system:masters"
$operator_token,$OPERATOR_USER,uid-$OPERATOR_USER
$kcm_token,system:kube-controller-manager,uid-kube-controller-manager
$sched_token,system:kube-scheduler,uid-kube-scheduler
EOF
  chmod 600 "$dir/tokens.csv" "$dir/admin.token"
  local ca=$dir/pki/ca.crt
  write_kubeconfig "$dir/admin.kubeconfig" "$server" "$ca" admin "$admin_token"
  write_kubeconfig "$dir/operator.kubeconfig" "$server" "$ca" "$OPERATOR_USER" "$operator_token"
  write_kubeconfig "$dir/controller-manager.kubeconfig" "$server" "$ca" system:kube-controller-manager "$kcm_token"
  write_kubeconfig "$dir/scheduler.kubeconfig" "$server" "$ca" system:kube-scheduler "$sched_token"

  # Every request's metadata (user, verb, resource, response code) in DIR/audit.log: a test can
  # count what the operator wrote.
  cat >"$dir/audit-policy.yaml" <<'EOF'
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  - level: Metadata
EOF
  : >"$dir/audit.log"

  spawn "$dir" etcd "$etcd_bin" --name parallama-e2e --data-dir "$dir/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "parallama-e2e=http://127.0.0.1:$peer_port"
  wait_http "$dir" etcd 30 "http://127.0.0.1:$etcd_port/health"

  spawn "$dir" kube-apiserver "$BIN/kube-apiserver" \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$api_port" --insecure-port=0 \
    --etcd-servers="http://127.0.0.1:$etcd_port" \
    --tls-cert-file="$dir/pki/apiserver.crt" --tls-private-key-file="$dir/pki/apiserver.key" \
    --client-ca-file="$ca" --token-auth-file="$dir/tokens.csv" --authorization-mode=RBAC \
    --service-account-key-file="$dir/pki/sa.pub" --service-account-signing-key-file="$dir/pki/sa.key" \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-cluster-ip-range=10.0.0.0/24 --endpoint-reconciler-type=none \
    --audit-policy-file="$dir/audit-policy.yaml" --audit-log-path="$dir/audit.log" \
    --audit-log-maxsize=200
  wait_http "$dir" kube-apiserver 90 --cacert "$ca" -H "Authorization: Bearer $admin_token" "$server/readyz"

  # nodelifecycle is off: no kubelet runs, so every node would turn NotReady and be tainted.
  spawn "$dir" kube-controller-manager "$BIN/kube-controller-manager" \
    --kubeconfig="$dir/controller-manager.kubeconfig" \
    --authentication-kubeconfig="$dir/controller-manager.kubeconfig" \
    --authorization-kubeconfig="$dir/controller-manager.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port="$kcm_port" --port=0 --leader-elect=false \
    --controllers='*,-nodelifecycle,-cloud-node-lifecycle' --use-service-account-credentials \
    --service-account-private-key-file="$dir/pki/sa.key" --root-ca-file="$ca" \
    --cluster-signing-cert-file="$ca" --cluster-signing-key-file="$dir/pki/ca.key"
  spawn "$dir" kube-scheduler "$BIN/kube-scheduler" \
    --kubeconfig="$dir/scheduler.kubeconfig" \
    --authentication-kubeconfig="$dir/scheduler.kubeconfig" \
    --authorization-kubeconfig="$dir/scheduler.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port="$sched_port" --port=0 --leader-elect=false
  wait_http "$dir" kube-controller-manager 60 -k "https://127.0.0.1:$kcm_port/healthz"
  wait_http "$dir" kube-scheduler 60 -k "https://127.0.0.1:$sched_port/healthz"

  bind_operator_role "$dir"
  log "Kubernetes $K8S_VERSION control plane up in $((SECONDS - t0)) s at $server"
  echo "    admin:    export KUBECONFIG=$dir/admin.kubeconfig"
  echo "    operator: $dir/operator.kubeconfig (user $OPERATOR_USER, the chart's ClusterRole)"
  echo "    e2e:      PARALLAMA_E2E_DIR=$dir .venv/bin/python -m pytest tests/e2e"
  echo "    stop:     $0 stop $dir"
}

# ---------------------------------------------------------------------------------------------------
# stop DIR: SIGTERM to exactly the PIDs `start` recorded (newest first), SIGKILL after 10 s.
# ---------------------------------------------------------------------------------------------------
cmd_stop() {
  local dir=$1
  if [ ! -s "$dir/pids" ]; then
    echo "nothing to stop in $dir"
    return 0
  fi
  local name pid exe lines=() i
  mapfile -t lines <"$dir/pids"
  for ((i = ${#lines[@]} - 1; i >= 0; i--)); do
    read -r name pid exe <<<"${lines[i]}"
    if pid_runs "$pid" "$exe"; then
      kill -TERM "$pid" 2>/dev/null || true
      local waited=0
      while pid_runs "$pid" "$exe" && ((waited < 100)); do
        sleep 0.1
        waited=$((waited + 1))
      done
      if pid_runs "$pid" "$exe"; then
        kill -KILL "$pid" 2>/dev/null || true
      fi
      echo "stopped $name ($pid)"
    fi
  done
  rm -f "$dir/pids"
}

# ---------------------------------------------------------------------------------------------------
main() {
  local cmd=${1:-}
  case "$cmd" in
  build) cmd_build ;;
  start)
    [ $# -eq 2 ] || die "usage: $0 start DIR"
    cmd_start "$2"
    ;;
  stop)
    [ $# -eq 2 ] || die "usage: $0 stop DIR"
    cmd_stop "$2"
    ;;
  *) die "usage: $0 build | start DIR | stop DIR" ;;
  esac
}

# `exit` on the same line: bash reads a script as it runs, so an edit to this file during a long
# build must not be read after main returns.
main "$@"; exit
