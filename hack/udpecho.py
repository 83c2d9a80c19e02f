#!/usr/bin/env python3
"""UDP echo server for the testnet: udpecho.py PORT ADDR...

One socket per address, each answer sent from the address asked (a
connected client drops any other); "::" is both families' wildcard.
socat's UDP-RECVFROM with fork, used before, wedged for good under a
burst of datagrams (its parent waits for a child's signal that can be
lost) and answered no more for the rest of the run.
"""
import selectors
import socket
import sys

port, addrs = int(sys.argv[1]), sys.argv[2:]
sel = selectors.DefaultSelector()
for addr in addrs:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    if family == socket.AF_INET6:  # "::" takes IPv4 too
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, addr != "::")
    sock.bind((addr, port))
    sock.setblocking(False)
    sel.register(sock, selectors.EVENT_READ)
while True:
    for key, _ in sel.select():
        try:
            data, peer = key.fileobj.recvfrom(65535)
            key.fileobj.sendto(data, peer)
        except OSError:
            pass  # nothing to read after all, or the answer cannot go: UDP drops it
