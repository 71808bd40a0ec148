#!/usr/bin/env bash
# Install Debian's Chromium for the browser tests (tests/serve/test_web.py), idempotently.
#
# Playwright (a pip package in requirements.txt) drives /usr/bin/chromium through `executable_path`; it never
# downloads a browser of its own. Needs root (CI runs as root); does nothing when chromium is already there.
set -euo pipefail

CHROMIUM=/usr/bin/chromium

if [ -x "$CHROMIUM" ] && "$CHROMIUM" --version >/dev/null 2>&1; then
    echo "install-browser: $("$CHROMIUM" --version 2>/dev/null) already installed"
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=sudo
    else
        echo "install-browser: need root to apt-get install chromium (run as root, or install it yourself)" >&2
        exit 1
    fi
else
    SUDO=
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
echo "install-browser: $("$CHROMIUM" --version 2>/dev/null) installed"
