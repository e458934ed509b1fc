#!/bin/bash
# User and kernel CPU per proxied request of nginx proxy_pass, HAProxy and the strata
# balancer, side by side, with compare.sh's proxy setup: each proxy pinned to CPU 0, the
# nginx backend (/file1k) and wrk (CONNS connections, default 64; 8 s, after 2 s of warm-up)
# on CPU 1.
# Two rounds each, interleaved. compare.sh prints the sum; this splits it, to show where
# the time goes (utime and stime from /proc/PID/stat; for nginx, its one worker). The last
# two columns are what CPU 1 spent per request: the backend's worker, and everything on
# CPU 1 (wrk and the backend, which bound req/s when CPU 1 is saturated).
# Several strata binaries (an A/B of two builds) each get their own balancer and take turns
# with the others in every round, under the same conditions.
# A binary given as BINARY@N runs with `pipeline = N` (upstream pipelining; default 1, off),
# so the same build can be compared with itself: split.sh target/release/strata{,@32}.
# A further ~NAP sets `coalesce_wakeups` (wake-up coalescing, default "0s": off), e.g.
# target/release/strata@32~200us. A last +MIN sets `coalesce_min_in_flight` (default 16).
# Each round also prints wrk's median and 99th-percentile latency.
# With ROUNDS > 1 it ends with each server's mean and standard deviation over the rounds.
# usage: benches/proxy/split.sh [STRATA_BINARY[@N][~NAP][+MIN]...]
#   (needs nginx, haproxy, wrk; env ROUNDS=2, SECS=8, CONNS=64)
set -u
[[ $# -gt 0 ]] || set -- "$PWD/target/release/strata"
dir=$(mktemp -d /tmp/strata-split.XXXXXX)
chmod 755 "$dir" # the backend's worker runs as nobody and must read www/file1k
mkdir -p "$dir/www" && head -c 1024 /dev/zero | tr '\0' x > "$dir/www/file1k"
nginx_conf() { # name, http block body
  printf 'worker_processes 1; daemon off; pid %s/%s.pid; error_log %s/%s.err;\nevents { worker_connections 4096; }\nhttp { access_log off; %s }\n' \
    "$dir" "$1" "$dir" "$1" "$2" > "$dir/$1.conf"
}
nginx_conf be "server { listen 127.0.0.1:18780; root $dir/www; }"
nginx_conf np "upstream be { server 127.0.0.1:18780; keepalive 64; } server { listen 127.0.0.1:18781; location / { proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection \"\"; } }"
printf 'global\n  nbthread 1\n  maxconn 4000\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\nfrontend fe\n  bind 127.0.0.1:18782\n  default_backend be\nbackend be\n  http-reuse always\n  server s1 127.0.0.1:18780\n' > "$dir/hp.cfg"

taskset -c 1 nginx -c "$dir/be.conf" & BE=$!
taskset -c 0 nginx -c "$dir/np.conf" & NP=$!
taskset -c 0 haproxy -f "$dir/hp.cfg" > "$dir/hp.log" 2>&1 & HP=$!
pids=($BE $NP $HP) stratas=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$dir"' EXIT
i=0
for arg in "$@"; do
  min=16; [[ $arg == *+* ]] && min=${arg##*+}
  rest=${arg%+*} nap=0s; [[ $rest == *~* ]] && nap=${rest##*~}
  spec=${rest%~*} bin=${spec%@*} depth=1; [[ $spec == *@* ]] && depth=${spec##*@}
  port=$((18783 + i)) name=strata; [[ $# -gt 1 ]] && name=$(basename "$arg")
  printf '[node]\nname = "split-lb%s"\nadmin = "127.0.0.1:0"\n[balancer]\nlisten = "127.0.0.1:%s"\nbackends = ["127.0.0.1:18780"]\npipeline = %s\ncoalesce_wakeups = "%s"\ncoalesce_min_in_flight = %s\n' $i $port "$depth" "$nap" "$min" > "$dir/lb$i.toml"
  STRATA_LOG=warn taskset -c 0 "$bin" serve --config "$dir/lb$i.toml" > "$dir/lb$i.log" 2>&1 & pids+=($!)
  stratas+=("$name:$!:$port"); i=$((i + 1))
done
sleep 1.5
NW=$(pgrep -P $NP) BW=$(pgrep -P $BE)
# CPU 1's busy ticks (user, nice, system, irq, softirq): wrk and the backend share it.
cpu1_busy() { awk '/^cpu1 / {print $2 + $3 + $4 + $7 + $8}' /proc/stat; }
hz=$(getconf CLK_TCK) secs=${SECS:-8} conns=${CONNS:-64}
for round in $(seq 1 "${ROUNDS:-2}"); do
  for pair in nginx:$NW:18781 haproxy:$HP:18782 "${stratas[@]}"; do
    IFS=: read -r name pid port <<<"$pair"
    taskset -c 1 wrk -t1 -c"$conns" -d2s "http://127.0.0.1:$port/file1k" > /dev/null
    read -r u0 s0 < <(awk '{print $14, $15}' "/proc/$pid/stat")
    b0=$(awk '{print $14 + $15}' "/proc/$BW/stat"); c0=$(cpu1_busy)
    out=$(taskset -c 1 wrk -t1 -c"$conns" -d${secs}s --latency "http://127.0.0.1:$port/file1k")
    read -r u1 s1 < <(awk '{print $14, $15}' "/proc/$pid/stat")
    b1=$(awk '{print $14 + $15}' "/proc/$BW/stat"); c1=$(cpu1_busy)
    n=$(awk '/requests in/ {print $1}' <<<"$out")
    p50=$(awk '$1 == "50%" {print $2}' <<<"$out") p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
    echo "$round $name $n $((u1 - u0)) $((s1 - s0)) $((b1 - b0)) $((c1 - c0)) $p50 $p99"
  done
done | python3 -c "
import statistics as st, sys
hz, secs, seen = $hz, $secs, {}
def ms(t):  # wrk prints 850.00us, 1.25ms or 1.02s
    for unit, f in (('us', 1e-3), ('ms', 1.0), ('s', 1e3)):
        if t.endswith(unit):
            return float(t[:-len(unit)]) * f
for line in sys.stdin:
    r, name, n, u, s, b, c, p50, p99 = line.split(); n = int(n); u = int(u) / hz; s = int(s) / hz
    seen.setdefault(name, []).append(((u + s) * 1e6 / n, u * 1e6 / n, n / secs, ms(p99)))
    print(f'round {r}  {name}: {n/secs:9.0f} req/s  user {u*1e6/n:5.2f} us/req  kernel {s*1e6/n:5.2f} us/req  total {(u+s)*1e6/n:5.2f}'
          f'  backend {int(b)/hz*1e6/n:5.2f}  cpu1 {int(c)/hz*1e6/n:5.2f}  p50 {ms(p50):.2f} ms  p99 {ms(p99):.2f} ms', flush=True)
if len(next(iter(seen.values()))) > 1:
    for name, v in seen.items():
        t = [x[0] for x in v]
        print(f'{name}: total mean {st.mean(t):5.2f} sd {st.stdev(t):4.2f} us/req, user mean {st.mean(x[1] for x in v):4.2f},'
              f' req/s mean {st.mean(x[2] for x in v):.0f}, p99 mean {st.mean(x[3] for x in v):.2f} ms')
"
