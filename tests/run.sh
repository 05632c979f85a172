#!/usr/bin/env bash
# The whole test suite, from a fresh clone on a fresh machine: installs what
# the tests need, then runs every test. `.ci/run` calls exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo test --all-targets --locked
