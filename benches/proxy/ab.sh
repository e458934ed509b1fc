#!/bin/bash
# The strata balancer alone on CPU 0 (nginx backend and wrk -c64 on CPU 1), its user and
# kernel CPU per proxied request, for each binary given, alternated over 3 rounds: an A/B
# of two builds under the same conditions (utime/stime from /proc/PID/stat).
# usage: benches/proxy/ab.sh BINARY...   (needs nginx, wrk)
dir=$(mktemp -d /tmp/pab.XXXXXX)
mkdir -p "$dir/www" && head -c 1024 /dev/zero | tr '\0' x > "$dir/www/file1k"
printf 'worker_processes 1; daemon off; pid %s/be.pid; error_log %s/be.err;\nevents { worker_connections 4096; }\nhttp { access_log off; server { listen 127.0.0.1:18780; root %s/www; } }\n' "$dir" "$dir" "$dir" > "$dir/be.conf"
printf '[node]\nname = "split-lb"\nadmin = "127.0.0.1:0"\n[balancer]\nlisten = "127.0.0.1:18783"\nbackends = ["127.0.0.1:18780"]\n' > "$dir/lb.toml"
taskset -c 1 nginx -c "$dir/be.conf" & BE=$!
trap 'kill $BE 2>/dev/null; wait 2>/dev/null; rm -rf "$dir"' EXIT
hz=$(getconf CLK_TCK)
for round in 1 2 3; do
for bin in "$@"; do
  STRATA_LOG=warn taskset -c 0 "$bin" serve --config "$dir/lb.toml" > "$dir/lb.log" 2>&1 & SP=$!
  sleep 1
  taskset -c 1 wrk -t1 -c64 -d2s "http://127.0.0.1:18783/file1k" > /dev/null
  read -r u0 s0 < <(awk '{print $14, $15}' "/proc/$SP/stat")
  out=$(taskset -c 1 wrk -t1 -c64 -d6s "http://127.0.0.1:18783/file1k")
  read -r u1 s1 < <(awk '{print $14, $15}' "/proc/$SP/stat")
  n=$(awk '/requests in/ {print $1}' <<<"$out")
  python3 -c "n=$n; u=($u1-$u0)/$hz; s=($s1-$s0)/$hz
print(f'$(basename $bin): {n/6:9.0f} req/s  user {u*1e6/n:5.2f}  kernel {s*1e6/n:5.2f}  total {(u+s)*1e6/n:5.2f} us/req')"
  kill $SP; wait $SP 2>/dev/null
done
done
