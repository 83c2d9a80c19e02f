# rawudp.py SRC SPORT DST DPORT GATEWAY_MAC [WAIT]
#
# Writes a UDP datagram (payload "raw-frame") from SRC:SPORT to DST:DPORT
# straight onto eth0 (or $IFACE), addressed to GATEWAY_MAC: what a process
# with CAP_NET_RAW can do whatever the routes and rules of its namespace.
# With WAIT, listens there that many seconds for the echo from DST and
# prints "escaped" or "contained".
import os, socket, struct, sys, time

src, sport, dst, dport, gwmac = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]
payload = b'raw-frame'
udp = struct.pack('!HHHH', sport, dport, 8 + len(payload), 0) + payload
ip = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0, socket.inet_aton(src), socket.inet_aton(dst))
words = struct.unpack('!10H', ip)
csum = sum(words)
csum = (csum >> 16) + (csum & 0xffff)
csum += csum >> 16
ip = ip[:10] + struct.pack('!H', ~csum & 0xffff) + ip[12:]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0800))
s.bind((os.environ.get('IFACE', 'eth0'), 0))
mine = s.getsockname()[4]
s.send(bytes.fromhex(gwmac.replace(':', '')) + mine + b'\x08\x00' + ip + udp)
if len(sys.argv) > 6:
    s.settimeout(0.2)
    end = time.time() + float(sys.argv[6])
    while time.time() < end:
        try:
            f = s.recv(2048)
        except socket.timeout:
            continue
        if f[26:30] == socket.inet_aton(dst) and payload in f:
            print('escaped')
            sys.exit()
    print('contained')
