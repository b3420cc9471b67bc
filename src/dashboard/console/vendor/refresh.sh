#!/bin/sh
# Refreshes uPlot from the npm registry at the pinned version: sh src/dashboard/console/vendor/refresh.sh
set -eu; V=1.6.32; D=$(dirname "$0")/uplot; T=$(mktemp -d); (cd "$T" && npm pack --silent "uplot@$V" >/dev/null && tar xzf "uplot-$V.tgz"); cp "$T/package/dist/uPlot.esm.js" "$T/package/dist/uPlot.min.css" "$T/package/LICENSE" "$D/"; rm -rf "$T"; echo "uPlot $V in $D"
