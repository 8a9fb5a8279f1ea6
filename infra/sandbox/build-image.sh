#!/usr/bin/env bash
# Build the sandbox image without any container registry.
#
# A minimal Debian root filesystem of the host's release (python3, coreutils,
# bash, procps) is made with mmdebstrap from the machine's own apt sources and
# turned into an image with `docker import`. infra/sandbox/Dockerfile is the
# equivalent for machines that can pull debian:*-slim.
#
# Idempotent: does nothing when the image exists, unless --force is given.
#
# Usage: infra/sandbox/build-image.sh [--force]
# Environment:
#   AGENTBUS_SANDBOX_IMAGE  image name (default agentbus-sandbox:latest)
#   AGENTBUS_APT_SOURCES    apt sources file to build from (default: the host's)
set -euo pipefail

IMAGE="${AGENTBUS_SANDBOX_IMAGE:-agentbus-sandbox:latest}"
LOCK="/tmp/agentbus-sandbox-image.lock"
PACKAGES="python3,coreutils,bash,procps"
SANDBOX_UID=65534
SANDBOX_GID=65534
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"

say() { echo "build-image: $*"; }
die() { echo "build-image: ERROR: $*" >&2; exit 1; }

force=0
for arg in "$@"; do
    case "$arg" in
        --force) force=1 ;;
        -h | --help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument: $arg (usage: $0 [--force])" ;;
    esac
done

image_exists() { docker image inspect "$IMAGE" >/dev/null 2>&1; }

# shellcheck source=../scripts/apt.sh
source "$HERE/../scripts/apt.sh"

# The image must run untrusted code offline, read-only, as nobody.
verify() {
    local run=(docker run --rm --network none --user "$SANDBOX_UID:$SANDBOX_GID" --read-only "$IMAGE")
    local out
    out="$("${run[@]}" python3 -c 'print(2+2)')" || return 1
    [[ "$out" == "4" ]] || { echo "python3 printed '$out', expected 4" >&2; return 1; }
    "${run[@]}" sh -c 'command -v timeout && command -v ps && command -v bash' >/dev/null ||
        { echo "timeout/ps/bash missing from the image" >&2; return 1; }
    out="$("${run[@]}" stat -c '%u:%g %a' /workspace)" || return 1
    [[ "$out" == "$SANDBOX_UID:$SANDBOX_GID 755" ]] ||
        { echo "/workspace is '$out', expected '$SANDBOX_UID:$SANDBOX_GID 755'" >&2; return 1; }
}

# The engine must answer before anything else (make sandbox-image runs ensure-docker first,
# but this script is also run on its own).
if ! docker info >/dev/null 2>&1; then
    bash "$HERE/../scripts/ensure-docker.sh"
fi

if [[ $force -eq 0 ]] && image_exists; then
    say "image $IMAGE already present (use --force to rebuild)"
    exit 0
fi

# One build at a time; a second invocation waits, then finds the image built.
exec 9>"$LOCK"
if ! flock -n 9; then
    say "another build holds $LOCK; waiting"
    flock 9
fi
if [[ $force -eq 0 ]] && image_exists; then
    say "image $IMAGE was built meanwhile"
    exit 0
fi

if ! command -v mmdebstrap >/dev/null 2>&1; then
    [[ $(id -u) -eq 0 ]] || die "mmdebstrap is missing; install it as root: apt-get install -y mmdebstrap"
    say "installing mmdebstrap"
    apt_install mmdebstrap
fi

# Build from the machine's own apt configuration, never a hard-coded mirror.
# shellcheck source=/dev/null
SUITE="$(. /etc/os-release && echo "${VERSION_CODENAME:-}")"
[[ -n "$SUITE" ]] || die "no VERSION_CODENAME in /etc/os-release"
SOURCES="${AGENTBUS_APT_SOURCES:-}"
if [[ -z "$SOURCES" ]]; then
    for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
        if [[ -s "$f" ]]; then SOURCES="$f"; break; fi
    done
fi
[[ -n "$SOURCES" && -s "$SOURCES" ]] ||
    die "no apt sources found (looked for /etc/apt/sources.list.d/debian.sources and /etc/apt/sources.list); set AGENTBUS_APT_SOURCES"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/agentbus-sandbox-build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
ROOTFS="$WORK/rootfs.tar"

say "building $SUITE rootfs ($PACKAGES) from $SOURCES"
t0=$SECONDS
mmdebstrap --quiet --variant=apt --include="$PACKAGES" \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook="mkdir -p \"\$1/workspace\" && chown $SANDBOX_UID:$SANDBOX_GID \"\$1/workspace\" && chmod 0755 \"\$1/workspace\"" \
    "$SUITE" "$ROOTFS" "$SOURCES"
t_rootfs=$((SECONDS - t0))
say "rootfs built in ${t_rootfs}s ($(du -h "$ROOTFS" | cut -f1))"

# The container runs as uid/gid 65534 (nobody/nogroup): both must exist.
passwd="$(tar -xOf "$ROOTFS" ./etc/passwd)"
group="$(tar -xOf "$ROOTFS" ./etc/group)"
grep -q "^[^:]*:[^:]*:$SANDBOX_UID:" <<<"$passwd" || die "uid $SANDBOX_UID missing from the rootfs /etc/passwd"
grep -q "^[^:]*:[^:]*:$SANDBOX_GID:" <<<"$group" || die "gid $SANDBOX_GID missing from the rootfs /etc/group"

old_id="$(docker image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)"
say "importing as $IMAGE"
t0=$SECONDS
docker import \
    --change 'CMD ["sleep","infinity"]' \
    --change 'WORKDIR /workspace' \
    --change 'ENV LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1' \
    --change 'LABEL agentbus.sandbox=1' \
    --change 'USER 65534:65534' \
    "$ROOTFS" "$IMAGE" >/dev/null
t_import=$((SECONDS - t0))
say "imported in ${t_import}s"
new_id="$(docker image inspect --format '{{.Id}}' "$IMAGE")"
if [[ -n "$old_id" && "$old_id" != "$new_id" ]]; then
    # The image this one replaces (--force); kept if a container still uses it.
    docker rmi "$old_id" >/dev/null 2>&1 || true
fi

if ! verify; then
    docker rmi "$IMAGE" >/dev/null 2>&1 || true
    die "image $IMAGE failed verification and was removed"
fi
say "image $IMAGE ready and verified (rootfs ${t_rootfs}s, import ${t_import}s)"
