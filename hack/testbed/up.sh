#!/usr/bin/env bash
# Starts the local test bed: etcd and kube-apiserver on loopback (the control
# plane controller-runtime's envtest runs: no scheduler, no controller manager,
# no nodes) and moto's EC2 server. Builds what it needs on first use.
#
#   hack/testbed/up.sh [--no-control-plane] [--no-moto] STATE_DIR
#
# STATE_DIR receives kubeconfig, env (to be sourced), pids/, logs/ and the
# temporary data. The path of the env file is printed on stdout; progress goes
# to stderr. Stop everything with hack/testbed/down.sh STATE_DIR.
#
# Environment: TESTBED_TIMEOUT (seconds to wait for each server, default 120),
# AMICOPY_CACHE (build cache root, default ~/.cache/ami-copy-operator).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
source "$here/lib.sh"

usage() { sed -n 's/^#   //p' "${BASH_SOURCE[0]}" >&2; exit 2; }

control_plane=1 moto=1
while (($#)); do
  case "$1" in
    --no-control-plane) control_plane=0 ;;
    --no-moto) moto=0 ;;
    -h | --help) usage ;;
    -*) log "unknown option: $1"; usage ;;
    *) break ;;
  esac
  shift
done
(($# == 1)) || usage
((control_plane || moto)) || die "nothing to start"

mkdir -p "$1"
STATE_DIR="$(cd "$1" && pwd)"
for p in "${TESTBED_PROCESSES[@]}"; do
  recorded_alive "$p" && die "$p is already running from $STATE_DIR; run down.sh first"
done
remove_state
mkdir -p "$STATE_DIR/logs"

components=()
((control_plane)) && components+=(etcd kube-apiserver)
((moto)) && components+=(moto)
"$here/build.sh" "${components[@]}"

# From here on, a failure or an interrupt leaves nothing behind but the logs.
trap 'rc=$?; trap - EXIT; if ((rc)); then stop_all || true; remove_state; fi; exit "$rc"' EXIT
trap 'exit 130' INT TERM

started=$SECONDS
env_vars=()

# Certificates as envtest makes them: one CA that signs the serving cert and
# the admin client cert, plus an RSA key pair for service-account tokens.
make_pki() {
  local pki="$STATE_DIR/pki"
  mkdir -m 700 "$pki"
  (
    umask 077
    cd "$pki"
    cat >ext.cnf <<'CNF'
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign, digitalSignature
subjectKeyIdentifier = hash

[serving]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
authorityKeyIdentifier = keyid

[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
authorityKeyIdentifier = keyid
CNF
    # issue NAME SUBJECT EXTENSIONS [CA]: a fresh RSA key and a 30-day cert,
    # self-signed when no CA is given.
    issue() {
      local sign=(-signkey "$1.key")
      [[ $# -eq 4 ]] && sign=(-CA "$4.crt" -CAkey "$4.key")
      openssl genpkey -quiet -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$1.key"
      openssl req -new -key "$1.key" -subj "$2" -out "$1.csr"
      openssl x509 -req -in "$1.csr" "${sign[@]}" -days 30 \
        -set_serial "0x$(openssl rand -hex 16)" \
        -extfile ext.cnf -extensions "$3" -out "$1.crt" 2>/dev/null
      rm "$1.csr"
    }
    issue ca /CN=testbed-ca ca
    issue serving /CN=kube-apiserver serving ca
    issue admin /O=system:masters/CN=admin client ca
    openssl genpkey -quiet -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out sa.key
    openssl pkey -in sa.key -pubout -out sa.pub
  )
}

write_kubeconfig() {
  local pki="$STATE_DIR/pki" out="$STATE_DIR/kubeconfig"
  b64() { base64 -w0 <"$1"; }
  (
    umask 077
    cat >"$out.tmp" <<YAML
apiVersion: v1
kind: Config
clusters:
  - name: testbed
    cluster:
      server: https://127.0.0.1:$1
      certificate-authority-data: $(b64 "$pki/ca.crt")
users:
  - name: admin
    user:
      client-certificate-data: $(b64 "$pki/admin.crt")
      client-key-data: $(b64 "$pki/admin.key")
contexts:
  - name: testbed
    context:
      cluster: testbed
      user: admin
current-context: testbed
YAML
    mv "$out.tmp" "$out"
  )
}

start_control_plane() {
  local etcd_client etcd_peer api
  { read -r etcd_client; read -r etcd_peer; read -r api; } < <(free_ports 3)

  local etcd_url="http://127.0.0.1:$etcd_client" peer_url="http://127.0.0.1:$etcd_peer"
  start etcd "$TESTBED_CACHE/etcd-$ETCD_VERSION/etcd" \
    --name testbed \
    --data-dir "$STATE_DIR/etcd" \
    --listen-client-urls "$etcd_url" \
    --advertise-client-urls "$etcd_url" \
    --listen-peer-urls "$peer_url" \
    --initial-advertise-peer-urls "$peer_url" \
    --initial-cluster "testbed=$peer_url" \
    --initial-cluster-state new \
    --unsafe-no-fsync
  # Certificates are made while etcd starts.
  make_pki
  wait_until etcd "healthy /health" curl -fsS "$etcd_url/health"

  local pki="$STATE_DIR/pki"
  # The lease endpoint reconciler refuses a loopback advertise address; with no
  # nodes nothing could reach the `kubernetes` Service's endpoints anyway.
  start kube-apiserver "$TESTBED_CACHE/kubernetes-$KUBERNETES_VERSION/kube-apiserver" \
    --bind-address 127.0.0.1 \
    --advertise-address 127.0.0.1 \
    --endpoint-reconciler-type none \
    --secure-port "$api" \
    --cert-dir "$pki" \
    --tls-cert-file "$pki/serving.crt" \
    --tls-private-key-file "$pki/serving.key" \
    --client-ca-file "$pki/ca.crt" \
    --etcd-servers "$etcd_url" \
    --authorization-mode RBAC \
    --disable-admission-plugins ServiceAccount \
    --service-account-issuer https://kubernetes.default.svc \
    --service-account-key-file "$pki/sa.pub" \
    --service-account-signing-key-file "$pki/sa.key" \
    --service-cluster-ip-range 10.0.0.0/24 \
    --allow-privileged=true
  write_kubeconfig "$api"
  wait_until kube-apiserver "ok from /readyz" \
    curl -fsS --cacert "$pki/ca.crt" --cert "$pki/admin.crt" --key "$pki/admin.key" \
    "https://127.0.0.1:$api/readyz"
  log "kube-apiserver $KUBERNETES_VERSION ready at https://127.0.0.1:$api (etcd $ETCD_VERSION at $etcd_url)"

  env_vars+=(KUBECONFIG "$STATE_DIR/kubeconfig" AMICOPY_KUBECONFIG "$STATE_DIR/kubeconfig")
}

# moto starts first and is waited for last: it comes up while etcd and
# kube-apiserver do.
moto_url=
launch_moto() {
  local port
  port="$(free_ports 1)"
  moto_url="http://127.0.0.1:$port"
  # No default AMIs: tests see only the images they register.
  start moto env MOTO_EC2_LOAD_DEFAULT_AMIS=false \
    "$TESTBED_CACHE/moto-$MOTO_VERSION/bin/moto_server" -H 127.0.0.1 -p "$port"
}

await_moto() {
  wait_until moto "answer from /moto-api/data.json" curl -fsS "$moto_url/moto-api/data.json"
  log "moto $MOTO_VERSION ready at $moto_url"
  env_vars+=(AMICOPY_MOTO_ENDPOINT "$moto_url")
}

# Not `((x)) && f`: bash ignores `set -e` inside a function called that way.
if ((moto)); then launch_moto; fi
if ((control_plane)); then start_control_plane; fi
if ((moto)); then await_moto; fi

printf 'export %s=%q\n' "${env_vars[@]}" >"$STATE_DIR/env.tmp"
mv "$STATE_DIR/env.tmp" "$STATE_DIR/env"
log "up in $((SECONDS - started))s; source $STATE_DIR/env"
printf '%s\n' "$STATE_DIR/env"
