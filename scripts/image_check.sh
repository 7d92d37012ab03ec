#!/usr/bin/env bash
# Builds the Dockerfile for real with podman and calls the image: a router and an all-MiniLM-L6-v2
# replica in two containers, one Embed through the router. Opt-in (`make image-check`), slow the
# first time, and meant for a disposable Debian 12 machine where you are root and have no Docker
# engine and no Docker Hub: it installs podman from Debian, makes its own base image with
# debootstrap (Debian bookworm: python3 is 3.11, like the torch wheel) and installs torch from a
# local wheel folder. Re-running reuses the base image, the wheels and the cached build layers.
# Exits non-zero on any failure and never leaves its containers behind. See docs/deploy.md.
#
# Settings (environment):
#   IMAGE_CHECK_DIR            work folder: wheels, configs, logs (/var/tmp/tessera-image-check)
#   IMAGE_CHECK_IMAGE          tag of the built image (localhost/tessera:check)
#   IMAGE_CHECK_BASE           tag of the base image made here (localhost/tessera-base:bookworm)
#   IMAGE_CHECK_NEW_BASE=1     rebuild the base image even if it exists
#   IMAGE_CHECK_MIRROR         Debian mirror for debootstrap (http://deb.debian.org/debian)
#   IMAGE_CHECK_STORAGE        podman storage driver: overlay or vfs (default: overlay if the
#                              kernel mounts it here, else vfs in a storage root of its own)
#   IMAGE_CHECK_BUILD_NETWORK  podman build --network value (default: podman's; `host` if the
#                              build's RUN steps cannot reach PyPI)
#   IMAGE_CHECK_BUILD_TIMEOUT  seconds for `podman build` (3600)
#   IMAGE_CHECK_READY_TIMEOUT  seconds for the model to turn SERVING on the router (300)
#   IMAGE_CHECK_NO_APT=1       do not apt-get install anything (the tools are already there)
#   IMAGE_CHECK_REF            build this git commit (`git archive`, e.g. HEAD) instead of the
#                              working tree as it is, with its own Dockerfile and .dockerignore
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${IMAGE_CHECK_DIR:-/var/tmp/tessera-image-check}
IMAGE=${IMAGE_CHECK_IMAGE:-localhost/tessera:check}
BASE=${IMAGE_CHECK_BASE:-localhost/tessera-base:bookworm}
MIRROR=${IMAGE_CHECK_MIRROR:-http://deb.debian.org/debian}
BUILD_TIMEOUT=${IMAGE_CHECK_BUILD_TIMEOUT:-3600}
READY_TIMEOUT=${IMAGE_CHECK_READY_TIMEOUT:-300}
MODEL=all-minilm-l6-v2
DIM=384
LABEL=tessera-image-check
APT_PACKAGES=(podman runc debootstrap uidmap slirp4netns fuse-overlayfs netavark aardvark-dns
  iptables catatonit ca-certificates)

STARTED=$(date +%s)
log() { printf '[image-check %4ds] %s\n' "$(($(date +%s) - STARTED))" "$*" >&2; }
die() {
  log "FAILED: $*"
  exit 1
}

[ "$(id -u)" = 0 ] || die "run me as root (podman rootful, debootstrap, apt-get)"
mkdir -p "$WORK"

# --- tools ----------------------------------------------------------------------------------------
missing=()
for package in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f '${Status}' "$package" 2>/dev/null | grep -q 'ok installed' \
    || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ] && [ "${IMAGE_CHECK_NO_APT:-}" != 1 ]; then
  log "installing from Debian: ${missing[*]}"
  timeout 300 apt-get update -q
  DEBIAN_FRONTEND=noninteractive timeout 900 \
    apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
for tool in podman runc debootstrap; do command -v "$tool" >/dev/null || die "no $tool"; done

GRPCURL=$ROOT/.venv/bin/grpcurl
[ -x "$GRPCURL" ] || GRPCURL=$(command -v grpcurl) || die "no grpcurl (make setup installs it)"
PY=$ROOT/.venv/bin/python
[ -x "$PY" ] || PY=$(command -v python3) || die "no python3"
"$PY" -c 'import sys; assert sys.version_info[:2] == (3, 11)' 2>/dev/null \
  || die "$PY is not Python 3.11: the torch wheel is downloaded for the host's Python"

