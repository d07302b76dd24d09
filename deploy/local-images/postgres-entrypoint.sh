#!/bin/sh
# Entry point of postgres.Containerfile: the part of the postgres image's entry point that
# compose.yaml relies on. On an empty PGDATA: initdb with POSTGRES_USER and
# POSTGRES_PASSWORD (scram-sha-256 over TCP), then CREATE DATABASE POSTGRES_DB. Then runs
# postgres listening on every address of the container.
set -eu
bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
user=${POSTGRES_USER:-postgres}
database=${POSTGRES_DB:-$user}
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    if [ -z "${POSTGRES_PASSWORD:-}" ]; then
        echo "postgres-entrypoint: POSTGRES_PASSWORD is required" >&2
        exit 1
    fi
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
    # UTF8 as in the postgres image: without a locale initdb picks SQL_ASCII, whose text
    # psycopg 3 returns as bytes (SQLAlchemy then fails reading the server version).
    "$bin/initdb" -D "$PGDATA" --username="$user" --pwfile="$pwfile" \
        --encoding=UTF8 --locale=C.UTF-8 --auth-local=trust --auth-host=scram-sha-256 > /dev/null
    rm -f "$pwfile"
    echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
    if [ "$database" != postgres ]; then
        "$bin/pg_ctl" -D "$PGDATA" -w -o "-c listen_addresses='' -c unix_socket_directories=/tmp" \
            start > /dev/null
        "$bin/psql" -h /tmp -v ON_ERROR_STOP=1 --username="$user" --dbname=postgres \
            -c "CREATE DATABASE \"$database\"" > /dev/null
        "$bin/pg_ctl" -D "$PGDATA" -w -m fast stop > /dev/null
    fi
    echo "postgres-entrypoint: initialised $PGDATA (user $user, database $database)"
fi
exec "$bin/postgres" -D "$PGDATA" -c listen_addresses='*' -c unix_socket_directories=/tmp "$@"
