# ndprobe.py send DST | listen SECONDS
#
# send: writes an ICMPv6 neighbour solicitation to DST, "nd-probe" in its
# payload, from a raw socket: what CAP_NET_RAW allows. Neighbour discovery
# belongs on the link; routed further, it is a message to anywhere.
# listen: prints "got" if such a solicitation arrives within SECONDS.
import socket, sys

s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
if sys.argv[1] == 'send':
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 255)
    target = socket.inet_pton(socket.AF_INET6, sys.argv[2])
    s.sendto(bytes([135, 0, 0, 0, 0, 0, 0, 0]) + target + b'nd-probe', (sys.argv[2], 0))
else:
    s.settimeout(float(sys.argv[2]))
    try:
        while True:
            m = s.recv(2048)
            if m[0] == 135 and b'nd-probe' in m:
                print('got')
                break
    except socket.timeout:
        pass
