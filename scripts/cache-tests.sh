#!/usr/bin/env bash
# Runs the public HTTP cache test suite (http-tests/cache-tests, the suite behind
# cache-tests.fyi) against the edge role, and compares the result with the published
# results of Apache Traffic Server, nginx, Varnish and others shipped in the suite.
#
#   scripts/cache-tests.sh                 # whole suite, summary table
#   scripts/cache-tests.sh -i vary-match   # one test, with its request/response dump
#
# Needs node (>= 18) and npm, and either network access to clone the suite and install its
# npm dependencies, or an existing checkout in CACHE_TESTS_DIR (with `npm install` done).
# Environment:
#   CACHE_TESTS_DIR   checkout of the suite (default target/cache-tests; cloned if absent)
#   CACHE_TESTS_REPO  where to clone from (default the suite's GitHub repository)
#   CACHE_TESTS_REF   commit to test with (default the one BENCHMARKS.md figures used)
#   STRATA_BIN        the binary (default target/release/strata, else target/debug/strata)
#   ORIGIN_PORT, EDGE_PORT, ADMIN_PORT   loopback ports (default 18001, 18000, 18902)
# Results: target/cache-tests-results/strata.json (the suite's JSON format).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
CT=${CACHE_TESTS_DIR:-$ROOT/target/cache-tests}
REPO=${CACHE_TESTS_REPO:-https://github.com/http-tests/cache-tests.git}
REF=${CACHE_TESTS_REF:-b55b8bda3dbb8c927c04e85bd8d496a8caa3e4ba}
ORIGIN_PORT=${ORIGIN_PORT:-18001}
EDGE_PORT=${EDGE_PORT:-18000}
ADMIN_PORT=${ADMIN_PORT:-18902}
OUT=$ROOT/target/cache-tests-results
TEST_ID=""
while getopts "i:" opt; do
  case $opt in
    i) TEST_ID=$OPTARG ;;
    *) echo "usage: $0 [-i test-id]" >&2; exit 2 ;;
  esac
done

command -v node >/dev/null && command -v npm >/dev/null || {
  echo "cache-tests: node and npm are needed" >&2; exit 1; }

if [[ ! -d $CT/tests ]]; then
  echo "cache-tests: cloning $REPO into $CT" >&2
  git clone --quiet "$REPO" "$CT"
  git -C "$CT" checkout --quiet "$REF"
fi
if [[ ! -d $CT/node_modules ]]; then
  (cd "$CT" && npm install --omit=dev --no-audit --no-fund --loglevel=error)
fi

BIN=${STRATA_BIN:-}
if [[ -z $BIN ]]; then
  if [[ -x target/release/strata ]]; then BIN=target/release/strata
  else cargo build --quiet && BIN=target/debug/strata; fi
fi

mkdir -p "$OUT"
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

cat >"$WORK/edge.toml" <<EOF
[node]
name = "edge-cache-tests"
data_dir = "$WORK/data"
admin = "127.0.0.1:$ADMIN_PORT"

[edge]
listen = "127.0.0.1:$EDGE_PORT"
upstreams = ["127.0.0.1:$ORIGIN_PORT"]
EOF

(cd "$CT" && npm_config_protocol=http npm_config_port="$ORIGIN_PORT" \
  npm_config_pidfile="$WORK/server.pid" exec node test-engine/server/server.mjs \
  >"$WORK/server.log" 2>&1) &
PIDS+=($!)
"$BIN" serve --config "$WORK/edge.toml" >"$WORK/edge.log" 2>&1 &
PIDS+=($!)

wait_port() {
  for _ in $(seq 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "cache-tests: nothing listening on port $1" >&2
  cat "$WORK/server.log" "$WORK/edge.log" >&2
  exit 1
}
wait_port "$ORIGIN_PORT"
wait_port "$EDGE_PORT"

cd "$CT"
if [[ -n $TEST_ID ]]; then
  npm run --silent cli --base="http://127.0.0.1:$EDGE_PORT" --id="$TEST_ID"
  exit 0
fi
npm run --silent cli --base="http://127.0.0.1:$EDGE_PORT" >"$OUT/strata.json"
echo "suite commit $(git -C "$CT" rev-parse --short HEAD 2>/dev/null || echo '?'), $(date -u +%F)"
node "$ROOT/scripts/cache-tests-summary.mjs" "$CT" \
  "strata=$OUT/strata.json" \
  "ats=results/trafficserver.json" "nginx=results/nginx.json" \
  "varnish=results/varnish.json" "squid=results/squid.json" \
  "httpd=results/apache.json" "caddy=results/caddy.json" "fastly=results/fastly.json" \
  --failures-of=strata
