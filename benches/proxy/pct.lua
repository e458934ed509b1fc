-- wrk script: latency percentiles beyond --latency's four, one line per run.
-- usage: wrk -t1 -c64 -d10s -s benches/proxy/pct.lua http://127.0.0.1:PORT/file1k
done = function(summary, latency, requests)
  local out = {}
  for _, p in ipairs({10, 25, 50, 75, 90, 95, 99, 99.9}) do
    out[#out+1] = string.format("p%s=%.2f", p, latency:percentile(p)/1000)
  end
  io.write(string.format("mean=%.2f sd=%.2f max=%.2f ", latency.mean/1000, latency.stdev/1000, latency.max/1000), table.concat(out, " "), "\n")
end
