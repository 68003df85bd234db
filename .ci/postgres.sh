# Sourced by .ci/run: a throw-away PostgreSQL server on loopback for the search tests
# (tests/test_search.py runs a multi-worker study against it).
#
# Installs PostgreSQL from Debian's packages when it is missing (CI runs as root), starts a
# private cluster in $DYNIFY_CI_PGDATA on 127.0.0.1:$DYNIFY_CI_PGPORT (not the system
# cluster), creates the role and database, and exports
#   DYNIFY_TEST_POSTGRES_URL=postgresql://dynify:dynify@127.0.0.1:PORT/dynify_test
# Idempotent: an installed PostgreSQL, an initialised cluster or a running server are reused.
# A failed install or start fails CI; a machine without apt-get (and without PostgreSQL) only
# gets a note, and the PostgreSQL test then skips with its reason.

_pg_setup() {
    local pgdata=${DYNIFY_CI_PGDATA:-/tmp/dynify-ci-postgres}
    local port=${DYNIFY_CI_PGPORT:-55432}
    local bindir
    bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$bindir" ] || [ ! -x "$bindir/initdb" ]; then
        if ! command -v apt-get >/dev/null 2>&1; then
            echo "note: no apt-get and no PostgreSQL here: the PostgreSQL search test will skip"
            return 0
        fi
        echo "installing PostgreSQL from Debian's packages"
        local sudo=""
        [ "$(id -u)" -eq 0 ] || sudo="sudo"
        if ! { $sudo apt-get update -qq &&
            DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq postgresql >/dev/null; }; then
            echo "error: apt-get install postgresql failed" >&2
            return 1
        fi
        bindir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
        if [ -z "$bindir" ] || [ ! -x "$bindir/initdb" ]; then
            echo "error: postgresql installed but no initdb under /usr/lib/postgresql" >&2
            return 1
        fi
    fi

    # The server refuses to run as root: run it as the 'postgres' user the package creates.
    local as=()
    if [ "$(id -u)" -eq 0 ]; then
        if ! id postgres >/dev/null 2>&1; then
            echo "error: running as root and there is no 'postgres' user to run the server" >&2
            return 1
        fi
        as=(runuser -u postgres --)
        mkdir -p "$pgdata"
        chown postgres "$pgdata"
        chmod 700 "$pgdata"
    else
        mkdir -p "$pgdata"
        chmod 700 "$pgdata"
    fi

    if [ ! -f "$pgdata/PG_VERSION" ]; then
        "${as[@]}" "$bindir/initdb" -D "$pgdata" -U postgres --auth=trust -E UTF8 >/dev/null ||
            { echo "error: initdb failed in $pgdata" >&2; return 1; }
    fi
    if "${as[@]}" "$bindir/pg_ctl" -D "$pgdata" status >/dev/null 2>&1; then
        echo "PostgreSQL already running in $pgdata"
    else
        "${as[@]}" "$bindir/pg_ctl" -D "$pgdata" -l "$pgdata/server.log" -w -t 60 \
            -o "-p $port -k $pgdata -c listen_addresses=127.0.0.1" start >/dev/null ||
            { echo "error: PostgreSQL did not start; see $pgdata/server.log" >&2; return 1; }
        DYNIFY_CI_PG_STARTED="$bindir/pg_ctl -D $pgdata"
    fi

    local psql=("$bindir/psql" -h 127.0.0.1 -p "$port" -U postgres -d postgres -qtA -v ON_ERROR_STOP=1)
    if [ "$("${psql[@]}" -c "SELECT 1 FROM pg_roles WHERE rolname = 'dynify'")" != "1" ]; then
        "${psql[@]}" -c "CREATE ROLE dynify LOGIN PASSWORD 'dynify'" ||
            { echo "error: could not create the role" >&2; return 1; }
    fi
    if [ "$("${psql[@]}" -c "SELECT 1 FROM pg_database WHERE datname = 'dynify_test'")" != "1" ]; then
        "${psql[@]}" -c "CREATE DATABASE dynify_test OWNER dynify" ||
            { echo "error: could not create the database" >&2; return 1; }
    fi
    export DYNIFY_TEST_POSTGRES_URL="postgresql://dynify:dynify@127.0.0.1:$port/dynify_test"
    echo "PostgreSQL for the tests: postgresql://dynify:***@127.0.0.1:$port/dynify_test"
}

_pg_stop() {
    # Stop the server only if this run started it.
    if [ -n "${DYNIFY_CI_PG_STARTED:-}" ]; then
        if [ "$(id -u)" -eq 0 ]; then
            runuser -u postgres -- $DYNIFY_CI_PG_STARTED -m fast stop >/dev/null 2>&1 || true
        else
            $DYNIFY_CI_PG_STARTED -m fast stop >/dev/null 2>&1 || true
        fi
    fi
}

if [ -z "${DYNIFY_TEST_POSTGRES_URL:-}" ]; then
    _pg_setup || exit 1
    trap _pg_stop EXIT
fi
