#!/usr/bin/env bash
# Restarts the control plane that hack/testbed/up.sh started in STATE_DIR:
# stops kube-apiserver and etcd, stays down for SECONDS (default 0), then
# starts both again with the command lines they had, so the ports, the
# certificates and etcd's data are the same and clients reconnect as they
# would to a restarted cluster. Progress goes to stderr.
#
#   hack/testbed/restart.sh STATE_DIR [SECONDS]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
source "$here/lib.sh"

if [[ $# -lt 1 || $# -gt 2 ]]; then
  sed -n 's/^#   //p' "${BASH_SOURCE[0]}" >&2
  exit 2
fi
STATE_DIR="$(cd "$1" && pwd)"
down_for="${2:-0}"

# The command line of a recorded process, NUL-separated as /proc keeps it.
cmdline() {
  recorded_alive "$1" || die "$1 is not running from $STATE_DIR"
  mapfile -d '' -t "$2" <"/proc/$(recorded_pid "$1")/cmdline"
}
cmdline etcd etcd_cmd
cmdline kube-apiserver api_cmd

# --flag VALUE from a command line.
flag() {
  local name="$1"; shift
  while (($#)); do
    [[ "$1" == "$name" ]] && { printf '%s\n' "$2"; return; }
    shift
  done
  die "no $name in the recorded command line"
}
etcd_url="$(flag --listen-client-urls "${etcd_cmd[@]}")"
api_port="$(flag --secure-port "${api_cmd[@]}")"

started=$SECONDS
stop kube-apiserver
stop etcd
log "control plane down"
sleep "$down_for"

start etcd "${etcd_cmd[@]}"
wait_until etcd "healthy /health" curl -fsS "$etcd_url/health"
start kube-apiserver "${api_cmd[@]}"
pki="$STATE_DIR/pki"
wait_until kube-apiserver "ok from /readyz" \
  curl -fsS --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" \
  "https://127.0.0.1:$api_port/readyz"
log "control plane back in $((SECONDS - started))s"
