package netstack

import (
	"net/netip"
	"testing"

	"gvisor.dev/gvisor/pkg/tcpip/checksum"
	"gvisor.dev/gvisor/pkg/tcpip/header"
)

// The ICMP errors the engine writes must be what the sandbox's kernel
// accepts: valid IP and ICMP checksums, the right type and code, and the
// datagram quoted as the sandbox sent it.
func TestICMPErrorPackets(t *testing.T) {
	for _, c := range []struct {
		from, src, dst string
		err            ICMPError
		typ, code      uint8
	}{
		{"203.0.113.1", "10.87.0.2:40000", "203.0.113.10:33434", TimeExceeded, 11, 0},
		{"203.0.113.10", "10.87.0.2:40000", "203.0.113.10:9", PortUnreachable, 3, 3},
		{"2001:db8::1", "[fd00:cf::2]:40000", "[2001:db8::10]:33434", TimeExceeded, 3, 0},
		{"fd00:cf::1", "[fd00:cf::2]:40000", "[2001:db8::10]:53", AdminProhibited, 1, 1},
	} {
		from := netip.MustParseAddr(c.from)
		src, dst := netip.MustParseAddrPort(c.src), netip.MustParseAddrPort(c.dst)
		quoted := QuoteUDP(src, dst, 2, 100)
		typ, code := c.err.typeCode(from.Is6())
		p := ipPacket(from, src.Addr(), icmpMessage(from, src.Addr(), typ, code, quoted))
		var msg []byte
		if from.Is4() {
			ip := header.IPv4(p)
			if !ip.IsChecksumValid() || ip.Protocol() != 1 || ip.SourceAddress().String() != c.from || ip.DestinationAddress().String() != src.Addr().String() {
				t.Fatalf("%v: bad IPv4 header % x", c, p[:20])
			}
			msg = p[20:]
			if checksum.Checksum(msg, 0) != 0xffff {
				t.Errorf("%v: bad ICMP checksum", c)
			}
		} else {
			ip := header.IPv6(p)
			if ip.NextHeader() != 58 || int(ip.PayloadLength()) != len(p)-40 {
				t.Fatalf("%v: bad IPv6 header % x", c, p[:40])
			}
			msg = p[40:]
			icmp := header.ICMPv6(msg)
			want := header.ICMPv6Checksum(header.ICMPv6ChecksumParams{Header: icmp[:header.ICMPv6MinimumSize], Src: ip.SourceAddress(), Dst: ip.DestinationAddress(), PayloadCsum: checksum.Checksum(icmp[header.ICMPv6MinimumSize:], 0), PayloadLen: len(icmp) - header.ICMPv6MinimumSize})
			if icmp.Checksum() != want {
				t.Errorf("%v: ICMPv6 checksum %#x, want %#x", c, icmp.Checksum(), want)
			}
		}
		if msg[0] != c.typ || msg[1] != c.code {
			t.Errorf("%v: type/code %d/%d, want %d/%d", c, msg[0], msg[1], c.typ, c.code)
		}
		q := msg[8:]
		if string(q) != string(quoted) {
			t.Errorf("%v: quote differs", c)
		}
		// The sandbox's kernel finds the socket by the quoted addresses and ports.
		off := 20
		if from.Is6() {
			off = 40
		}
		if got := uint16(q[off])<<8 | uint16(q[off+1]); got != src.Port() {
			t.Errorf("%v: quoted source port %d", c, got)
		}
		if got := uint16(q[off+2])<<8 | uint16(q[off+3]); got != dst.Port() {
			t.Errorf("%v: quoted destination port %d", c, got)
		}
	}
}

func TestICMPErrorOf(t *testing.T) {
	for _, c := range []struct {
		v6        bool
		typ, code uint8
		want      ICMPError
		ok        bool
	}{
		{false, 11, 0, TimeExceeded, true}, {false, 3, 3, PortUnreachable, true}, {false, 3, 1, HostUnreachable, true},
		{false, 3, 13, AdminProhibited, true}, {false, 3, 4, 0, false}, {false, 12, 0, 0, false},
		{true, 3, 0, TimeExceeded, true}, {true, 1, 4, PortUnreachable, true}, {true, 1, 3, HostUnreachable, true},
		{true, 1, 1, AdminProhibited, true}, {true, 2, 0, 0, false},
	} {
		if got, ok := ICMPErrorOf(c.v6, c.typ, c.code); got != c.want || ok != c.ok {
			t.Errorf("ICMPErrorOf(%v, %d, %d) = %v, %v; want %v, %v", c.v6, c.typ, c.code, got, ok, c.want, c.ok)
		}
	}
}
