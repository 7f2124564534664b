#!/usr/bin/env bash
# Builds the test bed's binaries from Go modules with the machine's Go
# toolchain (through the Go module proxy; no binary downloads) and installs
# moto in a virtualenv. Everything goes to $TESTBED_CACHE, keyed by version, so
# only the first run on a machine pays for it. Prints nothing but progress on
# stderr; idempotent.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=versions.sh
source "$here/versions.sh"

log() { printf '[testbed] %s\n' "$*" >&2; }

# Runs one build step under a lock per component, so test runs that start at
# the same time on a cold cache build once and wait for each other. Each step
# runs in a subshell whose EXIT trap removes its scratch directory.
locked() {
  local name="$1"; shift
  mkdir -p "$TESTBED_CACHE"
  (
    exec 9>"$TESTBED_CACHE/.$name.lock"
    if ! flock -n 9; then
      log "waiting for another build of $name"
      flock 9
    fi
    "$@"
  )
}

build_kube_apiserver() {
  local out="$TESTBED_CACHE/kubernetes-$KUBERNETES_VERSION/kube-apiserver"
  [[ -x "$out" ]] && return
  local work; work="$(mktemp -d)"
  # shellcheck disable=SC2064 # expand now: $work is local
  trap "rm -rf '$work'" EXIT
  log "building kube-apiserver $KUBERNETES_VERSION (first run only; ~10 min on 2 cores)"
  local minor="${KUBERNETES_VERSION#v1.}"; minor="${minor%%.*}"
  local staging="v0.${KUBERNETES_VERSION#v1.}"
  # The release's own go.mod lists its staging modules as `replace k8s.io/x =>
  # ./staging/src/k8s.io/x`; outside the repository they must point at the
  # published v0.X.Y tags instead.
  local gomod
  gomod="$(cd "$work" && go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
  {
    echo "module amicopy.dev/testbed/kube-apiserver"
    echo
    echo "go $(go env GOVERSION | sed 's/^go//; s/^\([0-9]*\.[0-9]*\).*/\1/')"
    echo
    echo "require k8s.io/kubernetes $KUBERNETES_VERSION"
    echo
    grep -oE '^\s*k8s\.io/[a-z0-9-]+ => \./staging/src/k8s\.io/[a-z0-9-]+' "$gomod" \
      | awk -v v="$staging" '{print "replace " $1 " => " $1 " " v}'
  } >"$work/go.mod"
  cat >"$work/tools.go" <<'GO'
//go:build tools

package tools

import _ "k8s.io/kubernetes/cmd/kube-apiserver"
GO
  (cd "$work" && go mod tidy >&2)
  local pkg=k8s.io/component-base/version
  local ld="-s -w -X $pkg.gitVersion=$KUBERNETES_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  ld+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  ld+=" -X k8s.io/client-go/pkg/version.gitVersion=$KUBERNETES_VERSION"
  mkdir -p "$(dirname "$out")"
  (cd "$work" && CGO_ENABLED=0 go build -trimpath -ldflags "$ld" -o "$out.tmp" k8s.io/kubernetes/cmd/kube-apiserver)
  mv "$out.tmp" "$out"
}

