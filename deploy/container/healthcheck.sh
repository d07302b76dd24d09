#!/bin/sh
# Container health check of a `bliss serve` in the same container (the image's HEALTHCHECK,
# also usable as a Kubernetes exec probe): asks the grpc.health.v1 service for the status
# of the whole server ("", SERVING while at least one index is served) with `bliss health`,
# which exits 0 only on SERVING. Health checks need no token, so BLISS_AUTH_TOKEN(_FILE)
# setups work as they are.
#
# It reads the server's settings from the same variables `bliss serve` reads, so configure
# the server with BLISS_* variables rather than flags for this check to follow them:
#   BLISS_PORT                      gRPC port (default 50051; a port of 0 cannot be checked)
#   BLISS_TLS_CERT                  when set, the check uses TLS and verifies the server with
#                                   BLISS_HEALTH_CA_CERT, by default BLISS_TLS_CERT itself
#                                   (right for a self-signed certificate; a certificate issued
#                                   by a CA needs BLISS_HEALTH_CA_CERT=the CA's bundle)
#   BLISS_HEALTH_TLS_SERVER_NAME    name to verify the certificate against (default: the
#                                   address, 127.0.0.1, which a certificate rarely names;
#                                   set it to a DNS name of the certificate, e.g. localhost)
#   BLISS_TLS_CLIENT_CA             mTLS: the check then needs BLISS_HEALTH_CLIENT_CERT and
#                                   BLISS_HEALTH_CLIENT_KEY, a client certificate the server
#                                   accepts
#   BLISS_HEALTH_SERVER             address to check (default 127.0.0.1:$BLISS_PORT; set it
#                                   when BLISS_HOST is one specific non-loopback address)
#   BLISS_HEALTH_INDEX              check one index's status instead of the whole server's
#   BLISS_HEALTH_DEADLINE_S         deadline of the call (default 5)
set -eu

server="${BLISS_HEALTH_SERVER:-127.0.0.1:${BLISS_PORT:-50051}}"
set -- --server "$server" --deadline-s "${BLISS_HEALTH_DEADLINE_S:-5}" --retries 0
if [ -n "${BLISS_HEALTH_INDEX:-}" ]; then
    set -- "$@" --index "$BLISS_HEALTH_INDEX"
fi
if [ -n "${BLISS_TLS_CERT:-}" ]; then
    set -- "$@" --ca-cert "${BLISS_HEALTH_CA_CERT:-$BLISS_TLS_CERT}"
    if [ -n "${BLISS_HEALTH_TLS_SERVER_NAME:-}" ]; then
        set -- "$@" --tls-server-name "$BLISS_HEALTH_TLS_SERVER_NAME"
    fi
    if [ -n "${BLISS_TLS_CLIENT_CA:-}" ]; then
        if [ -z "${BLISS_HEALTH_CLIENT_CERT:-}" ] || [ -z "${BLISS_HEALTH_CLIENT_KEY:-}" ]; then
            echo "bliss-healthcheck: the server requires client certificates" \
                "(BLISS_TLS_CLIENT_CA): set BLISS_HEALTH_CLIENT_CERT and BLISS_HEALTH_CLIENT_KEY" >&2
            exit 1
        fi
        set -- "$@" --client-cert "$BLISS_HEALTH_CLIENT_CERT" --client-key "$BLISS_HEALTH_CLIENT_KEY"
    fi
fi
exec bliss --quiet health "$@"
