# rawflood.py IFACE SRC DST DPORT GATEWAY SECONDS
#
# Waits for IFACE to appear, then writes UDP frames from SRC to DST:DPORT
# onto it, addressed to GATEWAY (a MAC address, or arp:IP to learn it by
# ARP for IP, which the host answers for any of its addresses), as fast
# as it can for SECONDS after the first one it could send: an attacker
# inside a sandbox racing the guard of an interface added to it. Prints
# "ready" once it watches for IFACE, and at the end how many it sent.
import socket, struct, sys, time

iface, src, dst, dport, gateway, secs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], float(sys.argv[6])
payload = b'raw-flood'
udp = struct.pack('!HHHH', 40008, dport, 8 + len(payload), 0) + payload
ip = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, socket.inet_aton(src), socket.inet_aton(dst))
words = struct.unpack('!10H', ip)
csum = sum(words)
csum = (csum >> 16) + (csum & 0xffff)
csum += csum >> 16
ip = ip[:10] + struct.pack('!H', ~csum & 0xffff) + ip[12:]
deadline = time.time() + 60
print('ready', flush=True)
while True:
    try:
        socket.if_nametoindex(iface)
        break
    except OSError:
        if time.time() > deadline:
            sys.exit('no ' + iface)
        time.sleep(0.0002)
# Both sockets bound before the interface is up: binding one takes a
# while, which an attacker spends before the race, not in it.
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
s.bind((iface, 0))
mine = s.getsockname()[4]
if gateway.startswith('arp:'):
    target = socket.inet_aton(gateway[4:])
    arp = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
    arp.bind((iface, 0))
    arp.setblocking(False)
    request = b'\xff' * 6 + mine + b'\x08\x06' + struct.pack('!HHBBH', 1, 0x0800, 6, 4, 1) + mine + socket.inet_aton(src) + b'\x00' * 6 + target
    gwmac = None
    while gwmac is None and time.time() < deadline:
        try:
            arp.send(request)
        except OSError:
            pass  # down yet
        until = time.time() + 0.0005
        while gwmac is None and time.time() < until:
            try:
                f = arp.recv(100)
            except OSError:
                continue
            if len(f) >= 42 and f[12:14] == b'\x08\x06' and f[20:22] == b'\x00\x02' and f[28:32] == target:
                gwmac = f[22:28]
    if gwmac is None:
        sys.exit('no ARP answer for ' + gateway[4:])
else:
    gwmac = bytes.fromhex(gateway.replace(':', ''))
frame = gwmac + mine + b'\x08\x00' + ip + udp
sent, end = 0, None
while end is None or time.time() < end:
    if time.time() > deadline:
        break
    try:
        s.send(frame)
    except OSError:
        continue  # down yet
    sent += 1
    if end is None:
        end = time.time() + secs
print('sent=%d' % sent)
