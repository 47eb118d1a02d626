#!/usr/bin/env bash
# Install what the browser test (tests/test_browser.py) needs: Debian's chromium and chromium-driver.
# Idempotent: does nothing when both are already on PATH. Installs with apt-get when run as root,
# otherwise prints the command to run.
set -euo pipefail

have() { command -v "$1" >/dev/null 2>&1; }

if have chromium && have chromedriver; then
    echo "chromium and chromedriver already installed: $(command -v chromium), $(command -v chromedriver)"
    exit 0
fi

if [ "$(id -u)" -eq 0 ] && have apt-get; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends chromium chromium-driver
    echo "installed: $(command -v chromium), $(command -v chromedriver)"
else
    echo "the browser test needs chromium and chromedriver (it is skipped without them, outside CI); install:" >&2
    echo "    sudo apt-get update && sudo apt-get install -y chromium chromium-driver" >&2
    # In CI the browser test must run: fail here rather than later.
    [ -z "${CI:-}" ] || exit 1
fi
