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
	// lastTTL is the TTL (hop limit) of the packet being delivered. One
	// goroutine delivers packets, and the UDP forwarder creates a flow
	// while delivering its first datagram: the flow reads it from here.
	lastTTL uint8
}

// GSOMaxSize and SupportedGSO pass on the TUN's segmentation offload,
// which the stack looks for on the link it was given.
func (e *sandboxLink) GSOMaxSize() uint32 {
	if g, ok := e.LinkEndpoint.(stack.GSOEndpoint); ok {
		return g.GSOMaxSize()
	}
	return 0
}

func (e *sandboxLink) SupportedGSO() stack.SupportedGSO {
	if g, ok := e.LinkEndpoint.(stack.GSOEndpoint); ok {
		return g.SupportedGSO()
	}
	return stack.GSONotSupported
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
	if h, ok := pkt.Data().PullUp(9); ok {
		d.ep.lastTTL = h[8] // IPv4 TTL
		if h[0]>>4 == 6 {
			d.ep.lastTTL = h[7] // IPv6 hop limit
		}
	}
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
		e.handler(req, func() { e.writeRaw(EchoReplyPacket(req)) })
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
	m := EchoRequestMessage(req)
	m[0] = 0
	if req.Src.Is6() {
		m[0] = 129
	}
	return ipPacket(req.Dst, req.Src, withICMPChecksum(req.Dst, req.Src, m))
}
