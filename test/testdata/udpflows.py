"""udpflows.py ADDR PORT MAX: opens UDP flows to ADDR:PORT, an echo
server, one socket each, held open, one after the other until one is
not echoed within a second (or MAX are); then tries three more. Prints
how many were echoed, then how many of the three."""
import select
import socket
import sys


def echoed(flows):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    flows.append(s)
    s.connect((sys.argv[1], int(sys.argv[2])))
    try:
        s.send(b"x")
        p = select.poll()  # select() stops at descriptor 1024
        p.register(s, select.POLLIN)
        return bool(p.poll(1000)) and s.recv(16) == b"x"
    except OSError:  # the refusal's ICMP error
        return False


flows = []
held = 0
while held < int(sys.argv[3]) and echoed(flows):
    held += 1
print(held, sum(echoed(flows) for _ in range(3)))