build_etcd() {
  local out="$TESTBED_CACHE/etcd-$ETCD_VERSION/etcd"
  [[ -x "$out" ]] && return
  local work; work="$(mktemp -d)"
  # shellcheck disable=SC2064 # expand now: $work is local
  trap "rm -rf '$work'" EXIT
  log "building etcd $ETCD_VERSION (first run only)"
  cat >"$work/go.mod" <<GOMOD
module amicopy.dev/testbed/etcd

go $(go env GOVERSION | sed 's/^go//; s/^\([0-9]*\.[0-9]*\).*/\1/')

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
GOMOD
  cat >"$work/tools.go" <<'GO'
//go:build tools

package tools

import _ "go.etcd.io/etcd/server/v3"
GO
  (cd "$work" && go mod tidy >&2)
  mkdir -p "$(dirname "$out")"
  (cd "$work" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$out.tmp" go.etcd.io/etcd/server/v3)
  mv "$out.tmp" "$out"
}

build_helm() {
  local out="$TESTBED_CACHE/helm-$HELM_VERSION/helm"
  [[ -x "$out" ]] && return
  log "building helm $HELM_VERSION (first run only)"
  # As helm's Makefile does: the Kubernetes version `helm template` and
  # `helm lint` assume is taken from the client-go release helm is built with
  # (v0.X.Y is Kubernetes 1.X); without it they assume 1.20.
  local work; work="$(mktemp -d)"
  # shellcheck disable=SC2064 # expand now: $work is local
  trap "rm -rf '$work'" EXIT
  local gomod client_go minor
  gomod="$(cd "$work" && go mod download -json "helm.sh/helm/v3@$HELM_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')"
  client_go="$(awk '$1 == "k8s.io/client-go" {print $2}' "$gomod")"
  minor="$(cut -d. -f2 <<<"$client_go")"
  [[ -n "$minor" ]] || { log "no k8s.io/client-go in helm's go.mod"; return 1; }
  local ld="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  ld+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
  local pkg
  for pkg in helm.sh/helm/v3/pkg/chartutil helm.sh/helm/v3/pkg/lint/rules; do
    ld+=" -X $pkg.k8sVersionMajor=1 -X $pkg.k8sVersionMinor=$minor"
  done
  mkdir -p "$(dirname "$out")"
  (cd "$work" && GOBIN="$work/bin" CGO_ENABLED=0 go install -trimpath -ldflags "$ld" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION")
  mv "$work/bin/helm" "$out"
}

# Builds one of the test bed's small Go programs (hack/testbed/<name>/main.go)
# against <module>@<version> into $TESTBED_CACHE/<name>-<version>/<name>;
# rebuilt when its source is newer than the binary.
build_program() {
  local name="$1" module="$2" version="$3"; shift 3
  local out="$TESTBED_CACHE/$name-$version/$name"
  [[ -x "$out" && "$out" -nt "$here/$name/main.go" ]] && return
  local work; work="$(mktemp -d)"
  # shellcheck disable=SC2064 # expand now: $work is local
  trap "rm -rf '$work'" EXIT
  log "building $name with $module $version (first run only)"
  cp "$here/$name/main.go" "$work/"
  (cd "$work" && go mod init "amicopy.dev/testbed/$name" >/dev/null 2>&1 \
    && go get "$module@$version" "$@" >/dev/null 2>&1 \
    && go mod tidy >/dev/null 2>&1 \
    && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$work/$name" .)
  mkdir -p "$(dirname "$out")"
  mv "$work/$name" "$out"
}

# promtool, for `promtool test rules` over the chart's PrometheusRule.
build_promtool() {
  local out="$TESTBED_CACHE/promtool-$PROMETHEUS_VERSION/promtool"
  [[ -x "$out" ]] && return
  local work; work="$(mktemp -d)"
  # shellcheck disable=SC2064 # expand now: $work is local
  trap "rm -rf '$work'" EXIT
  log "building promtool from github.com/prometheus/prometheus $PROMETHEUS_VERSION (first run only; a few minutes)"
  (cd "$work" && GOBIN="$work/bin" CGO_ENABLED=0 go install -trimpath -ldflags "-s -w" \
    "github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_VERSION")
  mkdir -p "$(dirname "$out")"
  mv "$work/bin/promtool" "$out"
}

install_moto() {
  local venv="$TESTBED_CACHE/moto-$MOTO_VERSION"
  [[ -x "$venv/bin/moto_server" ]] && return
  log "installing moto $MOTO_VERSION into a virtualenv (first run only)"
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet "moto[ec2,server]==$MOTO_VERSION"
}

what=("$@")
[[ ${#what[@]} -gt 0 ]] || what=(etcd kube-apiserver moto helm kstatus argocd-health promtool)
for w in "${what[@]}"; do
  case "$w" in
    kube-apiserver) locked "$w" build_kube_apiserver ;;
    etcd) locked "$w" build_etcd ;;
    helm) locked "$w" build_helm ;;
    # kstatus, the status library of Flux, kpt and cli-utils.
    kstatus) locked "$w" build_program kstatus sigs.k8s.io/cli-utils "$CLI_UTILS_VERSION" ;;
    # The Lua VM Argo CD runs health checks with.
    argocd-health) locked "$w" build_program argocd-health github.com/yuin/gopher-lua "$GOPHER_LUA_VERSION" sigs.k8s.io/yaml ;;
    promtool) locked "$w" build_promtool ;;
    moto) locked "$w" install_moto ;;
    *) echo "unknown component: $w" >&2; exit 2 ;;
  esac
done
