#!/usr/bin/env bash
# Run the Playwright end-to-end suite (e2e/) against real three-replica clusters, in headless Chromium.
#
#   scripts/e2e.sh                    # everything
#   scripts/e2e.sh tests/failover.spec.ts -g "kill"   # extra arguments go to `playwright test`
#
# Steps: build the browser app into static/pkg (scripts/build-frontend.sh), build the release binary, install
# the system Chromium if it is missing (Playwright's own browser download is not used), install the e2e
# dependencies from the lockfile, run the tests. Each test starts its own cluster on free loopback ports, so
# nothing else needs to be running. Screenshots for the README are written to docs/screenshots/.
#
# Environment: CHROMIUM_PATH (default /usr/bin/chromium), REPLICHAT_E2E_LOG (the replicas' --log filter),
# REPLICHAT_E2E_KEEP=1 (keep every test's replica logs and databases, not only the failing ones').
set -euo pipefail
cd "$(dirname "$0")/.."

echo "e2e.sh: building the browser app"
scripts/build-frontend.sh

echo "e2e.sh: building the release binary"
cargo build --release --locked -p replichat

chromium="${CHROMIUM_PATH:-/usr/bin/chromium}"
if [ ! -x "$chromium" ]; then
  echo "e2e.sh: installing Chromium"
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  $sudo apt-get update
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y --no-install-recommends chromium
  chromium=/usr/bin/chromium
fi
export CHROMIUM_PATH="$chromium"
"$CHROMIUM_PATH" --version 2>/dev/null || true

cd e2e
# Playwright would otherwise try to download its own browsers on install.
export PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1
if [ -f package-lock.json ]; then
  npm ci --no-audit --no-fund
else
  npm install --no-audit --no-fund
fi

echo "e2e.sh: running the tests"
CI=1 npx playwright test --reporter=list "$@"
