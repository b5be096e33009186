#!/usr/bin/env bash
# Install and start what segd's data plane needs on a Debian host:
# nftables (libnftables), Docker Engine, busybox-static, systemd (for unit checks),
# tcpdump (fleet tests), wireguard-go when the kernel has no WireGuard (the segd mesh).
# Idempotent: installs only what is missing, starts dockerd only when it is not running.
set -euo pipefail

log() { printf 'host-setup: %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
    log "must run as root (installs packages and starts dockerd)"
    exit 1
fi

need=()
dpkg -s nftables >/dev/null 2>&1 || need+=(nftables)
dpkg -s libnftables1 >/dev/null 2>&1 || need+=(libnftables1)
dpkg -s docker.io >/dev/null 2>&1 || need+=(docker.io)
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
dpkg -s iproute2 >/dev/null 2>&1 || need+=(iproute2)
dpkg -s util-linux >/dev/null 2>&1 || need+=(util-linux)
dpkg -s systemd >/dev/null 2>&1 || need+=(systemd)
dpkg -s tcpdump >/dev/null 2>&1 || need+=(tcpdump)
# The segd mesh: the kernel's WireGuard when it has one, else wireguard-go.
if ip link add segd-wgprobe type wireguard >/dev/null 2>&1; then
    ip link del segd-wgprobe
else
    command -v wireguard-go >/dev/null 2>&1 || need+=(wireguard-go)
fi
if [ "${#need[@]}" -gt 0 ]; then
    log "installing: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

DOCKER=/usr/bin/docker
[ -x "$DOCKER" ] || DOCKER=docker

if ! "$DOCKER" info >/dev/null 2>&1; then
    log "starting dockerd"
    mkdir -p /var/log
    # No systemd as PID 1 here: start the daemon directly, detached.
    nohup /usr/sbin/dockerd >/var/log/segd-dockerd.log 2>&1 &
    for _ in $(seq 1 120); do
        "$DOCKER" info >/dev/null 2>&1 && break
        sleep 0.5
    done
    if ! "$DOCKER" info >/dev/null 2>&1; then
        log "dockerd did not come up; see /var/log/segd-dockerd.log"
        tail -n 20 /var/log/segd-dockerd.log >&2 || true
        exit 1
    fi
fi
log "docker engine ready"
