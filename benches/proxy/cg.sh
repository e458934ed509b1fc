#!/bin/bash
# Instructions per proxied request (userland) of a balancer binary under callgrind.
# usage: cg.sh BINARY NAME   (SECS=0 for the idle baseline: start, one probe, stop)
# Needs a backend serving /file1k on 127.0.0.1:18580 (e.g. compare.sh's nginx backend
# config on that port); the balancer listens on 127.0.0.1:18610.
set -u
bin=$1 name=$2 dir=$(mktemp -d)
cat > "$dir/cg.toml" <<TOML
[node]
name = "cg-lb"
admin = "127.0.0.1:0"
[balancer]
listen = "127.0.0.1:18610"
backends = ["127.0.0.1:18580"]
TOML
STRATA_LOG=warn taskset -c 0 valgrind --tool=callgrind --callgrind-out-file="$dir/cg.out" "$bin" serve --config "$dir/cg.toml" > "$dir/log" 2>&1 &
vp=$!
for i in $(seq 1 60); do curl -s -o /dev/null -m 1 http://127.0.0.1:18610/file1k && break; sleep 1; done
[[ ${SECS:-10} == 0 ]] && out="0 requests in" || out=$(taskset -c 1 wrk -t1 -c16 -d${SECS:-10}s http://127.0.0.1:18610/file1k)
reqs=$(awk '/requests in/ {print $1}' <<<"$out")
kill -INT $vp; wait $vp
ir=$(grep -E "^summary:|^totals:" "$dir/cg.out" | head -1 | awk '{print $2}')
echo "$name: $reqs requests (+1 probe), $ir instructions total, $((ir / (reqs + 1))) per request"
rm -rf "$dir"
