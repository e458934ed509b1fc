# Memory per idle keep-alive connection:
#   usage: idle.py PORT PID N [--serial] [--rounds R] [--settle SECONDS]
# (the server at PORT proxies /file1k). N client connections each make one request and
# stay open; the server's RSS growth is divided by N. By default all N requests are sent
# before any answer is read (a burst: buffer pools grow to what the burst needed, and that
# growth is counted too); with --serial each connection gets its answer before the next
# opens, so at most one request is in flight and the growth is the connections' own state.
# With --rounds R, R batches of N connections are opened one after another, all kept open,
# RSS read SECONDS (default 1) after each: later rounds show what one more idle connection
# costs once the allocator holds what earlier rounds freed.
import socket, sys, time
port, pid, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
flags = sys.argv[4:]
serial = "--serial" in flags
def option(name, default):
    return float(flags[flags.index(name) + 1]) if name in flags else default
rounds, settle = int(option("--rounds", 1)), option("--settle", 1.0)
def rss(p):
    for l in open(f"/proc/{p}/status"):
        if l.startswith("VmRSS"):
            return int(l.split()[1])
    sys.exit(f"no VmRSS for pid {p}")
def answer(s):
    got = b""
    while len(got) < 1024 + 100:
        chunk = s.recv(65536)
        if not chunk:
            sys.exit(f"port {port}: connection closed before the answer")
        got += chunk
socks = []
mode = "one at a time" if serial else "all at once"
for r in range(1, rounds + 1):
    before = rss(pid)
    batch = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(b"GET /file1k HTTP/1.1\r\nHost: x\r\n\r\n")
        batch.append(s)
        if serial:
            answer(s)
    if not serial:
        for s in batch:
            answer(s)
    socks += batch
    time.sleep(settle)
    after = rss(pid)
    print(f"port {port}: round {r}: RSS {before} -> {after} KiB, {(after-before)*1024/n:.0f} bytes per idle connection (n={n}, each served one request, {mode}, read {settle:g} s later)")
