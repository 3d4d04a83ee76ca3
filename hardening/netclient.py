#!/usr/bin/env python3
"""The client side of hardening/netem.sh, run inside the client network namespace.

    netclient.py lossy  HOST:PORT TOKEN REQUESTS PARALLEL BYTES
    netclient.py cut    HOST:PORT TOKEN IFACE
    netclient.py probe  HOST:PORT TOKEN

Every reply of the server's handler is `BYTES` bytes of `x` then `\\nEND\\n`, so a reply is
either complete, or the client must see a clean failure: a timeout, a reset, or a close with
nothing at all. A close after part of a reply (a silently truncated reply) is the one bad
outcome. Prints one `result k=v ...` line; exits 1 if any reply was bad.
"""

import socket
import subprocess
import sys
import threading
import time


def target(text):
    host, port = text.rsplit(":", 1)
    return host, int(port)


def expected(size):
    return b"x" * size + b"\nEND\n"


def request(addr, token, size, timeout=30, during=None):
    """Returns 'ok', 'failed: why' or 'BAD: why'. `during(sock, got)` runs once mid-reply."""
    got = b""
    try:
        s = socket.create_connection(addr, timeout=timeout)
        s.settimeout(timeout)
        s.sendall(f"{token} {size}\n".encode())
        s.shutdown(socket.SHUT_WR)
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
            if during and len(got) >= 65536:
                during()
                during = None
        s.close()
    except OSError as e:
        return f"failed: {type(e).__name__} after {len(got)} bytes"
    if got == expected(size):
        return "ok"
    if not got:
        return "failed: closed without a reply"
    return f"BAD: closed cleanly after {len(got)} of {len(expected(size))} bytes: {got[-20:]!r}"


def link(iface, state):
    subprocess.run(["ip", "link", "set", iface, state], check=True)


def report(outcomes):
    counts = {}
    for o in outcomes:
        key = o.split()[0].rstrip(":")
        counts[key] = counts.get(key, 0) + 1
    print("result " + " ".join(f"{k}={v}" for k, v in sorted(counts.items())), flush=True)
    for o in outcomes:
        if not o.startswith("ok") or "[" in o:
            print("  " + o, flush=True)
    return 1 if counts.get("BAD") else 0


def lossy(addr, token, requests, parallel, size):
    outcomes = []
    lock = threading.Lock()
    todo = list(range(requests))

    def worker():
        while True:
            with lock:
                if not todo:
                    return
                todo.pop()
            outcome = request(addr, token, size)
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=worker) for _ in range(parallel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return report(outcomes)


def cut(addr, token, iface):
    outcomes = []
    # 1. The link goes down while a 3 MB reply is being sent, and comes back 4 s later.
    def blackout():
        link(iface, "down")
        time.sleep(4)
        link(iface, "up")

    outcomes.append(request(addr, token, 3 << 20, timeout=10, during=blackout) + " [reply cut]")
    # 2. Half a request, then the link is down for longer than the server's read timeout.
    try:
        s = socket.create_connection(addr, timeout=10)
        s.sendall(f"{token} 10".encode())
        link(iface, "down")
        time.sleep(6)
        link(iface, "up")
        time.sleep(1)
        s.sendall(b"\n")
        s.shutdown(socket.SHUT_WR)
        got = s.recv(65536)
        if got == b"":
            outcomes.append("failed: closed without a reply [request cut]")
        elif got == expected(10):
            outcomes.append("ok [request cut]")
        else:
            outcomes.append(f"BAD: {got!r} [request cut]")
    except OSError as e:
        outcomes.append(f"failed: {type(e).__name__} [request cut]")
    return report(outcomes)


def probe(addr, token):
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if request(addr, token, 1000, timeout=5) == "ok":
            print("result ok=1", flush=True)
            return 0
        time.sleep(0.5)
    print("result failed=1", flush=True)
    return 1


def main():
    mode, addr, token = sys.argv[1], target(sys.argv[2]), sys.argv[3]
    if mode == "lossy":
        sys.exit(lossy(addr, token, *map(int, sys.argv[4:7])))
    if mode == "cut":
        sys.exit(cut(addr, token, sys.argv[4]))
    if mode == "probe":
        sys.exit(probe(addr, token))
    sys.exit(__doc__)


if __name__ == "__main__":
    main()
