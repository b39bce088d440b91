#!/usr/bin/env bash
# Installs what the Slurm dev cluster needs on Debian 12, as root: Debian's Slurm 22.05
# (controller, node daemon, clients, accounting daemon), MariaDB for accounting, and munge
# (installed because the Slurm packages expect it; the dev cluster runs with auth/none).
# Idempotent: when every package and /etc/hosts line is present it only checks and exits.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client slurmdbd mariadb-server munge)
NODES=(n1 n2)

if [[ $(id -u) -ne 0 ]]; then
    echo "install.sh: run as root (it installs Debian packages and edits /etc/hosts)" >&2
    exit 1
fi

missing=()
for pkg in "${PACKAGES[@]}"; do
    if [[ $(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null) != installed ]]; then
        missing+=("$pkg")
    fi
done

if ((${#missing[@]})); then
    echo "install.sh: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    # Keep the maintainer scripts from starting the packaged daemons on their default ports
    # (the dev cluster starts its own): policy-rc.d exit 101 means "action forbidden".
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    # The package lists may be empty on a fresh image; refresh them only when a package is missing.
    if ! apt-get install -y -q --no-install-recommends "${missing[@]}" >&2; then
        apt-get update -q >&2
        apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
    fi
    # The packages enable their services; on a machine with systemd they would start daemons on
    # the default ports under /var. The dev cluster starts its own, so stop and disable those.
    if [[ -d /run/systemd/system ]]; then
        systemctl disable --now slurmctld slurmd slurmdbd mariadb munge >/dev/null 2>&1 || true
    fi
fi

# The nodes are emulated on loopback, but slurmd and slurmctld still resolve their names.
for node in "${NODES[@]}"; do
    if ! grep -Eq "^[^#]*[[:space:]]${node}([[:space:]]|\$)" /etc/hosts; then
        echo "install.sh: adding '127.0.0.1 ${node}' to /etc/hosts" >&2
        printf '127.0.0.1\t%s\n' "$node" >>/etc/hosts
    fi
done

echo "install.sh: Slurm $(dpkg-query -W -f='${Version}' slurmctld) ready (${SECONDS}s)" >&2
