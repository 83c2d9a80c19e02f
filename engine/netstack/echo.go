package netstack

import (
	"encoding/binary"
	"net/netip"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// EchoRequest is an ICMP or ICMPv6 echo request from the sandbox.
type EchoRequest struct {
	Src, Dst netip.Addr
	ID, Seq  uint16
	TTL      uint8
	Payload  []byte
}

// sandboxLink sits between the TUN and the stack. gVisor in promiscuous
// mode would answer an echo to any address itself, telling the sandbox
// that every host is up; echo requests to anything but the gateway are
// taken out here and given to the engine instead. It is also where the
// sandbox's packets are tapped for capture.
type sandboxLink struct {
	stack.LinkEndpoint
	stack   *Stack
	handler func(EchoRequest, func())
	tap     func(outbound bool, packet [][]byte)
}

func (e *sandboxLink) Attach(d stack.NetworkDispatcher) {
	if d == nil {
		e.LinkEndpoint.Attach(nil)
		return
	}
	e.LinkEndpoint.Attach(&echoDispatcher{NetworkDispatcher: d, ep: e})
}

type echoDispatcher struct {
	stack.NetworkDispatcher
	ep *sandboxLink
}

func (d *echoDispatcher) DeliverNetworkPacket(proto tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer) {
	if d.ep.tap != nil {
		d.ep.tap(true, pkt.AsSlices())
	}
	if d.ep.maybeEcho(pkt) {
		return
	}
	d.NetworkDispatcher.DeliverNetworkPacket(proto, pkt)
}

// maybeEcho reports whether pkt was an echo request it consumed. Only the
// first bytes are looked at, so TCP and UDP pay almost nothing.
func (e *sandboxLink) maybeEcho(pkt *stack.PacketBuffer) bool {
	hdr, ok := pkt.Data().PullUp(1)
	if !ok {
		return false
	}
	switch hdr[0] >> 4 {
	case 4:
		h, ok := pkt.Data().PullUp(header.IPv4MinimumSize)
		if !ok || h[9] != uint8(header.ICMPv4ProtocolNumber) {
			return false
		}
	case 6:
		h, ok := pkt.Data().PullUp(header.IPv6MinimumSize)
		if !ok || h[6] == uint8(header.TCPProtocolNumber) || h[6] == uint8(header.UDPProtocolNumber) {
			return false
		}
	default:
		return false
	}
	b := pkt.Data().AsRange().ToSlice()
	req, ok := parseEcho(b)
	if !ok {
		// ICMPv6 behind extension headers, or not an echo request:
		// neighbour discovery and errors go to the stack.
		return false
	}
	if e.stack.plan.IsGateway(req.Dst) {
		return false // the gateway answers its own pings
	}
	if e.handler != nil {
		e.handler(req, func() { e.writeEchoReply(req) })
	}
	return true
}

func parseEcho(b []byte) (EchoRequest, bool) {
	var r EchoRequest
	switch b[0] >> 4 {
	case 4:
		ihl := int(b[0]&0xf) * 4
		if len(b) < ihl+8 || ihl < 20 || binary.BigEndian.Uint16(b[6:8])&0x3fff != 0 {
			return r, false // fragments are not relayed
		}
		icmp := b[ihl:]
		if icmp[0] != 8 || icmp[1] != 0 {
			return r, false
		}
		r.Src = netip.AddrFrom4([4]byte(b[12:16]))
		r.Dst = netip.AddrFrom4([4]byte(b[16:20]))
		r.TTL = b[8]
		r.ID, r.Seq, r.Payload = binary.BigEndian.Uint16(icmp[4:]), binary.BigEndian.Uint16(icmp[6:]), append([]byte(nil), icmp[8:]...)
	case 6:
		if len(b) < 48 || b[6] != uint8(header.ICMPv6ProtocolNumber) {
			return r, false
		}
		icmp := b[40:]
		if icmp[0] != 128 || icmp[1] != 0 {
			return r, false
		}
		r.Src = netip.AddrFrom16([16]byte(b[8:24]))
		r.Dst = netip.AddrFrom16([16]byte(b[24:40]))
		r.TTL = b[7]
		r.ID, r.Seq, r.Payload = binary.BigEndian.Uint16(icmp[4:]), binary.BigEndian.Uint16(icmp[6:]), append([]byte(nil), icmp[8:]...)
	default:
		return r, false
	}
	return r, true
}

// WritePackets sends packets into the sandbox, tapping them first.
func (e *sandboxLink) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	if e.tap != nil {
		for _, pkt := range pkts.AsSlice() {
			e.tap(false, pkt.AsSlices())
		}
	}
	return e.LinkEndpoint.WritePackets(pkts)
}

func (e *sandboxLink) writeEchoReply(req EchoRequest) {
	b := EchoReplyPacket(req)
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(b)})
	defer pkt.DecRef()
	var l stack.PacketBufferList
	l.PushBack(pkt)
	e.WritePackets(l)
}

// EchoReplyPacket builds the IP packet answering req, from req.Dst.
func EchoReplyPacket(req EchoRequest) []byte {
	icmp := make([]byte, 8+len(req.Payload))
	binary.BigEndian.PutUint16(icmp[4:], req.ID)
	binary.BigEndian.PutUint16(icmp[6:], req.Seq)
	copy(icmp[8:], req.Payload)
	if req.Src.Is4() {
		icmp[0] = 0
		binary.BigEndian.PutUint16(icmp[2:], ^checksum(icmp, 0))
		ip := make([]byte, 20, 20+len(icmp))
		ip[0] = 0x45
		binary.BigEndian.PutUint16(ip[2:], uint16(20+len(icmp)))
		ip[8], ip[9] = 64, 1
		src, dst := req.Dst.As4(), req.Src.As4()
		copy(ip[12:], src[:])
		copy(ip[16:], dst[:])
		binary.BigEndian.PutUint16(ip[10:], ^checksum(ip, 0))
		return append(ip, icmp...)
	}
	icmp[0] = 129
	src, dst := req.Dst.As16(), req.Src.As16()
	pseudo := make([]byte, 0, 40)
	pseudo = append(pseudo, src[:]...)
	pseudo = append(pseudo, dst[:]...)
	pseudo = binary.BigEndian.AppendUint32(pseudo, uint32(len(icmp)))
	pseudo = append(pseudo, 0, 0, 0, 58)
	binary.BigEndian.PutUint16(icmp[2:], ^checksum(icmp, checksum(pseudo, 0)))
	ip := make([]byte, 40, 40+len(icmp))
	ip[0] = 0x60
	binary.BigEndian.PutUint16(ip[4:], uint16(len(icmp)))
	ip[6], ip[7] = 58, 64
	copy(ip[8:], src[:])
	copy(ip[24:], dst[:])
	return append(ip, icmp...)
}

// checksum is the ones' complement sum of RFC 1071, not yet inverted.
func checksum(b []byte, initial uint16) uint16 {
	sum := uint32(initial)
	for len(b) >= 2 {
		sum += uint32(b[0])<<8 | uint32(b[1])
		b = b[2:]
	}
	if len(b) == 1 {
		sum += uint32(b[0]) << 8
	}
	for sum > 0xffff {
		sum = sum>>16 + sum&0xffff
	}
	return uint16(sum)
}