# --- podman configuration: private to this script (CONTAINERS_CONF), nothing in /etc changes ------
# Rootful podman raises RLIMIT_NOFILE and RLIMIT_NPROC in every container to 1048576 / 4194304,
# which runc must then set: without CAP_SYS_RESOURCE (a sandbox, a VM like this one) that fails with
# "error setting rlimits for ready process: ... operation not permitted". Use what we have instead.
nofile=$(ulimit -Hn)
nproc=$(ulimit -Hu)
pid_max=$(cat /proc/sys/kernel/pid_max 2>/dev/null || echo 32768)
[ "$nofile" = unlimited ] && nofile=1048576
if [ "$nproc" = unlimited ] || [ "$nproc" -gt "$pid_max" ]; then nproc=$pid_max; fi
cat >"$WORK/containers.conf" <<EOF
# written by scripts/image_check.sh
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]

[engine]
runtime = "runc"
EOF
export CONTAINERS_CONF=$WORK/containers.conf

PODMAN=(podman --runtime runc)
storage=${IMAGE_CHECK_STORAGE:-}
if [ -z "$storage" ]; then
  # The overlay driver needs the kernel to mount overlayfs on the storage's filesystem; a sandbox
  # may refuse. Probe it with a real mount.
  probe=$(mktemp -d "$WORK/overlay-probe.XXXXXX")
  mkdir -p "$probe"/{lower,upper,work,merged}
  if mount -t overlay overlay "$probe/merged" 2>/dev/null \
    -o "lowerdir=$probe/lower,upperdir=$probe/upper,workdir=$probe/work"; then
    umount "$probe/merged"
    storage=overlay
  else
    storage=vfs
  fi
  rm -rf "$probe"
fi
case $storage in
  overlay) ;;
  # A storage root of its own: podman refuses to switch drivers on an existing one.
  vfs) PODMAN+=(--storage-driver vfs --root /var/lib/containers/storage-vfs
    --runroot /run/containers/storage-vfs) ;;
  *) die "IMAGE_CHECK_STORAGE must be overlay or vfs, not $storage" ;;
esac
pm() { "${PODMAN[@]}" "$@"; }
log "podman $(podman --version | awk '{print $3}'), runtime runc, storage driver $storage"

