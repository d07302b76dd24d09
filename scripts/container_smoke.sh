#!/usr/bin/env bash
# End-to-end smoke of the container image (not part of CI: it needs a container engine and
# takes 10-20 minutes on 2 cores). As root, on a machine where podman works:
#
#   scripts/container_smoke.sh
#
# 1. builds the image from the Dockerfile (ENGINE, default podman) and prints its size;
# 2. runs `bliss quickstart` in it (index on the tiny test model, scored locally and
#    through a server inside the container), then `bliss score --local`;
# 3. starts `bliss serve` in it with a read-only root filesystem, waits for the image's
#    HEALTHCHECK, and from the host checks health, scores through the published port and
#    reads /metrics;
# 4. the same with TLS and a bearer token (a throwaway self-signed certificate): the
#    HEALTHCHECK follows BLISS_TLS_CERT, a call without the token is refused;
# 5. unless SMOKE_COMPOSE=0: compose.yaml with podman-compose (PostgreSQL, the indexing job,
#    the server, Prometheus), with stand-in PostgreSQL and Prometheus images built from the
#    local Debian base (deploy/local-images) when POSTGRES_IMAGE/PROMETHEUS_IMAGE are unset.
#
# Settings (environment):
#   ENGINE              podman (default) or docker
#   IMAGE               tag to build (localhost/bliss:smoke)
#   SKIP_BUILD=1        use IMAGE as it is
#   BASE_IMAGE          base image (default: localhost/python:3.11-bookworm when it exists,
#                       made by shared/tools/container-base.sh where no registry is
#                       reachable; else python:3.11-slim)
#   TORCH_INDEX_URL, TORCH_SPEC   Dockerfile build arguments (default here: the machine's
#                       pinned torch==2.14.1 torchvision==0.29.1 from the normal index,
#                       since PyTorch's CPU index is unreachable)
#   BUILD_FLAGS         more build flags, e.g. local wheels:
#                       "-v /opt/pypi-more:/opt/pypi-more:ro
#                        --build-arg PIP_EXTRA_INDEX_URL=file:///opt/pypi-more/simple"
#   HOST_BLISS          a host `bliss` for the host-side checks (default .venv/bin/bliss;
#                       without one they run in a container on the host network)
#   PORT_BASE           first of the host ports used (default 55051)
#   SMOKE_COMPOSE       1 (default) or 0
set -euo pipefail
cd "$(dirname "$0")/.."

ENGINE=${ENGINE:-podman}
IMAGE=${IMAGE:-localhost/bliss:smoke}
PORT_BASE=${PORT_BASE:-55051}
GRPC_PORT=$PORT_BASE
METRICS_PORT=$((PORT_BASE + 1))
TLS_PORT=$((PORT_BASE + 2))
COMPOSE_GRPC_PORT=$((PORT_BASE + 3))
COMPOSE_METRICS_PORT=$((PORT_BASE + 4))
COMPOSE_PROMETHEUS_PORT=$((PORT_BASE + 5))
RUN_ID=bliss-smoke-$$
VOLUME=$RUN_ID-data
WORK=$(mktemp -d)
HOST_BLISS=${HOST_BLISS:-.venv/bin/bliss}
started=$(date +%s)

step() { printf '\n== %s (%ss)\n' "$*" "$(($(date +%s) - started))"; }
fail() { echo "SMOKE FAILED: $*" >&2; exit 1; }

containers=()
compose_up=0
cleanup() {
    set +e
    for name in "${containers[@]}"; do "$ENGINE" rm -f "$name" > /dev/null 2>&1; done
    "$ENGINE" volume rm -f "$VOLUME" > /dev/null 2>&1
    if ((compose_up)); then compose down -v > "$WORK/compose-down.log" 2>&1; fi
    rm -rf "$WORK"
}
trap cleanup EXIT

if [ -z "${BASE_IMAGE:-}" ]; then
    if "$ENGINE" image exists localhost/python:3.11-bookworm 2> /dev/null; then
        BASE_IMAGE=localhost/python:3.11-bookworm
    else
        BASE_IMAGE=python:3.11-slim
    fi
fi

# The host's bliss, or the image's on the host network.
host_bliss() {
    if [ -x "$HOST_BLISS" ]; then
        "$HOST_BLISS" "$@"
    else
        "$ENGINE" run --rm --network host -v "$WORK:$WORK:ro" "$IMAGE" "$@"
    fi
}

wait_healthy() {  # container name: the image's HEALTHCHECK, run on demand
    local name=$1
    for _ in $(seq 90); do
        if "$ENGINE" healthcheck run "$name" > /dev/null 2>&1; then return 0; fi
        if [ "$("$ENGINE" inspect -f '{{.State.Running}}' "$name")" != true ]; then
            "$ENGINE" logs "$name" | tail -20
            fail "$name exited"
        fi
        sleep 2
    done
    "$ENGINE" logs "$name" | tail -20
    fail "$name never became healthy"
}

