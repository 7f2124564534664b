#!/usr/bin/env bash
# Stops what hack/testbed/up.sh started from STATE_DIR (SIGTERM, then SIGKILL
# after TESTBED_STOP_GRACE seconds, default 5) and removes its data, keeping
# STATE_DIR/logs. Signals only the processes recorded in STATE_DIR/pids, and
# only while each is still the process that was recorded. Safe to run twice.
#
#   hack/testbed/down.sh STATE_DIR
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
source "$here/lib.sh"

if [[ $# -ne 1 ]]; then
  sed -n 's/^#   //p' "${BASH_SOURCE[0]}" >&2
  exit 2
fi
[[ -d "$1" ]] || exit 0
STATE_DIR="$(cd "$1" && pwd)"

rc=0
stop_all || rc=1
# Keep the data of anything still running, so a second run can try again.
((rc)) || remove_state
exit "$rc"
