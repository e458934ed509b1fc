#!/usr/bin/env bash
# The side-by-side runs behind BENCHMARKS.md's summary table: each Strata setup started fresh
# under `taskset -c 0`, then ../shared/bench/compare.sh for its scenario. Run from the repo
# root after `cargo build --release`, on a quiet machine, as root (compare.sh starts nginx,
# HAProxy, Varnish and Redis). Usage: benches/final/run.sh [SCENARIO...]
#   scenarios: static kv1 s2 s5 edge proxy replicas   (default: all)
# The balancer runs with `pipeline = 64` (upstream pipelining; PIPELINE=1 turns it off) and
# `coalesce_wakeups = "200us"` (wake-up coalescing; COALESCE=0s turns it off).
set -euo pipefail
bin=$PWD/target/release/strata
compare=${COMPARE:-$PWD/../shared/bench/compare.sh}
work=$(mktemp -d /tmp/strata-final.XXXXXX)
export STRATA_CLUSTER_SECRET=final-run-secret-0123456789abcdef STRATA_LOG=warn
pids=()
stop() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; sleep 1; pids=(); }
trap 'stop; rm -rf "$work"' EXIT
start() { # name, config text
  mkdir -p "$work/$1"; printf '%s\n' "$2" > "$work/$1/node.toml"
  (cd "$work/$1" && exec taskset -c 0 "$bin" serve --config node.toml >log 2>&1) & pids+=($!)
  sleep 1
}
node() { printf '[node]\nname = "%s"\nadmin = "127.0.0.1:%s"\ndata_dir = "%s"\n' "$1" "$2" "$work/$1/data"; }
run() { echo "== $1"; "$compare" "$2" "$3" 2>&1 | tail -n +2 | grep -v '^$' || true; }

scenarios=${*:-static kv1 s2 s5 edge proxy replicas}
for s in $scenarios; do
  case $s in
    static)
      mkdir -p "$work/st/public"; head -c 1024 /dev/zero | tr '\0' x > "$work/st/public/file1k"
      start st "$(node st 29601)
[app]
listen = \"127.0.0.1:28601\"
static_dir = \"$work/st/public\""
      run "stage 1 static" static http://127.0.0.1:28601; stop ;;
    kv1)
      start kv1 "$(node kv1 29602)
[app]
listen = \"127.0.0.1:28602\""
      run "stage 1 kv-get" kv-get http://127.0.0.1:28602
      run "stage 1 kv-put" kv-put http://127.0.0.1:28602; stop ;;
    s2)
      start s2s "$(node s2s 29603)
[storage]
listen = \"127.0.0.1:27103\""
      start s2a "$(node s2a 29604)
[app]
listen = \"127.0.0.1:28604\"
storage = { primary = \"127.0.0.1:27103\" }"
      run "stage 2 kv-get (app + remote storage, both on CPU 0)" kv-get http://127.0.0.1:28604
      run "stage 2 kv-put" kv-put http://127.0.0.1:28604; stop ;;
    s5)
      start s5s "$(node s5s 29605)
[storage]
listen = \"127.0.0.1:27105\""
      start s5a "$(node s5a 29606)
[app]
listen = \"127.0.0.1:28606\"
storage = { primary = \"127.0.0.1:27105\" }
[app.cache]
max_bytes = \"64MiB\""
      run "stage 5 kv-get (app + record cache + remote storage, both on CPU 0)" kv-get http://127.0.0.1:28606; stop ;;
    edge)
      start edge "$(node edge 29607)
[edge]
listen = \"127.0.0.1:28607\"
upstreams = [\"127.0.0.1:18080\"]"
      run "stage 6 edge cache" cache http://127.0.0.1:28607; stop ;;
    proxy)
      start lb "$(node lb 29608)
[balancer]
listen = \"127.0.0.1:28608\"
backends = [\"127.0.0.1:18080\"]
pipeline = ${PIPELINE:-64}
coalesce_wakeups = \"${COALESCE:-200us}\""
      run "stage 3 balancer proxy" proxy http://127.0.0.1:28608; stop ;;
    replicas)
      # Stage 4 read throughput with 0, 1 and 2 read replicas behind one app. Every node
      # shares CPU 0 (this machine has two cores; wrk needs the other), so this measures
      # what routing reads to replicas costs, not the capacity replicas add on their own VMs.
      for n in ${REPLICAS:-0 1 2}; do
        start r${n}p "$(node r${n}p 29610)
[storage]
listen = \"127.0.0.1:27110\""
        list=""
        for i in $(seq 1 "$n"); do
          start r${n}r$i "$(node r${n}r$i $((29610 + i)))
[storage]
listen = \"127.0.0.1:$((27110 + i))\"
mode = \"replica\"
follow = \"127.0.0.1:27110\""
          list+="${list:+, }\"127.0.0.1:$((27110 + i))\""
        done
        start r${n}a "$(node r${n}a 29619)
[app]
listen = \"127.0.0.1:28619\"
storage = { primary = \"127.0.0.1:27110\", replicas = [$list] }"
        run "stage 4 kv-get through the app, $n read replica(s), all on CPU 0" kv-get http://127.0.0.1:28619
        curl -s http://127.0.0.1:29619/admin/status | python3 -c 'import json,sys
def find(v):
    if isinstance(v, dict):
        if "reads" in v and isinstance(v["reads"], dict): print("app storage reads:", v["reads"])
        for x in v.values(): find(x)
    elif isinstance(v, list):
        for x in v: find(x)
find(json.load(sys.stdin))' || true
        stop
      done ;;
    *) echo "unknown scenario $s" >&2; exit 2 ;;
  esac
done
