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
	*tunLink
	stack   *Stack
	handler func(EchoRequest, func())
	tap     func(outbound bool, packet buffer.Buffer)
	// lastTTL is the TTL (hop limit) of the packet being delivered. One
	// goroutine delivers packets, and the UDP forwarder creates a flow
	// while delivering its first datagram: the flow reads it from here.
	lastTTL uint8
}

func (e *sandboxLink) Attach(d stack.NetworkDispatcher) {
	if d == nil {
		e.tunLink.Attach(nil)
		return
	}
	e.tunLink.Attach(&echoDispatcher{NetworkDispatcher: d, ep: e})
}

type echoDispatcher struct {
	stack.NetworkDispatcher
	ep *sandboxLink
}

// DeliverNetworkPacket looks once at the IP header of each packet from
// the sandbox: for its TTL, which a UDP flow this packet starts takes
// (see lastTTL), and for echo requests, which go to the engine.
func (d *echoDispatcher) DeliverNetworkPacket(proto tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer) {
	if d.ep.tap != nil {
		d.ep.tap(true, pkt.ToBuffer())
	}
	if d.ep.maybeEcho(proto, pkt) {
		return
	}
	d.NetworkDispatcher.DeliverNetworkPacket(proto, pkt)
}

// maybeEcho notes pkt's TTL and reports whether pkt was an echo request
// it consumed. Only the first bytes are looked at, so TCP and UDP pay
// almost nothing.
func (e *sandboxLink) maybeEcho(proto tcpip.NetworkProtocolNumber, pkt *stack.PacketBuffer) bool {
	var next, icmp uint8
	if proto == header.IPv4ProtocolNumber {
		h, ok := pkt.Data().PullUp(header.IPv4MinimumSize)
		if !ok {
			return false
		}
		e.lastTTL, next, icmp = h[8], h[9], uint8(header.ICMPv4ProtocolNumber)
	} else {
		h, ok := pkt.Data().PullUp(header.IPv6MinimumSize)
		if !ok {
			return false
		}
		e.lastTTL, next, icmp = h[7], h[6], uint8(header.ICMPv6ProtocolNumber)
	}
	if next != icmp {
		return false // not ICMP, or ICMPv6 behind extension headers
	}
	b := pkt.Data().AsRange().ToSlice()
	req, ok := ParseEcho(b)
	if !ok {
		// Not an echo request: neighbour discovery and errors go to
		// the stack.
		return false
	}
	if e.stack.cfg.Plan.IsGateway(req.Dst) {
		return false // the gateway answers its own pings
	}
	if e.handler != nil {
		e.handler(req, func() { e.writeRaw(EchoReplyPacket(req)) })
	}
	return true
}

// ParseEcho reads an echo request from the IP packet b (whole, or as an
// ICMP error quotes it: its ID and sequence number at least).
func ParseEcho(b []byte) (EchoRequest, bool) {
	var r EchoRequest
	if len(b) == 0 {
		return r, false
	}
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
			e.tap(false, pkt.ToBuffer())
		}
	}
	return e.tunLink.WritePackets(pkts)
}

// writeRaw sends one IP packet the engine made into the sandbox.
func (e *sandboxLink) writeRaw(b []byte) {
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(b)})
	defer pkt.DecRef()
	var l stack.PacketBufferList
	l.PushBack(pkt)
	e.WritePackets(l)
}

// EchoReplyPacket builds the IP packet answering req, from req.Dst.
func EchoReplyPacket(req EchoRequest) []byte {
	m := echoMessage(req, 0, 129)
	return ipPacket(req.Dst, req.Src, withICMPChecksum(req.Dst, req.Src, m))
}
