#!/usr/bin/env python3
"""A netem stand-in for kernels without sch_netem: two TUN devices bridged by this process,
which drops, delays and reorders the IP packets between them. The kernels' TCP stacks on both
sides see real loss, delay and reordering, as with `tc qdisc ... netem`.

    tunem.py IFACE_A IFACE_B CONTROL_FILE

Creates IFACE_A and IFACE_B (the caller moves them into namespaces and sets addresses), prints
`ready`, then forwards until killed. CONTROL_FILE holds `LOSS DELAY_MS REORDER` (e.g. `5 50 10`
for 5% loss, 50 ms delay, 10% of packets sent at once, ahead of delayed ones); it is re-read
every second, so faults can be switched on and off. Prints `stats ...` on SIGUSR1 and SIGTERM.
"""

import fcntl
import heapq
import os
import random
import select
import signal
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000


def open_tun(name):
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def read_control(path):
    try:
        loss, delay, reorder = open(path).read().split()
        return float(loss) / 100, float(delay) / 1000, float(reorder) / 100
    except (OSError, ValueError):
        return 0.0, 0.0, 0.0


def main():
    a, b = open_tun(sys.argv[1]), open_tun(sys.argv[2])
    control = sys.argv[3]
    peer = {a: b, b: a}
    stats = {"forwarded": 0, "dropped": 0, "reordered": 0}
    signal.signal(signal.SIGTERM, lambda *_: finish(stats))
    signal.signal(signal.SIGUSR1, lambda *_: show(stats))
    rng = random.Random(6)
    queue = []  # (due, seq, fd, packet)
    seq = 0
    faults, faults_read = read_control(control), time.monotonic()
    print("ready", flush=True)
    while True:
        now = time.monotonic()
        if now - faults_read > 1:
            faults, faults_read = read_control(control), now
        loss, delay, reorder = faults
        timeout = max(0.0, queue[0][0] - now) if queue else 1.0
        readable, _, _ = select.select([a, b], [], [], timeout)
        for fd in readable:
            try:
                packet = os.read(fd, 65536)
            except BlockingIOError:
                continue
            except OSError:
                continue  # the device is down (a cut link): the packet is lost
            if rng.random() < loss:
                stats["dropped"] += 1
                continue
            due = now + delay
            if delay and rng.random() < reorder:
                due = now
                stats["reordered"] += 1
            seq += 1
            heapq.heappush(queue, (due, seq, peer[fd], packet))
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, _, fd, packet = heapq.heappop(queue)
            try:
                os.write(fd, packet)
                stats["forwarded"] += 1
            except OSError:
                stats["dropped"] += 1  # the other side is down


def show(stats):
    print("stats " + " ".join(f"{k}={v}" for k, v in stats.items()), flush=True)


def finish(stats):
    show(stats)
    sys.exit(0)


if __name__ == "__main__":
    main()
