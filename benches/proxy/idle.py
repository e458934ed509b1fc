# Memory per idle keep-alive connection: usage: idle.py PORT PID N [--serial]
# (the server at PORT proxies /file1k). N client connections each make one request and
# stay open; the server's RSS growth is divided by N. By default all N requests are sent
# before any answer is read (a burst: buffer pools grow to what the burst needed, and that
# growth is counted too); with --serial each connection gets its answer before the next
# opens, so at most one request is in flight and the growth is the connections' own state.
import socket, sys, time
port, pid, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
serial = "--serial" in sys.argv[4:]
def rss(p):
    tot = 0
    for l in open(f"/proc/{p}/status"):
        if l.startswith("VmRSS"):
            tot = int(l.split()[1])
    return tot
def answer(s):
    got = b""
    while len(got) < 1024 + 100:
        chunk = s.recv(65536)
        if not chunk:
            sys.exit(f"port {port}: connection closed before the answer")
        got += chunk
before = rss(pid)
socks = []
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET /file1k HTTP/1.1\r\nHost: x\r\n\r\n")
    socks.append(s)
    if serial:
        answer(s)
if not serial:
    for s in socks:
        answer(s)
time.sleep(1)
after = rss(pid)
mode = "one at a time" if serial else "all at once"
print(f"port {port}: RSS {before} -> {after} KiB, {(after-before)*1024/n:.0f} bytes per idle connection (n={n}, each served one request, {mode})")
