package netstack

import (
	"encoding/binary"
	"net/netip"

	"gvisor.dev/gvisor/pkg/tcpip/checksum"
)

// ICMPError is what went wrong with a datagram, in words both families
// share; the engine learns it from the host socket's error queue.
type ICMPError int

const (
	TimeExceeded ICMPError = iota + 1
	NetUnreachable
	HostUnreachable
	PortUnreachable
	AdminProhibited
)

func (e ICMPError) String() string {
	return [...]string{0: "ICMP error", TimeExceeded: "time exceeded", NetUnreachable: "network unreachable",
		HostUnreachable: "host unreachable", PortUnreachable: "port unreachable", AdminProhibited: "administratively prohibited"}[e]
}

// ICMPErrorOf reads an ICMP (v6: ICMPv6) type and code as received on
// the host. ok is false for what is not passed on (packet too big,
// parameter problems: the engine's stack, not the sandbox, sized and
// framed the host's packet).
func ICMPErrorOf(v6 bool, typ, code uint8) (e ICMPError, ok bool) {
	if !v6 {
		switch {
		case typ == 11:
			return TimeExceeded, true
		case typ == 3 && code == 3:
			return PortUnreachable, true
		case typ == 3 && (code == 0 || code == 6):
			return NetUnreachable, true
		case typ == 3 && (code == 9 || code == 10 || code == 13):
			return AdminProhibited, true
		case typ == 3 && code != 4:
			return HostUnreachable, true
		}
		return 0, false
	}
	switch {
	case typ == 3:
		return TimeExceeded, true
	case typ == 1 && code == 4:
		return PortUnreachable, true
	case typ == 1 && code == 0:
		return NetUnreachable, true
	case typ == 1 && (code == 1 || code == 5 || code == 6):
		return AdminProhibited, true
	case typ == 1:
		return HostUnreachable, true
	}
	return 0, false
}

// typeCode is e's ICMP (v6: ICMPv6) type and code.
func (e ICMPError) typeCode(v6 bool) (uint8, uint8) {
	tc := [...][2]uint8{TimeExceeded: {11, 0}, NetUnreachable: {3, 0}, HostUnreachable: {3, 1}, PortUnreachable: {3, 3}, AdminProhibited: {3, 13}}[e]
	if v6 {
		tc = [...][2]uint8{TimeExceeded: {3, 0}, NetUnreachable: {1, 0}, HostUnreachable: {1, 3}, PortUnreachable: {1, 4}, AdminProhibited: {1, 1}}[e]
	}
	return tc[0], tc[1]
}

// SendICMPError tells the sandbox, from the address from, that the packet
// quoted (as the sandbox sent it, see QuoteUDP and QuoteEcho) met err.
// The sandbox's kernel hands it to the socket that sent it: a UDP client
// sees ECONNREFUSED or EHOSTUNREACH, traceroute sees the hop.
func (ns *Stack) SendICMPError(from netip.Addr, err ICMPError, quoted []byte) {
	to := netip.AddrFrom4([4]byte(quoted[12:16]))
	v6 := quoted[0]>>4 == 6
	if v6 {
		to = netip.AddrFrom16([16]byte(quoted[8:24]))
	}
	if from.Is4() == v6 {
		return // no way to say it across families
	}
	typ, code := err.typeCode(v6)
	ns.link.writeRaw(ipPacket(from, to, icmpMessage(from, to, typ, code, quoted)))
}

// SendGatewayError is SendICMPError from the gateway: the first hop
// answering for itself (time exceeded, refused, no way on).
func (ns *Stack) SendGatewayError(err ICMPError, quoted []byte) {
	from := ns.cfg.Plan.Gateway4
	if quoted[0]>>4 == 6 {
		from = ns.cfg.Plan.Gateway6
	}
	ns.SendICMPError(from, err, quoted)
}

// icmpMessage is an ICMP error message quoting quoted.
func icmpMessage(from, to netip.Addr, typ, code uint8, quoted []byte) []byte {
	m := make([]byte, 8, 8+len(quoted))
	m[0], m[1] = typ, code
	return withICMPChecksum(from, to, append(m, quoted...))
}

