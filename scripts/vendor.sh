#!/usr/bin/env bash
# Rebuild the vendored front-end files from npm (needs Node/npm; `make run` does not):
#   scripts/vendor.sh
# GraphiQL (with the React it runs on) for GET /graphql, and axe-core for the billing
# page's accessibility test. Versions are pinned here; bump them here and rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
GRAPHIQL=3.8.3   # the last GraphiQL with a UMD build (4.x is ES modules for bundlers)
REACT=18.3.1     # React 18 is the last with UMD builds, which GraphiQL 3's UMD needs
AXE=4.10.3

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "graphiql@$GRAPHIQL" "react@$REACT" "react-dom@$REACT" \
  "axe-core@$AXE" >/dev/null)
for tgz in "$work"/*.tgz; do mkdir -p "${tgz%.tgz}" && tar xzf "$tgz" -C "${tgz%.tgz}"; done

out=api/static/vendor/graphiql
mkdir -p "$out" tests/vendor
cp "$work/graphiql-$GRAPHIQL/package/graphiql.min.js" "$work/graphiql-$GRAPHIQL/package/graphiql.min.css" "$out/"
cp "$work/graphiql-$GRAPHIQL/package/LICENSE" "$out/LICENSE.graphiql"
cp "$work/react-$REACT/package/umd/react.production.min.js" "$out/"
cp "$work/react-$REACT/package/LICENSE" "$out/LICENSE.react"
cp "$work/react-dom-$REACT/package/umd/react-dom.production.min.js" "$out/"
cp "$work/react-dom-$REACT/package/LICENSE" "$out/LICENSE.react-dom"
cp "$work/axe-core-$AXE/package/axe.min.js" tests/vendor/
cp "$work/axe-core-$AXE/package/LICENSE" tests/vendor/axe-core.LICENSE
printf 'graphiql %s\nreact %s\nreact-dom %s\naxe-core %s (tests/vendor)\n' \
  "$GRAPHIQL" "$REACT" "$REACT" "$AXE" > "$out/VERSIONS"
echo "vendored: $(tr '\n' ' ' < "$out/VERSIONS")"
