#!/usr/bin/env bash
# Scale benchmark (results in docs/benchmarks.md): builds the operator in
# release mode, starts a real kube-apiserver + etcd, and runs benches/scale.rs,
# which starts the EC2 simulator and the operator binary and prints a table.
#
#   hack/bench.sh [--sizes 100,1000,10000] [--modes batched,per-object]
#                 [--naive-max 1000] [--interval-secs 5] [--moto-sizes 100,1000]
#                 [--paced-sizes 100] [--copy-secs 10]
#                 [--rollout-max 1000] [--json FILE]
#
# The release build takes about 20 minutes on 2 cores the first time; it goes
# to its own target directory so that it never blocks the test build.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
export CARGO_TARGET_DIR="${AMICOPY_BENCH_TARGET_DIR:-${AMICOPY_CACHE:-$HOME/.cache/ami-copy-operator}/target-release}"

hack/testbed/build.sh etcd kube-apiserver moto
cargo build --release --locked -p ami-copy-operator --bin ami-copy-operator
cargo bench --locked --bench scale --no-run

state="$(mktemp -d -t amicopy-bench.XXXXXX)"
cleanup() {
  hack/testbed/down.sh "$state" || true
  rm -rf "$state"
}
trap cleanup EXIT
# shellcheck disable=SC1090
source "$(hack/testbed/up.sh "$state")"
kubectl apply --server-side -f crds/ >/dev/null
kubectl wait --for condition=Established crd/amicopies.amicopy.dev --timeout 60s >/dev/null

# The peers' pids, so that the benchmark can say where the CPU went.
peers=""
for p in kube-apiserver etcd; do
  read -r pid _ <"$state/pids/$p" && peers+="$p=$pid,"
done
export AMICOPY_BENCH_PEERS="$peers"

# What --json records beside the figures.
export AMICOPY_BENCH_DATE="$(date -u +%FT%TZ)"
export AMICOPY_BENCH_COMMIT="$(git rev-parse HEAD)$(git diff --quiet HEAD -- src benches Cargo.lock || echo -dirty)"
export AMICOPY_BENCH_COMMAND="hack/bench.sh $*"
export AMICOPY_BENCH_MEMORY_GIB="$(free -g | awk '/Mem:/ {print $2}')"
echo "# $(date -u +%F) $(nproc) cores, $AMICOPY_BENCH_MEMORY_GIB GiB; hack/bench.sh $*"
AMICOPY_OPERATOR_BIN="$CARGO_TARGET_DIR/release/ami-copy-operator" \
  cargo bench --locked --bench scale -- "$@"
