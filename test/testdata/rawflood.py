# rawflood.py IFACE SRC DST DPORT GATEWAY_MAC SECONDS
#
# Waits for IFACE to appear, then writes UDP frames from SRC to DST:DPORT
# onto it, addressed to GATEWAY_MAC, as fast as it can for SECONDS after
# the first one it could send: an attacker inside a sandbox racing the
# guard of an interface added to it. Prints how many it sent.
import socket, struct, sys, time

iface, src, dst, dport, gwmac, secs = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], float(sys.argv[6])
payload = b'raw-flood'
udp = struct.pack('!HHHH', 40008, dport, 8 + len(payload), 0) + payload
ip = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, socket.inet_aton(src), socket.inet_aton(dst))
words = struct.unpack('!10H', ip)
csum = sum(words)
csum = (csum >> 16) + (csum & 0xffff)
csum += csum >> 16
ip = ip[:10] + struct.pack('!H', ~csum & 0xffff) + ip[12:]
deadline = time.time() + 60
while True:
    try:
        socket.if_nametoindex(iface)
        break
    except OSError:
        if time.time() > deadline:
            sys.exit('no ' + iface)
        time.sleep(0.0002)
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
s.bind((iface, 0))
frame = bytes.fromhex(gwmac.replace(':', '')) + s.getsockname()[4] + b'\x08\x00' + ip + udp
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