format_flags=()
if [ "$ENGINE" = podman ]; then format_flags=(--format docker); fi  # keeps HEALTHCHECK, SHELL

if [ "${SKIP_BUILD:-0}" != 1 ]; then
    step "build $IMAGE (base $BASE_IMAGE)"
    ca_flags=()
    if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
        ca_flags=(-v /etc/ssl/certs/ca-certificates.crt:/run/host-ca.crt:ro
            --build-arg PIP_CERT=/run/host-ca.crt)
    fi
    # shellcheck disable=SC2086
    "$ENGINE" build "${format_flags[@]}" --network host "${ca_flags[@]}" \
        --build-arg BASE_IMAGE="$BASE_IMAGE" \
        --build-arg TORCH_INDEX_URL="${TORCH_INDEX_URL-}" \
        --build-arg TORCH_SPEC="${TORCH_SPEC:-torch==2.14.1 torchvision==0.29.1}" \
        ${BUILD_FLAGS:-} -t "$IMAGE" .
fi
size=$("$ENGINE" image inspect -f '{{.Size}}' "$IMAGE")
echo "image $IMAGE: $size bytes ($((size / 1024 / 1024)) MiB)"
"$ENGINE" run --rm "$IMAGE" --version
[ "$("$ENGINE" image inspect -f '{{.Config.User}}' "$IMAGE")" = 10001:10001 ] \
    || fail "the image does not run as 10001:10001"

step "quickstart in the container (index on the tiny model, scored locally and served)"
"$ENGINE" volume create "$VOLUME" > /dev/null
"$ENGINE" run --rm -v "$VOLUME:/data" "$IMAGE" quickstart | tee "$WORK/quickstart.log"
grep -q "same nearest classes: yes" "$WORK/quickstart.log" || fail "quickstart output"

step "bliss score --local in the container"
"$ENGINE" run --rm -v "$VOLUME:/data" --entrypoint /bin/sh "$IMAGE" -c \
    'bliss score --local --index quickstart --images /data/quickstart/test/circle/*.png \
        /data/quickstart/test/cross/*.png' | tee "$WORK/local.jsonl"
[ "$(wc -l < "$WORK/local.jsonl")" -eq 4 ] || fail "expected 4 scored images"

step "bliss serve (read-only root filesystem), checked from the host"
server=$RUN_ID-server
containers+=("$server")
"$ENGINE" run -d --name "$server" --read-only --tmpfs /tmp -v "$VOLUME:/data" \
    -p "127.0.0.1:$GRPC_PORT:50051" -p "127.0.0.1:$METRICS_PORT:9464" "$IMAGE" > /dev/null
