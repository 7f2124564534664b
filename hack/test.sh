#!/usr/bin/env bash
# Runs every test: formatting and lints, unit tests, and the integration tests
# against the local test bed (real kube-apiserver + etcd, moto, and the EC2
# image simulator). Installs and builds what it needs on first run; heavy
# builds are cached under ~/.cache/ami-copy-operator, outside the repository.
#
#   hack/test.sh [extra cargo test arguments, e.g. a test name filter]
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${AMICOPY_CACHE:-$HOME/.cache/ami-copy-operator}/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
log() { printf '[test] %s\n' "$*" >&2; }

for tool in cargo go python3 openssl; do
  command -v "$tool" >/dev/null || { log "missing $tool: install the Rust, Go and Python toolchains first"; exit 1; }
done

start=$SECONDS
log "building the test bed (cached after the first run)"
hack/testbed/build.sh etcd kube-apiserver moto helm kstatus argocd-health promtool
# shellcheck source=hack/testbed/versions.sh
source hack/testbed/versions.sh
export AMICOPY_HELM="$TESTBED_CACHE/helm-$HELM_VERSION/helm"
export AMICOPY_KSTATUS="$TESTBED_CACHE/kstatus-$CLI_UTILS_VERSION/kstatus"
export AMICOPY_ARGOCD_HEALTH="$TESTBED_CACHE/argocd-health-$GOPHER_LUA_VERSION/argocd-health"
export AMICOPY_PROMTOOL="$TESTBED_CACHE/promtool-$PROMETHEUS_VERSION/promtool"

log "cargo fmt --check"
cargo fmt --all --check
log "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

state="$(mktemp -d -t amicopy-testbed.XXXXXX)"
cleanup() {
  hack/testbed/down.sh "$state" || true
  rm -rf "$state"
}
trap cleanup EXIT
# shellcheck disable=SC1090
source "$(hack/testbed/up.sh "$state")"

log "cargo test"
# Every test binary runs even when one fails, so one run shows every failure.
cargo test --workspace --locked --no-fail-fast "$@"
log "all tests passed in $((SECONDS - start)) s"