// withICMPChecksum fills in the checksum of ICMP message m sent from from
// to to (for ICMPv6 it covers a pseudo-header).
func withICMPChecksum(from, to netip.Addr, m []byte) []byte {
	var initial uint16
	if from.Is6() {
		s, d := from.As16(), to.As16()
		p := make([]byte, 0, 40)
		p = append(p, s[:]...)
		p = append(p, d[:]...)
		p = binary.BigEndian.AppendUint32(p, uint32(len(m)))
		initial = checksum.Checksum(append(p, 0, 0, 0, 58), 0)
	}
	binary.BigEndian.PutUint16(m[2:], ^checksum.Checksum(m, initial))
	return m
}

// QuoteUDP rebuilds the first bytes of a datagram the sandbox sent (IP
// header, UDP header), which is what an ICMP error quotes and what the
// sandbox's kernel matches it to a socket by.
func QuoteUDP(src, dst netip.AddrPort, ttl uint8, payloadLen int) []byte {
	udp := make([]byte, 8)
	binary.BigEndian.PutUint16(udp[0:], src.Port())
	binary.BigEndian.PutUint16(udp[2:], dst.Port())
	binary.BigEndian.PutUint16(udp[4:], uint16(8+payloadLen))
	return withIPHeader(src.Addr(), dst.Addr(), 17, ttl, 8+payloadLen, udp)
}

// QuoteTCP rebuilds the first bytes of a SYN the sandbox sent: its IP
// header, ports and sequence number.
func QuoteTCP(src, dst netip.AddrPort, ttl uint8, seq uint32, hdrLen int) []byte {
	tcp := make([]byte, 8)
	binary.BigEndian.PutUint16(tcp[0:], src.Port())
	binary.BigEndian.PutUint16(tcp[2:], dst.Port())
	binary.BigEndian.PutUint32(tcp[4:], seq)
	return withIPHeader(src.Addr(), dst.Addr(), 6, ttl, hdrLen, tcp)
}

// QuoteEcho rebuilds the first bytes of an echo request the sandbox sent.
func QuoteEcho(req EchoRequest) []byte {
	hdr := echoMessage(EchoRequest{Src: req.Src, ID: req.ID, Seq: req.Seq}, 8, 128)
	return withIPHeader(req.Src, req.Dst, icmpProto(req.Src), req.TTL, 8+len(req.Payload), hdr)
}

// echoMessage is req's echo message with the given ICMP (v6: ICMPv6)
// type, its checksum not filled in.
func echoMessage(req EchoRequest, typ4, typ6 uint8) []byte {
	m := make([]byte, 8+len(req.Payload))
	m[0] = typ4
	if req.Src.Is6() {
		m[0] = typ6
	}
	binary.BigEndian.PutUint16(m[4:], req.ID)
	binary.BigEndian.PutUint16(m[6:], req.Seq)
	copy(m[8:], req.Payload)
	return m
}

// withIPHeader puts an IP header before l4, the first bytes of a
// transport payload l4Len long (all of it, or as much as a quote holds).
func withIPHeader(src, dst netip.Addr, proto, ttl uint8, l4Len int, l4 []byte) []byte {
	if src.Is4() {
		ip := make([]byte, 20, 20+len(l4))
		ip[0] = 0x45
		binary.BigEndian.PutUint16(ip[2:], uint16(20+l4Len))
		ip[8], ip[9] = ttl, proto
		s, d := src.As4(), dst.As4()
		copy(ip[12:], s[:])
		copy(ip[16:], d[:])
		binary.BigEndian.PutUint16(ip[10:], ^checksum.Checksum(ip, 0))
		return append(ip, l4...)
	}
	ip := make([]byte, 40, 40+len(l4))
	ip[0] = 0x60
	binary.BigEndian.PutUint16(ip[4:], uint16(l4Len))
	ip[6], ip[7] = proto, ttl
	s, d := src.As16(), dst.As16()
	copy(ip[8:], s[:])
	copy(ip[24:], d[:])
	return append(ip, l4...)
}

// ipPacket wraps an ICMP (v6: ICMPv6) message in an IP header.
func ipPacket(from, to netip.Addr, msg []byte) []byte {
	return withIPHeader(from, to, icmpProto(from), 64, len(msg), msg)
}

func icmpProto(a netip.Addr) uint8 {
	if a.Is4() {
		return 1
	}
	return 58
}
