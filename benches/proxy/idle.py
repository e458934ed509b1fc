# Memory per idle keep-alive connection: usage: idle.py PORT PID N (the server at PORT proxies /file1k).
import socket, sys, time, os
port, pid, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
def rss(p):
    tot=0
    for l in open(f"/proc/{p}/status"):
        if l.startswith("VmRSS"): tot=int(l.split()[1])
    return tot
# warm: one request each connection so the connection is established and served once
before = rss(pid)
socks=[]
for i in range(n):
    s=socket.create_connection(("127.0.0.1",port))
    s.sendall(b"GET /file1k HTTP/1.1\r\nHost: x\r\n\r\n")
    socks.append(s)
for s in socks:
    got=b""
    while len(got) < 1024+100:
        got+=s.recv(65536)
time.sleep(1)
after = rss(pid)
print(f"port {port}: RSS {before} -> {after} KiB, {(after-before)*1024/n:.0f} bytes per idle connection (n={n}, each served one request)")
