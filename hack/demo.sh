#!/usr/bin/env bash
# Brings up the local test bed (real kube-apiserver + etcd, the EC2 image
# simulator), seeds a source AMI, installs the CRD, runs the operator, applies
# examples/basic.yaml and shows the AmiCopy go from pending to available.
#
#   hack/demo.sh          start, and watch the copy converge
#   hack/demo.sh down     stop everything the demo started
#
# Everything lives in $AMICOPY_DEMO_DIR (default /tmp/amicopy-demo).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
STATE_DIR="${AMICOPY_DEMO_DIR:-/tmp/amicopy-demo}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${AMICOPY_CACHE:-$HOME/.cache/ami-copy-operator}/target}"
# shellcheck source=testbed/lib.sh
source hack/testbed/lib.sh

if [[ "${1:-}" == down ]]; then
  [[ -d "$STATE_DIR/pids" ]] && { stop operator; stop ec2-sim; }
  hack/testbed/down.sh "$STATE_DIR"
  rm -rf "$STATE_DIR"
  exit 0
fi

say() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }

say "building the operator and the EC2 simulator"
cargo build --quiet --locked -p ami-copy-operator -p ec2-sim --bins
bin="$CARGO_TARGET_DIR/debug"

say "starting kube-apiserver and etcd (first run builds them: ~10 min)"
mkdir -p "$STATE_DIR"
# shellcheck disable=SC1090
source "$(hack/testbed/up.sh --no-moto "$STATE_DIR")"

say "starting the EC2 image simulator (copies stay pending for 8 s)"
read -r sim_port metrics_port < <(free_ports 2 | paste -sd' ')
start ec2-sim "$bin/ec2-sim" --listen "127.0.0.1:$sim_port" --copy-seconds 8
sim="http://127.0.0.1:$sim_port"
wait_until ec2-sim "an answer" curl -fsS "$sim/_sim/stats" -o /dev/null

say "seeding a source AMI in us-east-1"
image_id="$(curl -fsS -X POST "$sim/_sim/images" -H 'content-type: application/json' \
  -d '{"region":"us-east-1","name":"golden-base-2026.11"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["image_id"])')"
echo "source AMI: $image_id"

say "installing the CRD from crds/"
kubectl apply --server-side -f crds/ >/dev/null
kubectl wait --for condition=Established crd/amicopies.amicopy.dev --timeout 60s >/dev/null

say "starting the operator (log: $STATE_DIR/logs/operator.log, metrics: http://127.0.0.1:$metrics_port/metrics)"
start operator env AWS_ACCESS_KEY_ID=demo AWS_SECRET_ACCESS_KEY=demo AWS_REGION=us-east-1 \
  AWS_EC2_METADATA_DISABLED=true "$bin/ami-copy-operator" run --ec2-endpoint-url "$sim" --sts-endpoint-url "$sim" \
  --metrics-addr "127.0.0.1:$metrics_port" --poll-interval 2s
wait_until operator "readiness" curl -fsS "http://127.0.0.1:$metrics_port/readyz" -o /dev/null

say "applying examples/basic.yaml with the seeded AMI"
sed "s/ami-0123456789abcdef0/$image_id/" examples/basic.yaml | kubectl apply -f -

say "kubectl get amicopies -w (until Ready)"
kubectl get amicopies -w &
watcher=$!
kubectl wait --for condition=Ready amicopy/golden-base --timeout 120s >/dev/null
sleep 1
kill "$watcher" 2>/dev/null || true
wait "$watcher" 2>/dev/null || true

say "status of the AmiCopy"
kubectl get amicopy golden-base -o jsonpath='{range .status.destinations[*]}{.region}{"\t"}{.imageId}{"\t"}{.state}{"\n"}{end}'
kubectl get events --field-selector involvedObject.name=golden-base -o custom-columns=REASON:.reason,MESSAGE:.message 2>/dev/null || true

cat <<MSG

The test bed is still running. Try:
  export KUBECONFIG=$STATE_DIR/kubeconfig
  kubectl describe amicopy golden-base
  kubectl delete amicopy golden-base      # the finalizer deregisters both copies
  curl -s $sim/_sim/images | python3 -m json.tool
Tear everything down with:
  hack/demo.sh down
MSG
