"""An FTP server's control connection, as much of it as conntrack's ftp
helper reads: on ADDR:21 it answers a first PASV with ADDR and a port
that the sandbox's policy refuses (853, DNS over TLS), a second with one
it allows (2121), and listens on both. Prints "listening" once all do."""
import socket
import sys
import threading

addr = sys.argv[1]
ports = [853, 2121]


def serve(ln, what):
    while True:
        c, _ = ln.accept()
        c.sendall(b"reached the %s port\n" % what)
        c.close()


def serve_control(c):
    with c:
        c.sendall(b"220 ready\r\n")
        n = 0
        for line in c.makefile("rb"):
            if line.startswith(b"PASV"):
                port = ports[n % len(ports)]
                n += 1
                p = ",".join(addr.split(".") + [str(port >> 8), str(port & 255)])
                c.sendall(b"227 Entering Passive Mode (%s).\r\n" % p.encode())
            elif line.startswith(b"QUIT"):
                c.sendall(b"221 bye\r\n")
                return


for port, what in zip(ports, [b"denied", b"allowed"]):
    threading.Thread(target=serve, args=(socket.create_server((addr, port)), what), daemon=True).start()
control = socket.create_server((addr, 21))
print("listening", flush=True)
while True:
    c, _ = control.accept()
    threading.Thread(target=serve_control, args=(c,), daemon=True).start()
