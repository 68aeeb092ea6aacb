#!/usr/bin/env bash
# Install what the tests need and run them all: unit tests, doctests and the
# integration tests, which start a real Kafka broker (fetched with Maven).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
for tool in java mvn; do
  command -v "$tool" >/dev/null || { echo "the tests need '$tool' (Java 17 and Maven)" >&2; exit 1; }
done
if ! command -v kcat >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  # kcat is only used to prove that a plain Kafka client can produce events.
  (apt-get install -y -qq kcat >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq kcat >/dev/null 2>&1; }) \
    || echo "kcat could not be installed; its test will be skipped" >&2
fi
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  # Headless Chromium runs the dashboard's browser tests (tests/integration/test_dashboard_browser.py).
  (apt-get install -y -qq chromium >/dev/null 2>&1 || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1; }) \
    || echo "chromium could not be installed; the dashboard's browser tests will be skipped" >&2
fi
venv=$("$repo/scripts/setup-venv.sh")
cd "$repo"
exec "$venv/bin/python" -m pytest -p no:cacheprovider "$@"
