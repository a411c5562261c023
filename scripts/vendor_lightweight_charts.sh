#!/usr/bin/env bash
# Refreshes the vendored TradingView lightweight-charts under tradecanvas/serve/static/vendor/
# from its npm package (the chart page loads it from the daemon: no CDN, no build step).
#
#   scripts/vendor_lightweight_charts.sh [VERSION]     (default: the version pinned below)
#
# Takes dist/lightweight-charts.standalone.production.js and the LICENSE from the package
# tarball (`npm pack`, which checks the registry's integrity hash), and records the version
# and the file's sha256 in VERSION beside them. tests/serve/test_chart_page.py checks that
# the three agree. Needs npm (Debian: apt-get install npm).
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=${1:-5.2.1}
DEST=tradecanvas/serve/static/vendor
FILE=lightweight-charts.standalone.production.js

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "lightweight-charts@$VERSION" >/dev/null)
tar -xzf "$work/lightweight-charts-$VERSION.tgz" -C "$work"
packed="$work/package"
got=$(sed -n 's/^ *"version": *"\([^"]*\)".*/\1/p' "$packed/package.json" | head -n 1)
if [[ "$got" != "$VERSION" ]]; then
    echo "vendor: the package says version $got, not $VERSION" >&2
    exit 1
fi
mkdir -p "$DEST"
install -m 0644 "$packed/dist/$FILE" "$DEST/$FILE"
install -m 0644 "$packed/LICENSE" "$DEST/lightweight-charts.LICENSE"
sum=$(sha256sum "$DEST/$FILE" | cut -d' ' -f1)
cat >"$DEST/VERSION" <<TXT
lightweight-charts $VERSION
source https://registry.npmjs.org/lightweight-charts/-/lightweight-charts-$VERSION.tgz
sha256 $sum $FILE
TXT
echo "vendored lightweight-charts $VERSION into $DEST ($FILE sha256 $sum)"
