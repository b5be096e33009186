#!/usr/bin/env bash
# Build the local busybox image used by tests and the demo (no registry needed).
# Usage: build-image.sh [NAME]   (default segd-busybox:latest)
set -euo pipefail
NAME="${1:-segd-busybox:latest}"
DOCKER=/usr/bin/docker
[ -x "$DOCKER" ] || DOCKER=docker
if "$DOCKER" image inspect "$NAME" >/dev/null 2>&1; then
    exit 0
fi
BB=/bin/busybox
[ -x "$BB" ] || { echo "build-image: $BB missing (install busybox-static)" >&2; exit 1; }
root="$(mktemp -d)"
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,tmp,etc,proc,sys,dev,www,root}
cp "$BB" "$root/bin/busybox"
for applet in $("$BB" --list); do
    [ "$applet" = busybox ] || ln -sf /bin/busybox "$root/bin/$applet"
done
echo 'root:x:0:0:root:/root:/bin/sh' > "$root/etc/passwd"
echo 'root:x:0:' > "$root/etc/group"
echo 'segd test page' > "$root/www/index.html"
tar -C "$root" -c . | "$DOCKER" import --change 'CMD ["/bin/sh"]' - "$NAME" >/dev/null
echo "build-image: built $NAME" >&2
