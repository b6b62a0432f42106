#!/usr/bin/env bash
# Refresh the web UI's vendored files from the npm registry (`npm pack`, no install, no build step), at the
# versions pinned below, and record their SHA-256 in services/gateway/ui/static/vendor/MANIFEST.sha256.
# The files are committed: setup and CI need no npm. To update: change a version, run this, run
# tests/unit/test_ui_vendor.py and the web UI's e2e test, commit.
set -euo pipefail
cd "$(dirname "$0")/.."

UPLOT=1.6.32
SWAGGER_UI=5.35.0
vendor=services/gateway/ui/static/vendor
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

(cd "$work" && npm pack --silent "uplot@$UPLOT" "swagger-ui-dist@$SWAGGER_UI" >/dev/null)
mkdir -p "$work/uplot" "$work/swagger"
tar xzf "$work/uplot-$UPLOT.tgz" -C "$work/uplot"
tar xzf "$work/swagger-ui-dist-$SWAGGER_UI.tgz" -C "$work/swagger"

rm -rf "$vendor/uplot" "$vendor/swagger-ui"
mkdir -p "$vendor/uplot" "$vendor/swagger-ui"
cp "$work/uplot/package/dist/uPlot.iife.min.js" "$work/uplot/package/dist/uPlot.min.css" \
   "$work/uplot/package/LICENSE" "$vendor/uplot/"
cp "$work/swagger/package/swagger-ui-bundle.js" "$work/swagger/package/swagger-ui.css" \
   "$work/swagger/package/swagger-ui-bundle.js.LICENSE.txt" "$work/swagger/package/LICENSE" \
   "$work/swagger/package/NOTICE" "$vendor/swagger-ui/"

{
    echo "# uplot@$UPLOT swagger-ui-dist@$SWAGGER_UI (deploy/vendor_ui.sh)"
    (cd "$vendor" && find uplot swagger-ui -type f | LC_ALL=C sort | xargs sha256sum)
} > "$vendor/MANIFEST.sha256"
echo "vendored uplot@$UPLOT and swagger-ui-dist@$SWAGGER_UI into $vendor"
