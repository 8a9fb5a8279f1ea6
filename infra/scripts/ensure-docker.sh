#!/usr/bin/env bash
# Make sure a Docker engine is reachable, installing and starting one if needed.
#
# Idempotent: when `docker info` already answers, it only says so.
# Otherwise (as root) it installs Debian's docker.io if dockerd is missing and
# starts dockerd in the background without bridge/iptables (the sandbox runs
# its containers with --network none), logging to $AGENTBUS_DOCKERD_LOG.
# As root it also installs Debian's docker-compose when missing (the tests
# validate infra/compose.yaml with it).
#
# Environment:
#   AGENTBUS_DOCKERD_LOG      dockerd log file (default /var/log/agentbus-dockerd.log)
#   AGENTBUS_DOCKERD_TIMEOUT  seconds to wait for the engine (default 60)
set -euo pipefail

LOG="${AGENTBUS_DOCKERD_LOG:-/var/log/agentbus-dockerd.log}"
TIMEOUT="${AGENTBUS_DOCKERD_TIMEOUT:-60}"
# dockerd lives in /usr/sbin, which a non-login PATH may lack.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

say() { echo "ensure-docker: $*"; }
die() { echo "ensure-docker: ERROR: $*" >&2; exit 1; }

engine_up() { docker info >/dev/null 2>&1; }

# shellcheck source=apt.sh
source "$(dirname "${BASH_SOURCE[0]}")/apt.sh"

# docker-compose validates infra/compose.yaml in the tests (no engine needed for
# that). Debian's package is Compose v1 (1.29); only installed when missing and root.
if ! command -v docker-compose >/dev/null 2>&1; then
    if [[ $(id -u) -eq 0 ]]; then
        say "installing docker-compose"
        # Without its recommended docker.io: the engine is handled below, and may
        # come from other packages (docker-ce) that docker.io would clash with.
        apt_install --no-install-recommends docker-compose
    else
        say "docker-compose is missing; tests/integration/test_compose.py will be skipped" \
            "(install it with: sudo apt-get install docker-compose)"
    fi
fi

if command -v docker >/dev/null 2>&1 && engine_up; then
    say "engine already running (server $(docker version --format '{{.Server.Version}}' 2>/dev/null || echo '?'))"
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    if [[ -S /var/run/docker.sock ]]; then
        die "a Docker engine seems to be running but $(id -un) cannot reach it.
  Add yourself to the 'docker' group (sudo usermod -aG docker $(id -un), then log in again),
  or point DOCKER_HOST at a reachable engine."
    fi
    die "no Docker engine is reachable and this script is not running as root.
  Run it once as root:  sudo bash $0
  (it installs docker.io if needed and starts dockerd), or start a Docker engine yourself."
fi

if ! command -v dockerd >/dev/null 2>&1 || ! command -v docker >/dev/null 2>&1; then
    say "installing docker.io"
    apt_install docker.io
    command -v dockerd >/dev/null 2>&1 || die "dockerd still missing after installing docker.io"
fi

if pgrep -x dockerd >/dev/null 2>&1; then
    # An engine is starting (or hung): wait for it rather than start a second one.
    say "dockerd process already present (pid $(pgrep -x dockerd | tr '\n' ' ')); waiting for it"
    started_pid=""
else
    # A dockerd that was killed leaves its pid file behind, and a new one refuses to start.
    if [[ -f /var/run/docker.pid ]]; then
        say "removing stale /var/run/docker.pid"
        rm -f /var/run/docker.pid
    fi
    mkdir -p "$(dirname "$LOG")"
    say "starting dockerd (log: $LOG)"
    {
        echo "---- $(date -u '+%Y-%m-%dT%H:%M:%SZ') started by ensure-docker.sh ----"
    } >>"$LOG"
    setsid nohup dockerd --bridge=none --iptables=false --ip-forward=false \
        >>"$LOG" 2>&1 </dev/null &
    started_pid=$!
fi

for ((i = 0; i < TIMEOUT; i++)); do
    if engine_up; then
        say "engine ready after ${i}s (server $(docker version --format '{{.Server.Version}}' 2>/dev/null || echo '?'))"
        exit 0
    fi
    if [[ -n "$started_pid" ]] && ! kill -0 "$started_pid" 2>/dev/null; then
        echo "ensure-docker: ERROR: dockerd exited during startup; last lines of $LOG:" >&2
        tail -n 30 "$LOG" >&2 || true
        exit 1
    fi
    sleep 1
done

echo "ensure-docker: ERROR: Docker engine did not answer within ${TIMEOUT}s; last lines of $LOG:" >&2
tail -n 30 "$LOG" >&2 || true
exit 1
