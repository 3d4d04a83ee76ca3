#!/usr/bin/env python3
"""Hostile clients for command-trigger, one kind per run, for a bounded time.

    flood.py MODE HOST:PORT SECONDS [COUNT]

MODE is one of:
  idle       open COUNT (default 10000) connections, send nothing, hold them open
  garbage    COUNT (default 200) clients sending random bytes and over-long lines, reconnecting
  storm      COUNT (default 50) clients connecting and closing with a reset (SO_LINGER 0)
  slowloris  COUNT (default 500) connections dribbling one byte at a time, never a full line

Prints `ready` once the attack is in place (for idle: every connection is open), then, when
SECONDS have passed, one line `stats k=v ...` and exits 0. The legitimate client is the caller's.

The attack comes from FLOOD_SOURCE (default 127.0.0.2, still loopback), so the wrong-token
backoff it provokes blocks the attacker, not a legitimate client on 127.0.0.1.
"""

import os
import random
import resource
import socket
import struct
import sys
import threading
import time


SOURCE = (os.environ.get("FLOOD_SOURCE", "127.0.0.2"), 0)
IP_BIND_ADDRESS_NO_PORT = 24


def source_socket():
    s = socket.socket(socket.AF_INET)
    # Take a port at connect, per destination, not at bind: 10,000 binds to port 0 would take
    # 10,000 ports from the range the legitimate client needs too.
    s.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
    s.bind(SOURCE)
    return s


def connect(target, timeout):
    s = source_socket()
    s.settimeout(timeout)
    try:
        s.connect(target)
    except OSError:
        s.close()
        raise
    return s


def addr(text):
    host, port = text.rsplit(":", 1)
    return host.strip("[]"), int(port)


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = {}

    def add(self, key, n=1):
        with self.lock:
            self.counts[key] = self.counts.get(key, 0) + n

    def line(self):
        with self.lock:
            return "stats " + " ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))


def idle(target, seconds, count, stats):
    if raise_nofile() < count + 64:
        sys.exit(f"RLIMIT_NOFILE hard limit is below {count + 64}")
    held = []
    port = 20000  # below the ephemeral range: explicit ports, no search for a free one each time
    while len(held) < count:
        s = socket.socket(socket.AF_INET)
        try:
            s.bind((SOURCE[0], port))
        except OSError:
            s.close()
            port += 1
            continue
        port += 1
        s.settimeout(10)
        s.connect(target)
        held.append(s)
    stats.add("opened", len(held))
    print("ready", flush=True)
    time.sleep(seconds)
    # Still open? A server that dropped idle connections early would show here.
    alive = 0
    for s in held:
        s.setblocking(False)
        try:
            alive += s.recv(1) != b""
        except BlockingIOError:
            alive += 1
        except OSError:
            pass
    stats.add("still_open", alive)


def garbage_client(target, deadline, stats, rng):
    while time.monotonic() < deadline:
        try:
            s = connect(target, 5)
            kind = rng.random()
            if kind < 0.4:  # an over-long line
                data = b"x" * rng.randint(70_000, 300_000)
            elif kind < 0.8:  # random bytes, newlines included
                data = os.urandom(rng.randint(1, 20_000))
            else:  # many short garbage lines
                data = b"".join(os.urandom(rng.randint(0, 40)) + b"\n" for _ in range(50))
            try:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
            except OSError:
                stats.add("send_cut")  # the server refused mid-way: fine
            while s.recv(65536):
                pass
            stats.add("connections")
            stats.add("bytes", len(data))
        except OSError:
            stats.add("errors")
        finally:
            try:
                s.close()
            except Exception:
                pass


def storm_client(target, deadline, stats, rng):
    linger = struct.pack("ii", 1, 0)
    while time.monotonic() < deadline:
        try:
            s = source_socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            s.settimeout(5)
            s.connect(target)
            if rng.random() < 0.5:
                s.send(b"half a request without its end")
            s.close()  # RST
            stats.add("resets")
        except OSError:
            stats.add("errors")


def slowloris(target, seconds, count, stats):
    raise_nofile()
    deadline = time.monotonic() + seconds
    conns = []
    for _ in range(count):
        s = connect(target, 5)
        s.setblocking(False)
        conns.append(s)
    print("ready", flush=True)
    while time.monotonic() < deadline:
        for i, s in enumerate(conns):
            try:
                s.send(b"a")
                stats.add("bytes")
            except OSError:
                # Closed by the read timeout: come back, as an attacker would.
                stats.add("closed_by_server")
                s.close()
                try:
                    s = connect(target, 5)
                    s.setblocking(False)
                    conns[i] = s
                except OSError:
                    stats.add("errors")
        time.sleep(0.2)
    for s in conns:
        s.close()


def threaded(worker, target, seconds, count, stats):
    deadline = time.monotonic() + seconds
    threads = [
        threading.Thread(target=worker, args=(target, deadline, stats, random.Random(i)))
        for i in range(count)
    ]
    for t in threads:
        t.start()
    print("ready", flush=True)
    for t in threads:
        t.join()


def main():
    if len(sys.argv) < 4:
        sys.exit(__doc__)
    mode, target, seconds = sys.argv[1], addr(sys.argv[2]), float(sys.argv[3])
    count = int(sys.argv[4]) if len(sys.argv) > 4 else None
    stats = Stats()
    if mode == "idle":
        idle(target, seconds, count or 10_000, stats)
    elif mode == "garbage":
        threaded(garbage_client, target, seconds, count or 200, stats)
    elif mode == "storm":
        threaded(storm_client, target, seconds, count or 50, stats)
    elif mode == "slowloris":
        slowloris(target, seconds, count or 500, stats)
    else:
        sys.exit(f"unknown mode {mode}")
    print(stats.line(), flush=True)


if __name__ == "__main__":
    main()
