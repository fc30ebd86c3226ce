#!/usr/bin/env bash
# Builds the local Docker image WITHOUT pulling anything: the locally compiled
# target/release/vertice-register (built with cargo if missing), the shared
# libraries it links (from ldd), the CA bundle if present, an /etc/passwd with
# a non-root user and an empty /data owned by it, all in an image FROM scratch.
#
#   scripts/docker-image.sh            # tags ${REGISTRY_IMAGE:-vertice-register:local}
#
# Same entrypoint, command, env, user and volume as cluster/Dockerfile (the
# image for machines that can pull rust:1-bookworm and debian:bookworm-slim).
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=${REGISTRY_IMAGE:-vertice-register:local}
BIN=target/release/vertice-register
UID_=10001
GID_=10001

if [ ! -x "$BIN" ]; then
  echo "building $BIN (cargo build --release --locked)"
  cargo build --release --locked
fi

ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
root=$ctx/rootfs
mkdir -p "$root/usr/local/bin" "$root/etc/ssl/certs" "$root/tmp" "$ctx/datafs/data"
chmod 1777 "$root/tmp"

cp "$BIN" "$root/usr/local/bin/vertice-register"
echo "binary:    $BIN ($(du -h "$BIN" | cut -f1))"

# Shared libraries: "name => /path (addr)" and the loader "/lib64/ld-... (addr)".
libs=$(ldd "$BIN" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | sort -u)
for lib in $libs; do
  mkdir -p "$root$(dirname "$lib")"
  cp -L "$lib" "$root$lib"
  echo "library:   $lib"
done

if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  cp -L /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
  echo "ca bundle: /etc/ssl/certs/ca-certificates.crt"
else
  echo "ca bundle: none on this machine (outbound TLS will not verify)"
fi

cat > "$root/etc/passwd" <<PASSWD
root:x:0:0:root:/root:/sbin/nologin
vertice:x:$UID_:$GID_:vertice-register:/data:/sbin/nologin
PASSWD
cat > "$root/etc/group" <<GROUP
root:x:0:
vertice:x:$GID_:
GROUP
# glibc resolves peer names (registry-2, ...) from /etc/hosts then DNS.
echo "hosts: files dns" > "$root/etc/nsswitch.conf"
echo "user:      vertice ($UID_:$GID_), /data owned by it"

# One tarball, ownership set explicitly: root for the system files, the
# non-root user for /data. ADD of a local tar extracts it as is.
tar -C "$root" --numeric-owner --owner=0 --group=0 -cf "$ctx/rootfs.tar" .
tar -C "$ctx/datafs" --numeric-owner --owner=$UID_ --group=$GID_ -rf "$ctx/rootfs.tar" ./data
rm -rf "$root" "$ctx/datafs"

cat > "$ctx/Dockerfile" <<DOCKERFILE
FROM scratch
ADD rootfs.tar /
ENV PATH=/usr/local/bin:/usr/bin:/bin \\
    REGISTRY_ADDR=0.0.0.0:8888 \\
    REGISTRY_DATA_DIR=/data
USER $UID_:$GID_
WORKDIR /data
VOLUME ["/data"]
EXPOSE 8888
ENTRYPOINT ["vertice-register"]
CMD ["node"]
DOCKERFILE

# The classic builder needs nothing else; BuildKit only if the buildx plugin is there.
if docker buildx version >/dev/null 2>&1; then buildkit=1; else buildkit=0; fi
echo "building:  $IMAGE (FROM scratch, DOCKER_BUILDKIT=$buildkit, nothing pulled)"
old_id=$(docker image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)
# (Quiet: the classic builder's deprecation notice is noise; errors are shown.)
if ! log=$(DOCKER_BUILDKIT=$buildkit docker build --pull=false -t "$IMAGE" "$ctx" 2>&1); then
  echo "$log" >&2
  exit 1
fi
echo "image:     $IMAGE $(docker image inspect -f '{{.Id}} {{.Size}}' "$IMAGE" | awk '{printf "%s, %.0f MB", substr($1, 8, 12), $2 / 1e6}')"
new_id=$(docker image inspect -f '{{.Id}}' "$IMAGE")
if [ -n "$old_id" ] && [ "$old_id" != "$new_id" ]; then
  # The previous build of this tag, now untagged: drop it unless something uses it.
  docker rmi "$old_id" >/dev/null 2>&1 && echo "removed:   previous image ${old_id:7:12}" || true
fi
