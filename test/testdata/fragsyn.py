# fragsyn.py SRC DST DPORT
#
# Sends a TCP SYN from SRC to DST:DPORT in two IPv4 fragments, the first
# of only 8 bytes (the ports and the sequence number): its flags come in
# the second, where no filter that looks at one packet at a time finds
# them. IPv4 puts no floor under a first fragment's size (IPv6 wants the
# whole TCP header in it), so the receiver reassembles a SYN.
import random, socket, struct, sys

src, dst, dport = sys.argv[1], sys.argv[2], int(sys.argv[3])


def checksum(b):
    c = sum(struct.unpack('!%dH' % (len(b) // 2), b))
    while c >> 16:
        c = (c & 0xffff) + (c >> 16)
    return ~c & 0xffff


tcp = struct.pack('!HHIIBBHHH', random.randrange(40000, 60000), dport, 1, 0, 5 << 4, 0x02, 65535, 0, 0)
pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack('!BBH', 0, socket.IPPROTO_TCP, len(tcp))
tcp = tcp[:16] + struct.pack('!H', checksum(pseudo + tcp)) + tcp[18:]
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
ident = random.randrange(1, 65536)
for offset, part, more in ((0, tcp[:8], 0x2000), (1, tcp[8:], 0)):
    ip = struct.pack('!BBHHHBBH4s4s', 0x45, 0, 20 + len(part), ident, more | offset, 64, socket.IPPROTO_TCP, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    s.sendto(ip + part, (dst, 0))
