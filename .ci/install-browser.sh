#!/usr/bin/env bash
# Installs what the browser tests need, without downloading a browser from a test tool:
#   - Debian's chromium (apt-get, only when running as root and chromium is missing)
#   - playwright-core from the npm registry, into .ci/browser/ (git-ignored)
# and records the outcome in .ci/browser/status: "ready <chromium path>" or "skip: <reason>".
# Exit 0 when the browser is ready or truly cannot be installed here (the tests then SKIP with that
# reason); exit 1 only when an install step that should work fails (a real error to fix).
set -uo pipefail
cd "$(dirname "$0")/.."
DIR=.ci/browser
PLAYWRIGHT_VERSION="${PLAYWRIGHT_VERSION:-1.64.1}"
mkdir -p "$DIR"
STATUS="$DIR/status"

skip() {
    echo "skip: $*" >"$STATUS"
    echo "install-browser: SKIP browser tests: $*" >&2
    exit 0
}

find_chromium() {
    for c in "${CHROMIUM:-}" chromium chromium-browser; do
        [ -n "$c" ] && command -v "$c" >/dev/null 2>&1 && { command -v "$c"; return 0; }
    done
    return 1
}

chromium_path="$(find_chromium)"
if [ -z "$chromium_path" ]; then
    command -v apt-get >/dev/null 2>&1 || skip "chromium is not installed and there is no apt-get to install it"
    [ "$(id -u)" = 0 ] || skip "chromium is not installed and apt-get needs root (run: sudo apt-get install chromium)"
    echo "install-browser: apt-get install chromium (Debian's package; no browser download)" >&2
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get update -qq >"$DIR/apt.log" 2>&1; then
        skip "apt-get update failed (no package registry reachable?); see $DIR/apt.log"
    fi
    if ! apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >>"$DIR/apt.log" 2>&1; then
        # A registry that answers but has no chromium (another distribution) is a "cannot install".
        apt-cache show chromium >/dev/null 2>&1 || skip "no 'chromium' package in this system's apt sources"
        echo "install-browser: apt-get install chromium failed; see $DIR/apt.log" >&2
        tail -20 "$DIR/apt.log" >&2
        exit 1
    fi
    chromium_path="$(find_chromium)" || { echo "install-browser: chromium installed but not on PATH" >&2; exit 1; }
fi

command -v npm >/dev/null 2>&1 || skip "npm is not installed (needed for playwright-core)"
if [ ! -f "$DIR/node_modules/playwright-core/package.json" ] ||
    ! grep -q "\"version\": \"$PLAYWRIGHT_VERSION\"" "$DIR/node_modules/playwright-core/package.json"; then
    echo "install-browser: npm install playwright-core@$PLAYWRIGHT_VERSION into $DIR" >&2
    # playwright-core never downloads a browser; the variable makes sure nothing else tries to.
    if ! PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --prefix "$DIR" --no-save --no-audit --no-fund \
        --loglevel=error "playwright-core@$PLAYWRIGHT_VERSION" >"$DIR/npm.log" 2>&1; then
        if ! npm ping >/dev/null 2>&1; then
            skip "the npm registry is unreachable; see $DIR/npm.log"
        fi
        echo "install-browser: npm install playwright-core failed; see $DIR/npm.log" >&2
        tail -20 "$DIR/npm.log" >&2
        exit 1
    fi
fi
echo "ready $chromium_path" >"$STATUS"
echo "install-browser: ready ($("$chromium_path" --version 2>/dev/null), playwright-core $PLAYWRIGHT_VERSION)" >&2