wait_healthy "$server"
host_bliss health --server "127.0.0.1:$GRPC_PORT"
"$ENGINE" cp "$server:/data/quickstart/test/cross" "$WORK/cross"
host_bliss score --server "127.0.0.1:$GRPC_PORT" --index quickstart --images "$WORK"/cross/*.png
curl -fsS "http://127.0.0.1:$METRICS_PORT/metrics" | grep -E '^bliss_(requests_total|index_version_loaded)' \
    || fail "no bliss metrics on the published metrics port"
"$ENGINE" stop -t 30 "$server" > /dev/null
"$ENGINE" logs "$server" 2>&1 | tail -5

step "bliss serve with TLS and a token"
tls=$WORK/tls
mkdir -p "$tls"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
    -subj /CN=localhost -addext 'subjectAltName=DNS:localhost,IP:127.0.0.1' \
    -keyout "$tls/server.key" -out "$tls/server.pem" 2> /dev/null
openssl rand -hex 32 > "$tls/token"
chmod 0644 "$tls"/*  # readable by the container's user; a throwaway key
chmod 0755 "$tls"
tls_server=$RUN_ID-tls
containers+=("$tls_server")
"$ENGINE" run -d --name "$tls_server" --read-only --tmpfs /tmp -v "$VOLUME:/data" \
    -v "$tls:/etc/bliss:ro" -e BLISS_TLS_CERT=/etc/bliss/server.pem \
    -e BLISS_TLS_KEY=/etc/bliss/server.key -e BLISS_AUTH_TOKEN_FILE=/etc/bliss/token \
    -e BLISS_HEALTH_TLS_SERVER_NAME=localhost -p "127.0.0.1:$TLS_PORT:50051" \
    "$IMAGE" > /dev/null
wait_healthy "$tls_server"
host_bliss health --server "localhost:$TLS_PORT" --ca-cert "$tls/server.pem"
host_bliss score --server "localhost:$TLS_PORT" --ca-cert "$tls/server.pem" \
    --token-file "$tls/token" --images "$WORK"/cross/*.png
if (unset BLISS_AUTH_TOKEN; host_bliss score --server "localhost:$TLS_PORT" \
    --ca-cert "$tls/server.pem" --retries 0 --images "$WORK"/cross/*.png) 2> "$WORK/refused.log"; then
    fail "a call without the token was answered"
fi
grep -q UNAUTHENTICATED "$WORK/refused.log" || { cat "$WORK/refused.log"; fail "no UNAUTHENTICATED"; }
echo "without the token: UNAUTHENTICATED (as it should be)"
"$ENGINE" stop -t 30 "$tls_server" > /dev/null

if [ "${SMOKE_COMPOSE:-1}" = 1 ]; then
    step "compose.yaml: postgres, indexer job, server, prometheus"
    if [ "$ENGINE" = docker ] && docker compose version > /dev/null 2>&1; then
        compose() { docker compose -p "$RUN_ID" -f compose.yaml "$@"; }
        staged=0
    elif command -v podman-compose > /dev/null; then
        compose() { podman-compose -p "$RUN_ID" -f compose.yaml "$@"; }
        # podman-compose maps depends_on conditions onto podman features that podman
        # before 4.6 lacks: it ignores service_healthy (so the job would race PostgreSQL)
        # and cannot start a service whose dependency has exited (the finished job). Start
        # the stack in the order the conditions describe instead, service by service.
        staged=1
    else
        fail "no compose: pip install podman-compose (or SMOKE_COMPOSE=0)"
    fi
    if [ -z "${POSTGRES_IMAGE:-}" ]; then
        POSTGRES_IMAGE=localhost/bliss-postgres:smoke
        "$ENGINE" build "${format_flags[@]}" --network host --build-arg BASE_IMAGE="$BASE_IMAGE" \
            -f deploy/local-images/postgres.Containerfile -t "$POSTGRES_IMAGE" deploy/local-images
    fi
    if [ -z "${PROMETHEUS_IMAGE:-}" ]; then
        PROMETHEUS_IMAGE=localhost/bliss-prometheus:smoke
        "$ENGINE" build "${format_flags[@]}" --network host --build-arg BASE_IMAGE="$BASE_IMAGE" \
            -f deploy/local-images/prometheus.Containerfile -t "$PROMETHEUS_IMAGE" deploy/local-images
    fi
    export BLISS_IMAGE=$IMAGE POSTGRES_IMAGE PROMETHEUS_IMAGE
    export BLISS_GRPC_HOST_PORT=$COMPOSE_GRPC_PORT BLISS_METRICS_HOST_PORT=$COMPOSE_METRICS_PORT
    export PROMETHEUS_HOST_PORT=$COMPOSE_PROMETHEUS_PORT POSTGRES_PASSWORD=smoke-$$
    compose_up=1
    if ((staged)); then
        compose up -d --no-build postgres
        postgres=$("$ENGINE" ps -q --filter "label=io.podman.compose.project=$RUN_ID" \
            --filter label=com.docker.compose.service=postgres)
        wait_healthy "$postgres"
        echo "postgres: healthy"
        compose run --rm --no-deps indexer || fail "the indexer job failed"
        compose up -d --no-build --no-deps server prometheus
    else
        compose up -d --no-build
    fi
    for _ in $(seq 150); do
        if host_bliss health --server "127.0.0.1:$COMPOSE_GRPC_PORT" > /dev/null 2>&1; then break; fi
        sleep 2
    done
    compose ps
    host_bliss health --server "127.0.0.1:$COMPOSE_GRPC_PORT" || {
        compose logs | tail -40
        fail "the compose server never became healthy"
    }
    host_bliss score --server "127.0.0.1:$COMPOSE_GRPC_PORT" --images "$WORK"/cross/*.png
    for _ in $(seq 30); do
        targets=$(curl -fsS "http://127.0.0.1:$COMPOSE_PROMETHEUS_PORT/api/v1/targets" || true)
        if grep -q '"health":"up"' <<< "$targets"; then break; fi
        sleep 2
    done
    grep -q '"health":"up"' <<< "$targets" || { echo "$targets"; fail "Prometheus does not scrape the server"; }
    echo "Prometheus scrapes server:9464: up"
    curl -fsS "http://127.0.0.1:$COMPOSE_PROMETHEUS_PORT/api/v1/query?query=bliss_index_version_loaded" \
        | grep -q quickstart || fail "bliss_index_version_loaded not in Prometheus"
    echo "bliss_index_version_loaded{index=\"quickstart\"} is in Prometheus"
fi

step "all smoke checks passed"
