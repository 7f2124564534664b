# shellcheck shell=bash
# Shared by up.sh and down.sh: logging, free ports, waiting, and starting and
# stopping the test bed's processes. Sourced, never run.
#
# Every process up.sh starts is recorded in $STATE_DIR/pids/<name> as
# "<pid> <start time in clock ticks since boot>". The start time is read back
# from /proc before any signal is sent, so a stale record whose pid the kernel
# has since handed to another process is never acted on.

# shellcheck source=versions.sh
source "$(dirname "${BASH_SOURCE[0]}")/versions.sh"

log() { printf '[testbed] %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }

# Prints N free TCP ports on 127.0.0.1, one a line. All sockets are held open
# until every port is chosen, so the N are distinct. Another process can still
# take one before we bind it; the window is short and a collision fails loudly.
free_ports() {
  python3 - "$1" <<'PY'
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print("\n".join(str(s.getsockname()[1]) for s in socks))
PY
}

# Field 22 of /proc/PID/stat: when the process started. The command name in
# field 2 may hold spaces and parentheses, so count from the last ')'.
proc_start_time() {
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
  stat="${stat##*) }"
  # shellcheck disable=SC2086
  set -- $stat
  printf '%s\n' "${20}"
}

# True while the process recorded under NAME is still the one we started and
# has not exited (a zombie waiting to be reaped counts as gone).
recorded_alive() {
  local file="$STATE_DIR/pids/$1" pid start state
  [[ -f "$file" ]] || return 1
  read -r pid start <"$file" || return 1
  [[ "$(proc_start_time "$pid")" == "$start" ]] || return 1
  state="$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$pid/status" 2>/dev/null)"
  [[ -n "$state" && "$state" != Z && "$state" != X ]]
}

recorded_pid() {
  local pid rest
  read -r pid rest <"$STATE_DIR/pids/$1" && printf '%s\n' "$pid"
}

# start NAME CMD... runs CMD detached in its own session, stdin from /dev/null
# and output to $STATE_DIR/logs/NAME.log, so it survives the calling shell and
# holds none of the caller's pipes open.
start() {
  local name="$1"; shift
  mkdir -p "$STATE_DIR/pids" "$STATE_DIR/logs"
  # Without job control a background job is not a process group leader, so
  # setsid(1) execs in place and $! is the server's own pid.
  setsid "$@" </dev/null >"$STATE_DIR/logs/$name.log" 2>&1 &
  local pid=$! since
  since="$(proc_start_time "$pid")" || die "$name exited at once; see $STATE_DIR/logs/$name.log"
  printf '%s %s\n' "$pid" "$since" >"$STATE_DIR/pids/$name"
}

# stop NAME: SIGTERM, then SIGKILL if still there after $TESTBED_STOP_GRACE
# seconds. Does nothing if NAME was never started or is already gone.
stop() {
  local name="$1" pid
  if recorded_alive "$name"; then
    pid="$(recorded_pid "$name")"
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_gone "$name" "${TESTBED_STOP_GRACE:-5}"; then
      log "$name (pid $pid) ignored SIGTERM; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      if ! wait_gone "$name" 5; then
        log "$name (pid $pid) survived SIGKILL; leaving its record in $STATE_DIR/pids"
        return 1
      fi
    fi
  fi
  rm -f "$STATE_DIR/pids/$name"
}

# wait_gone NAME SECONDS: true once NAME has exited, false if SECONDS pass.
wait_gone() {
  local i
  for ((i = 0; i < $2 * 10; i++)); do
    recorded_alive "$1" || return 0
    sleep 0.1
  done
  ! recorded_alive "$1"
}

# Processes in start order; stopped in reverse.
TESTBED_PROCESSES=(etcd kube-apiserver moto)

stop_all() {
  local i rc=0
  for ((i = ${#TESTBED_PROCESSES[@]} - 1; i >= 0; i--)); do
    stop "${TESTBED_PROCESSES[i]}" || rc=1
  done
  return "$rc"
}

# Everything up.sh writes except the logs, which are kept for post-mortems.
remove_state() {
  rm -rf "$STATE_DIR/etcd" "$STATE_DIR/pki" "$STATE_DIR/kubeconfig" "$STATE_DIR/env"
  rmdir "$STATE_DIR/pids" 2>/dev/null || true
}

# wait_until NAME DESCRIPTION CMD...: retries CMD until it succeeds, NAME's
# process dies, or $TESTBED_TIMEOUT seconds pass. On failure prints the tail of
# NAME's log and returns 1.
wait_until() {
  local name="$1" what="$2"; shift 2
  local deadline=$((SECONDS + ${TESTBED_TIMEOUT:-120}))
  until "$@" >/dev/null 2>&1; do
    if ! recorded_alive "$name"; then
      log "$name exited before $what; last lines of $STATE_DIR/logs/$name.log:"
      tail -n 40 "$STATE_DIR/logs/$name.log" >&2
      return 1
    fi
    if ((SECONDS >= deadline)); then
      log "$name: no $what after ${TESTBED_TIMEOUT:-120}s; last lines of $STATE_DIR/logs/$name.log:"
      tail -n 40 "$STATE_DIR/logs/$name.log" >&2
      return 1
    fi
    sleep 0.2
  done
}
