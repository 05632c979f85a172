#!/usr/bin/env bash
# The whole test suite, from a fresh clone on a fresh machine: installs what
# the tests need, then runs every test. `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

# The ClickHouse tests run the real `clickhouse` client against ClickHouse's
# engine through chDB behind tests/support/chdb_http.py (unless
# BIZSIGNAL_TEST_CLICKHOUSE_URL points at a real server). Create its venv once.
VENV=.venv-test
if ! "$VENV/bin/python" -c 'import chdb, lz4, clickhouse_cityhash' 2>/dev/null; then
    python3 -m venv "$VENV" || { apt-get update -qq && apt-get install -y -qq python3-venv && python3 -m venv "$VENV"; }
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -r tests/support/requirements.txt
fi
export BIZSIGNAL_TEST_PYTHON="$PWD/$VENV/bin/python"

# tests/deploy.rs validates the PromQL of deploy/ with promtool (Debian's
# `prometheus` package). Install it when missing and we can (root + apt-get);
# otherwise the deploy tests fail saying so (or set BIZSIGNAL_SKIP_PROMTOOL=1).
if ! command -v promtool >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus
    else
        echo "promtool not found and cannot install it (needs root and apt-get); tests/deploy.rs will fail unless BIZSIGNAL_SKIP_PROMTOOL=1" >&2
    fi
fi

# Formatting is part of the suite (rustfmt.toml), when rustfmt is installed.
if cargo fmt --version >/dev/null 2>&1; then
    cargo fmt --all -- --check
fi

cargo test --all-targets --locked

# The live page in a real browser: Debian's chromium driven by playwright-core
# (no browser download; the npm package is only the driver).
if ! command -v chromium >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
(cd tests/browser && npm ci --no-audit --no-fund --silent)
cargo build --locked --bin bizsignal
node --test tests/browser/
