package capture

import (
	"encoding/binary"
	"net/netip"
	"testing"
)

// ipv4 builds an IPv4 packet from src to dst carrying l4.
func ipv4(proto uint8, src, dst string, l4 []byte) []byte {
	p := make([]byte, 20, 20+len(l4))
	p[0], p[9] = 0x45, proto
	binary.BigEndian.PutUint16(p[2:], uint16(20+len(l4)))
	s, d := netip.MustParseAddr(src).As4(), netip.MustParseAddr(dst).As4()
	copy(p[12:], s[:])
	copy(p[16:], d[:])
	return append(p, l4...)
}

func ipv6(proto uint8, src, dst string, l4 []byte) []byte {
	p := make([]byte, 40, 40+len(l4))
	p[0], p[6] = 0x60, proto
	binary.BigEndian.PutUint16(p[4:], uint16(len(l4)))
	s, d := netip.MustParseAddr(src).As16(), netip.MustParseAddr(dst).As16()
	copy(p[8:], s[:])
	copy(p[24:], d[:])
	return append(p, l4...)
}

// ports is the first 8 bytes of a TCP or UDP header.
func ports(sp, dp uint16) []byte {
	b := make([]byte, 8)
	binary.BigEndian.PutUint16(b, sp)
	binary.BigEndian.PutUint16(b[2:], dp)
	return b
}

func icmpMsg(typ, code uint8, id uint16, rest []byte) []byte {
	b := []byte{typ, code, 0, 0, 0, 0, 0, 0}
	binary.BigEndian.PutUint16(b[4:], id)
	return append(b, rest...)
}

func TestEnds(t *testing.T) {
	const host, far, router = "192.0.2.1", "203.0.113.10", "203.0.113.9"
	udpOut := ipv4(17, host, far, ports(40000, 7))
	echoOut := ipv4(1, host, far, icmpMsg(8, 0, 77, []byte("ping")))
	for _, tc := range []struct {
		name     string
		p        []byte
		ok       bool
		proto    uint8
		src, dst string
	}{
		{"tcp", ipv4(6, host, far, ports(40000, 80)), true, 6, host + ":40000", far + ":80"},
		{"udp6", ipv6(17, "2001:db8::1", "2001:db8::10", ports(5353, 53)), true, 17, "[2001:db8::1]:5353", "[2001:db8::10]:53"},
		{"echo request: the id is the sender's port", echoOut, true, 1, host + ":77", far + ":0"},
		{"echo reply", ipv4(1, far, host, icmpMsg(0, 0, 77, nil)), true, 1, far + ":0", host + ":77"},
		{"echo6 request", ipv6(58, "2001:db8::1", "2001:db8::10", icmpMsg(128, 0, 9, nil)), true, 58, "[2001:db8::1]:9", "[2001:db8::10]:0"},
		{"echo6 reply", ipv6(58, "2001:db8::10", "2001:db8::1", icmpMsg(129, 0, 9, nil)), true, 58, "[2001:db8::10]:0", "[2001:db8::1]:9"},
		{"port unreachable: the quoted datagram coming back", ipv4(1, far, host, icmpMsg(3, 3, 0, udpOut)), true, 17, far + ":7", host + ":40000"},
		{"time exceeded from a router, quoting an echo", ipv4(1, router, host, icmpMsg(11, 0, 0, echoOut)), true, 1, far + ":0", host + ":77"},
		{"an error quoting an error", ipv4(1, router, host, icmpMsg(3, 1, 0, ipv4(1, host, far, icmpMsg(3, 3, 0, udpOut)))), false, 0, "", ""},
		{"router advertisement", ipv6(58, "fe80::1", "ff02::1", icmpMsg(134, 0, 0, nil)), false, 0, "", ""},
		{"truncated quote", ipv4(1, far, host, icmpMsg(3, 3, 0, udpOut[:24])), false, 0, "", ""},
		{"not a first fragment", func() []byte { p := ipv4(17, host, far, ports(1, 2)); p[7] = 1; return p }(), false, 0, "", ""},
	} {
		proto, src, dst, ok := ends(tc.p)
		if ok != tc.ok {
			t.Errorf("%s: ok %v, want %v", tc.name, ok, tc.ok)
			continue
		}
		if ok && (proto != tc.proto || src.String() != tc.src || dst.String() != tc.dst) {
			t.Errorf("%s: %d %s -> %s, want %d %s -> %s", tc.name, proto, src, dst, tc.proto, tc.src, tc.dst)
		}
	}
}