# --- containers never outlive the script ----------------------------------------------------------
CONTAINERS=()
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ ${#CONTAINERS[@]} -gt 0 ]; then
    if [ "$rc" != 0 ]; then
      for c in "${CONTAINERS[@]}"; do
        log "last lines of $c:"
        pm logs --tail 40 "$c" 2>&1 | sed 's/^/    /' >&2 || true
      done
    fi
    pm rm --force --time 5 "${CONTAINERS[@]}" >/dev/null 2>&1 || true
  fi
  [ "$rc" = 0 ] || log "exit status $rc"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Containers left by a run that was killed outright (SIGKILL): remove them first.
stale=$(pm ps --all --quiet --filter "label=$LABEL" || true)
if [ -n "$stale" ]; then
  log "removing containers left by an earlier run: ${stale//$'\n'/ }"
  # shellcheck disable=SC2086
  pm rm --force --time 5 $stale >/dev/null
fi

# --- base image: Debian bookworm minbase + python3.11 + venv, made here ------------------------
if [ "${IMAGE_CHECK_NEW_BASE:-}" = 1 ] || ! pm image exists "$BASE"; then
  rootfs=$WORK/rootfs
  # debootstrap mounts /proc and /sys inside the target: a killed run may have left them mounted.
  grep -o " $rootfs/[^ ]*" /proc/mounts | sort -r | xargs -r -n1 umount -l || true
  rm -rf --one-file-system "$rootfs"
  log "debootstrap bookworm (minbase + python3.11, python3-venv) from $MIRROR"
  t0=$(date +%s)
  timeout --foreground 1200 debootstrap --variant=minbase \
    --include=python3.11,python3-venv,ca-certificates bookworm "$rootfs" "$MIRROR" \
    >"$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log" >&2; die "debootstrap (log: $WORK/debootstrap.log)"; }
  # What python:3.11-slim leaves out too: apt's lists and archives, docs, man pages, locales.
  rm -rf "$rootfs"/var/cache/apt/* "$rootfs"/var/lib/apt/lists/* "$rootfs"/usr/share/doc/* \
    "$rootfs"/usr/share/man/* "$rootfs"/usr/share/locale/* "$rootfs"/var/log/*.log
  # pip's site-wide config folder, empty: the build mounts its pip.conf there (see below).
  mkdir -p "$rootfs/etc/xdg/pip"
  tar --numeric-owner -C "$rootfs" -c . | pm import --quiet \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    --message "debootstrap --variant=minbase bookworm + python3.11 python3-venv" \
    - "$BASE" >/dev/null
  rm -rf --one-file-system "$rootfs"
  log "base image $BASE made in $(($(date +%s) - t0)) s"
else
  log "base image $BASE exists (IMAGE_CHECK_NEW_BASE=1 remakes it)"
fi

# --- torch 2.13.0 CPU and its dependencies, as wheels ------------------------------------------
WHEELS=$WORK/wheels
if ! compgen -G "$WHEELS/torch-2.13.0*.whl" >/dev/null; then
  log "pip download torch==2.13.0 (+ dependencies) into $WHEELS"
  rm -rf "$WHEELS.tmp"
  # (This machine's pip.conf may name local indexes that lack some projects: pip warns, not fails.)
  timeout 900 "$PY" -m pip download --quiet --only-binary=:all: --dest "$WHEELS.tmp" torch==2.13.0 \
    2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
  compgen -G "$WHEELS.tmp/torch-2.13.0+cpu-*.whl" >/dev/null \
    || die "pip did not find the CPU build of torch 2.13.0: $(ls "$WHEELS.tmp")"
  rm -rf "$WHEELS" && mv "$WHEELS.tmp" "$WHEELS"
fi
log "torch wheels: $(cd "$WHEELS" && echo *.whl | wc -w) files, $(du -sh "$WHEELS" | cut -f1)"

# --- the build ------------------------------------------------------------------------------------
# pip in the build's RUN steps trusts the same CAs as this machine (a TLS-inspecting proxy has its
# own CA; pip otherwise trusts only its bundled certifi): this machine's CA bundle and a pip.conf
# naming it are mounted into every RUN step. `podman build --volume` leaves an empty mount point
# behind in each layer whose target did not exist, so both targets exist in the base image already
# (its CA bundle and /etc/xdg/pip, pip's site-wide config folder) and nothing reaches the image.
BUILD_ARGS=(--layers
  --build-arg "BASE_IMAGE=$BASE"
  --build-arg TORCH_WHEELS=/wheels
  --build-context "torch-wheels=$WHEELS")
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  mkdir -p "$WORK/pip"
  printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' >"$WORK/pip/pip.conf"
  BUILD_ARGS+=(--volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro
    --volume "$WORK/pip:/etc/xdg/pip:ro")
fi
[ -n "${IMAGE_CHECK_BUILD_NETWORK:-}" ] && BUILD_ARGS+=(--network "$IMAGE_CHECK_BUILD_NETWORK")

# Every build leaves its layers as untagged images (the cache); $LAYERS lists those of the builds
# so far, and each successful build removes the ones it no longer uses, so that re-running after
# code changes does not fill the disk with superseded 2 GB images.
LAYERS=$WORK/layers.txt
build_layers() {
  grep -oE -- '^--> (Using cache )?[0-9a-f]{11,64}$' "$WORK/build.log" \
    | awk '{print substr($NF, 1, 11)}'
}

CONTEXT=$ROOT
if [ -n "${IMAGE_CHECK_REF:-}" ]; then
  CONTEXT=$WORK/context
  rm -rf "$CONTEXT" && mkdir -p "$CONTEXT"
  # umask 022: files 0644 as in a checkout (git's default 002 gives 0664, another cache key).
  git -C "$ROOT" -c tar.umask=0022 archive --format=tar "$IMAGE_CHECK_REF" | tar -C "$CONTEXT" -x
  log "build context: $IMAGE_CHECK_REF ($(git -C "$ROOT" rev-parse --short "$IMAGE_CHECK_REF"))"
fi

log "podman build -t $IMAGE (log: $WORK/build.log)"
t0=$(date +%s)
if ! timeout --foreground "$BUILD_TIMEOUT" "${PODMAN[@]}" build "${BUILD_ARGS[@]}" -t "$IMAGE" \
  -f "$CONTEXT/Dockerfile" "$CONTEXT" >"$WORK/build.log" 2>&1; then
  build_layers >>"$LAYERS" || true
  tail -40 "$WORK/build.log" >&2
  die "podman build (log: $WORK/build.log)"
fi
BUILD_S=$(($(date +%s) - t0))
build_layers >"$LAYERS.new"
if [ -s "$LAYERS" ] && [ -s "$LAYERS.new" ]; then
  t0=$(date +%s)
  removed=0
  # Leaves first (the list is in build order); an image still in use is kept.
  for id in $(grep -vxF -f "$LAYERS.new" "$LAYERS" | awk '!seen[$0]++' | tac || true); do
    pm rmi "$id" >/dev/null 2>&1 && removed=$((removed + 1))
  done
  [ "$removed" = 0 ] || log "removed $removed superseded layer images in $(($(date +%s) - t0)) s"
fi
mv "$LAYERS.new" "$LAYERS"
cached=$(grep -c -- '--> Using cache' "$WORK/build.log" || true)
steps=$(grep 'STEP [0-9]*/[0-9]*: ' "$WORK/build.log" | grep -vc ': FROM ' || true)
SIZE=$(pm image inspect --format '{{.Size}}' "$IMAGE")
log "built $IMAGE in $BUILD_S s ($cached of $steps steps from cache), size $SIZE bytes"

