"""Accepts TCP connections on ADDR:PORT and holds each open until its
peer closes it. Prints "listening" once it listens."""
import selectors
import socket
import sys

sel = selectors.DefaultSelector()
ln = socket.create_server((sys.argv[1], int(sys.argv[2])), backlog=4096)
ln.setblocking(False)
sel.register(ln, selectors.EVENT_READ)
print("listening", flush=True)
while True:
    for key, _ in sel.select():
        if key.fileobj is ln:
            try:
                c, _ = ln.accept()
            except BlockingIOError:
                continue
            c.setblocking(False)
            sel.register(c, selectors.EVENT_READ)
            continue
        try:
            data = key.fileobj.recv(4096)
        except OSError:
            data = b""
        if not data:
            sel.unregister(key.fileobj)
            key.fileobj.close()
