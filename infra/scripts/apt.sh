# Sourced by the infra scripts: install Debian packages, refreshing the package lists
# only when they are missing or an install fails (CI runs several scripts in a row).
apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    if compgen -G '/var/lib/apt/lists/*_Packages' >/dev/null &&
        apt-get install -y -q "$@"; then
        return 0
    fi
    apt-get update -q
    apt-get install -y -q "$@"
}