# Nothing the build mounted or used may have stayed in the image.
# shellcheck disable=SC2016
inside='for f in /wheels /etc/pip.conf /etc/xdg/pip/pip.conf /src; do test ! -e $f || exit 1; done
  for m in all-minilm-l6-v2 smollm2-135m-instruct; do test -f /models/$m/.prepared || exit 1; done
  id -u'
pm run --rm --entrypoint /bin/sh "$IMAGE" -c "$inside" | grep -qx 10001 \
  || die "the image has build-time files or no prepared /models, or does not run as 10001"

# --- run it: a router and a MiniLM replica on loopback --------------------------------------------
read -r ROUTER_PORT WORKER_PORT < <("$PY" -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
ROUTER=127.0.0.1:$ROUTER_PORT

# As Kubernetes runs it (deploy/k8s): read-only root with a tmpfs /tmp, no capabilities, user 10001.
RUN_ARGS=(--detach --network host --read-only --read-only-tmpfs --cap-drop all
  --security-opt no-new-privileges --label "$LABEL=1")
name=tessera-check-router-$$
CONTAINERS+=("$name")
pm run "${RUN_ARGS[@]}" --name "$name" "$IMAGE" \
  router --host 127.0.0.1 --port "$ROUTER_PORT" >/dev/null
name=tessera-check-worker-$$
CONTAINERS+=("$name")
pm run "${RUN_ARGS[@]}" --name "$name" "$IMAGE" \
  worker --model "$MODEL" --host 127.0.0.1 --port "$WORKER_PORT" --router "$ROUTER" \
  --threads 2 >/dev/null
log "started router on $ROUTER and a $MODEL replica on 127.0.0.1:$WORKER_PORT"

t0=$(date +%s)
health=""
while :; do
  for c in "${CONTAINERS[@]}"; do
    [ "$(pm inspect --format '{{.State.Running}}' "$c")" = true ] || die "container $c exited"
  done
  health=$("$GRPCURL" -plaintext -max-time 5 -d "{\"service\":\"$MODEL\"}" "$ROUTER" \
    grpc.health.v1.Health/Check 2>&1 || true)
  grep -q '"SERVING"' <<<"$health" && break
  [ $(($(date +%s) - t0)) -lt "$READY_TIMEOUT" ] \
    || die "$MODEL not SERVING on the router after $READY_TIMEOUT s: $health"
  sleep 1
done
READY_S=$(($(date +%s) - t0))
log "$MODEL SERVING on the router after $READY_S s"

answer=$("$GRPCURL" -plaintext -max-time 60 \
  -d "{\"model\":\"$MODEL\",\"inputs\":[\"hello from a container\",\"a second text\"]}" \
  "$ROUTER" tessera.v1.Inference/Embed 2>&1) || die "Embed: $answer"
"$PY" -c '
import json, math, sys
answer, dim = json.loads(sys.argv[1]), int(sys.argv[2])
vectors = [e.get("values", []) for e in answer.get("embeddings", [])]
got = answer.get("dim")
assert got == dim, f"dim {got}, expected {dim}"
assert len(vectors) == 2, f"{len(vectors)} embeddings for 2 inputs"
for v in vectors:
    assert len(v) == dim, f"a vector of {len(v)} values, expected {dim}"
    norm = math.sqrt(sum(x * x for x in v))
    assert abs(norm - 1) < 1e-3, f"norm {norm}: not L2-normalised"
' "$answer" "$DIM" || die "Embed answer is wrong: ${answer:0:300}"
log "Embed through the router: 2 vectors of $DIM values, L2-normalised"

pm rm --force --time 10 "${CONTAINERS[@]}" >/dev/null
CONTAINERS=()

cat <<EOF
image-check passed
  image       $IMAGE (base $BASE)
  build time  $BUILD_S s ($cached of $steps steps from cache)
  image size  $SIZE bytes ($((SIZE / 1024 / 1024)) MiB)
  ready       $MODEL SERVING on the router $READY_S s after the containers started
  total       $(($(date +%s) - STARTED)) s
EOF
