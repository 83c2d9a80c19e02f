// Package netstack runs the sandbox side of the engine: a gVisor network
// stack on the sandbox's TUN device that accepts every TCP connection, UDP
// flow and ICMP echo the sandbox starts and hands them to the engine's
// handlers. It is the only package that imports gVisor.
package netstack

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync/atomic"
	"syscall"
	"time"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/icmp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/childflow/childflow/internal/netplan"
)

// MaxBuffer is the most a connection's receive or send buffer grows to.
const MaxBuffer = 8 << 20

// TCPRequest is a connection the sandbox is opening. The handler must call
// exactly one of Accept, Reject or Unreachable; until then the sandbox
// sees no SYN-ACK, so a refused upstream becomes a RST rather than
// connect-then-reset.
type TCPRequest struct {
	Src, Dst netip.AddrPort
	req      *tcp.ForwarderRequest
	stack    *Stack
}

// Accept completes the handshake with the sandbox. window, if not 0,
// fixes the connection's receive and send buffers at that size instead
// of letting them grow with its traffic (up to MaxBuffer).
func (r *TCPRequest) Accept(window int) (*TCPConn, error) {
	r.stack.syns.take(r.req.ID())
	var wq waiter.Queue
	ep, err := r.req.CreateEndpoint(&wq)
	if err != nil {
		r.req.Complete(true)
		return nil, fmt.Errorf("completing handshake with sandbox %s: %s", r.Src, err)
	}
	r.req.Complete(false)
	// Keepalives find sandboxes that vanished without a FIN.
	ep.SocketOptions().SetKeepAlive(true)
	if window != 0 {
		ep.SocketOptions().SetReceiveBufferSize(int64(window), true)
		ep.SocketOptions().SetSendBufferSize(int64(window), true)
	}
	return &TCPConn{TCPConn: gonet.NewTCPConn(&wq, ep), ep: ep, wq: &wq}, nil
}

// TCPConn is the sandbox's side of one TCP connection. A reset travels
// as one: Read and Write report the sandbox's RST as syscall.ECONNRESET,
// and Reset sends one, so that neither side takes the other's abort for
// the end of the data.
type TCPConn struct {
	*gonet.TCPConn
	ep tcpip.Endpoint
	wq *waiter.Queue
}

// gonet reports the stack's errors as text only.
var resetText = (&tcpip.ErrConnectionReset{}).String()

func (c *TCPConn) Read(b []byte) (int, error) {
	n, err := c.TCPConn.Read(b)
	if err == io.EOF && tcp.EndpointState(c.ep.State()) == tcp.StateError {
		// The reset was told to a Write, which took it.
		return n, &net.OpError{Op: "read", Net: "tcp", Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: syscall.ECONNRESET}
	}
	return n, errno(err)
}

func (c *TCPConn) Write(b []byte) (int, error) {
	n, err := c.TCPConn.Write(b)
	return n, errno(err)
}

func errno(err error) error {
	var op *net.OpError
	if errors.As(err, &op) && op.Err != nil && op.Err.Error() == resetText {
		op.Err = syscall.ECONNRESET
	}
	return err
}

// ResetDrainTimeout bounds how long Reset waits for the sandbox to take
// what was written before it.
const ResetDrainTimeout = 10 * time.Second

// Reset ends the connection with a RST and closes it, once the sandbox
// has acknowledged what was written (or after ResetDrainTimeout): a RST
// drops what is still queued, and a peer that sent its last bytes and
// then reset must not lose them on the way, where the sandbox would have
// read them from its own kernel.
func (c *TCPConn) Reset() error {
	// gVisor tells no one when its send queue empties, but it wakes the
	// writers when the queue falls below half the send buffer: a buffer
	// of two bytes makes that "empty", and writable "at most one byte
	// left" (setting it also turns the buffer's auto-tuning off).
	c.ep.SocketOptions().SetSendBufferSize(2, true)
	const events = waiter.WritableEvents | waiter.EventHUp | waiter.EventErr
	entry, drained := waiter.NewChannelEntry(events)
	c.wq.EventRegister(&entry)
	if c.ep.Readiness(events) == 0 {
		t := time.NewTimer(ResetDrainTimeout)
		select {
		case <-drained:
		case <-t.C:
		}
		t.Stop()
	}
	c.wq.EventUnregister(&entry)
	c.ep.Abort()
	return c.Close()
}

// Reject answers the SYN with a RST.
func (r *TCPRequest) Reject() {
	r.stack.syns.take(r.req.ID())
	r.req.Complete(true)
}

// Unreachable answers the SYN, instead of a RST, with the ICMP error a
// router that finds no way to Dst sends, from the gateway: the sandbox's
// connect fails with EHOSTUNREACH or ENETUNREACH, not ECONNREFUSED. (A
// SYN the stack saw no record of gets the RST.)
func (r *TCPRequest) Unreachable(why ICMPError) {
	syn, ok := r.stack.syns.take(r.req.ID())
	r.req.Complete(!ok)
	if !ok {
		return
	}
	r.stack.SendGatewayError(why, QuoteTCP(r.Src, r.Dst, syn.ttl, syn.seq, syn.hdrLen))
}

// UDPFlow is the sandbox's side of one UDP 5-tuple: reads return the
// sandbox's datagrams, writes reach the sandbox from Dst.
type UDPFlow struct {
	Src, Dst netip.AddrPort
	// Conn writes to the sandbox and closes the flow; Next reads.
	Conn net.Conn
	// TTL (hop limit) of the flow's first datagram: the engine forwards
	// with one less, or answers time-exceeded itself at 1 (traceroute).
	TTL uint8

	ep    tcpip.Endpoint
	ready chan struct{}
	// holding: the flow has datagrams of the sandbox's that its handler
	// has not passed on (counted in the stack's backlog); untracked: the
	// backlog no longer follows it (it ended, or Unawaited).
	holding, untracked atomic.Bool
	backlog            *atomic.Int64
}

// hold marks the flow as holding a datagram: gVisor's notice of one that
// arrived (or of the flow's end, which releases it).
func (f *UDPFlow) hold(m waiter.EventMask) {
	if m&waiter.EventHUp != 0 {
		f.Unawaited() // ended: nothing more to wait for
		return
	}
	if f.untracked.Load() {
		return
	}
	if !f.holding.Swap(true) {
		f.backlog.Add(1)
	}
	// Untracked in between: then nothing holds it.
	if f.untracked.Load() {
		f.release()
	}
}

func (f *UDPFlow) release() {
	if f.holding.Swap(false) {
		f.backlog.Add(-1)
	}
}

// Unawaited says the end of the sandbox need not wait for this flow's
// datagrams to be passed on (DNS queries, whose answers no one would
// read then).
func (f *UDPFlow) Unawaited() {
	f.untracked.Store(true)
	f.release()
}

// Handlers are the engine's decisions. TCP and UDP are called on their
// own goroutine per flow.
type Handlers struct {
	TCP func(*TCPRequest)
	UDP func(*UDPFlow)
	// Echo is called for ICMP echo requests to anything but the gateway;
	// reply (if non-nil) sends the echo reply into the sandbox.
	Echo func(req EchoRequest, reply func())
	// Tap, if set, is given every IP packet on the sandbox's link, as a
	// buffer sharing the packet's bytes that it must Release; outbound
	// means sent by the sandbox.
	Tap func(outbound bool, packet buffer.Buffer)
}

// Config describes one sandbox stack.
type Config struct {
	Plan     netplan.Plan
	Handlers Handlers
	// MaxHalfOpen bounds the connections in the handshake phase (dialing
	// upstream) so a SYN flood from the sandbox hurts only itself.
	MaxHalfOpen int
}

// Stack is a running sandbox stack.
type Stack struct {
	s    *stack.Stack
	cfg  Config
	link *sandboxLink // from Attach on
	syns synTable
	// udpBacklog counts the UDP flows holding datagrams of the sandbox's
	// that their handlers have not passed on yet.
	udpBacklog atomic.Int64
}

const nicID = 1

// New makes a stack for the sandbox; Attach gives it its link.
func New(cfg Config) (*Stack, error) {
	s := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, ipv6.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol, icmp.NewProtocol4, icmp.NewProtocol6},
		// Packets between the engine's own endpoints never leave it.
		HandleLocal: false,
	})
	ns := &Stack{s: s, cfg: cfg}
	if err := ns.configure(cfg); err != nil {
		s.Close()
		return nil, err
	}
	return ns, nil
}

// Attach starts the stack on the sandbox's TUN queue fd (in tests, a
// datagram socket), which stays the caller's to close.
func (ns *Stack) Attach(fd int) error {
	if ns.link != nil {
		return errors.New("netstack: attached twice")
	}
	l, err := newTUNLink(fd, uint32(ns.cfg.Plan.MTU))
	if err != nil {
		return fmt.Errorf("creating link endpoint on fd %d: %w", fd, err)
	}
	ns.link = &sandboxLink{tunLink: l, stack: ns, handler: ns.cfg.Handlers.Echo, tap: ns.cfg.Handlers.Tap}
	if err := ns.addNIC(); err != nil {
		l.Close()
		ns.link = nil
		return err
	}
	return nil
}

// Received counts the packets read from the sandbox so far.
func (ns *Stack) Received() uint64 {
	if ns.link == nil {
		return 0
	}
	return ns.link.received.Load()
}

// Settled reports whether everything the sandbox sent so far has been
// taken in: no packet waits on the link or is being delivered, and no
// UDP flow holds a datagram its handler has not passed on.
func (ns *Stack) Settled() bool {
	return ns.udpBacklog.Load() == 0 && (ns.link == nil || ns.link.drained())
}

func (ns *Stack) configure(cfg Config) error {
	s := ns.s
	// SACK recovers from losses on the TUN queue without a full window.
	sack := tcpip.TCPSACKEnabled(true)
	if err := s.SetTransportProtocolOption(tcp.ProtocolNumber, &sack); err != nil {
		return fmt.Errorf("enabling SACK: %s", err)
	}
	// Large buffers let one connection fill a 64 KiB-MTU link; receive
	// buffer moderation grows them only for connections that need it.
	rcv := tcpip.TCPReceiveBufferSizeRangeOption{Min: 4 << 10, Default: 1 << 20, Max: MaxBuffer}
	if err := s.SetTransportProtocolOption(tcp.ProtocolNumber, &rcv); err != nil {
		return fmt.Errorf("setting receive buffer range: %s", err)
	}
	snd := tcpip.TCPSendBufferSizeRangeOption{Min: 4 << 10, Default: 1 << 20, Max: MaxBuffer}
	if err := s.SetTransportProtocolOption(tcp.ProtocolNumber, &snd); err != nil {
		return fmt.Errorf("setting send buffer range: %s", err)
	}
	mod := tcpip.TCPModerateReceiveBufferOption(true)
	if err := s.SetTransportProtocolOption(tcp.ProtocolNumber, &mod); err != nil {
		return fmt.Errorf("enabling receive buffer moderation: %s", err)
	}
	// The relay writes whatever it read; Nagle would only add latency to
	// request/response traffic.
	noDelay := tcpip.TCPDelayEnabled(false)
	if err := s.SetTransportProtocolOption(tcp.ProtocolNumber, &noDelay); err != nil {
		return fmt.Errorf("disabling Nagle: %s", err)
	}

	// The engine closes first whenever the upstream does, so its side of
	// a connection sits in TIME_WAIT while the sandbox's kernel (which
	// closed second, without TIME_WAIT) is free to reuse the port at once.
	// gVisor hands a new SYN on a TIME_WAIT connection only to listening
	// endpoints, never to the forwarder: the SYN is dropped until TIME_WAIT
	// ends, and a sandbox opening connections fast stalls for seconds
	// (SYN retransmissions). A TUN neither delays nor duplicates segments,
	// so no TIME_WAIT: were our last ACK lost, the sandbox's retransmitted
	// FIN would get a RST, which closes what it was closing anyway.
	tw := tcpip.TCPTimeWaitTimeoutOption(0)
	if err := s.SetTransportProtocolOption(tcp.ProtocolNumber, &tw); err != nil {
		return fmt.Errorf("setting the TIME_WAIT timeout: %s", err)
	}

	maxHalfOpen := cfg.MaxHalfOpen
	if maxHalfOpen == 0 {
		maxHalfOpen = 512
	}
	if h := cfg.Handlers.TCP; h != nil {
		// rcvWnd 0: use the stack's default receive window.
		ns.syns.max = 2 * maxHalfOpen
		fwd := tcp.NewForwarder(s, 0, maxHalfOpen, func(r *tcp.ForwarderRequest) {
			id := r.ID()
			h(&TCPRequest{Src: addrPort(id.RemoteAddress, id.RemotePort), Dst: addrPort(id.LocalAddress, id.LocalPort), req: r, stack: ns})
		})
		s.SetTransportProtocolHandler(tcp.ProtocolNumber, func(id stack.TransportEndpointID, pkt *stack.PacketBuffer) bool {
			ns.syns.note(id, pkt, ns.link.lastTTL)
			return fwd.HandlePacket(id, pkt)
		})
	}
	if h := cfg.Handlers.UDP; h != nil {
		fwd := udp.NewForwarder(s, func(r *udp.ForwarderRequest) bool {
			id := r.ID()
			f := &UDPFlow{Src: addrPort(id.RemoteAddress, id.RemotePort), Dst: addrPort(id.LocalAddress, id.LocalPort),
				TTL: ns.link.lastTTL, backlog: &ns.udpBacklog}
			var wq waiter.Queue
			// Told of each datagram as it is queued, the first one
			// included, before the link counts it as received.
			holds := waiter.NewFunctionEntry(waiter.ReadableEvents|waiter.EventHUp, f.hold)
			wq.EventRegister(&holds)
			// The endpoint must exist before we return, or each further
			// datagram of this flow would start another handler.
			ep, err := r.CreateEndpoint(&wq)
			if err != nil {
				f.release()
				return false
			}
			f.Conn, f.ep, f.ready = gonet.NewUDPConn(&wq, ep), ep, readyEntry(&wq)
			go h(f)
			return true
		})
		s.SetTransportProtocolHandler(udp.ProtocolNumber, fwd.HandlePacket)
	}
	return nil
}

func (ns *Stack) addNIC() error {
	s := ns.s
	if err := s.CreateNIC(nicID, ns.link); err != nil {
		return fmt.Errorf("creating NIC: %s", err)
	}
	// Promiscuous: accept packets for every destination, since the engine
	// stands in for the whole internet. Spoofing: reply from those
	// destinations' addresses.
	if err := s.SetPromiscuousMode(nicID, true); err != nil {
		return fmt.Errorf("setting promiscuous mode: %s", err)
	}
	if err := s.SetSpoofing(nicID, true); err != nil {
		return fmt.Errorf("enabling spoofing: %s", err)
	}
	for _, gw := range []netip.Prefix{
		netip.PrefixFrom(ns.cfg.Plan.Gateway4, ns.cfg.Plan.Prefix4.Bits()),
		netip.PrefixFrom(ns.cfg.Plan.Gateway6, ns.cfg.Plan.Prefix6.Bits()),
	} {
		proto := ipv4.ProtocolNumber
		if gw.Addr().Is6() {
			proto = ipv6.ProtocolNumber
		}
		pa := tcpip.ProtocolAddress{
			Protocol:          proto,
			AddressWithPrefix: tcpip.AddrFromSlice(gw.Addr().AsSlice()).WithPrefix(),
		}
		pa.AddressWithPrefix.PrefixLen = gw.Bits()
		if err := s.AddProtocolAddress(nicID, pa, stack.AddressProperties{}); err != nil {
			return fmt.Errorf("adding gateway address %s: %s", gw, err)
		}
	}
	s.SetRouteTable([]tcpip.Route{
		{Destination: header.IPv4EmptySubnet, NIC: nicID},
		{Destination: header.IPv6EmptySubnet, NIC: nicID},
	})
	return nil
}

// ListenTCP and ListenUDP serve the engine's own services (DNS) on the
// gateway address.
func (ns *Stack) ListenTCP(addr netip.AddrPort) (net.Listener, error) {
	return gonet.ListenTCP(ns.s, fullAddr(addr), protoOf(addr.Addr()))
}

func (ns *Stack) ListenUDP(addr netip.AddrPort) (net.PacketConn, error) {
	fa := fullAddr(addr)
	return gonet.DialUDP(ns.s, &fa, nil, protoOf(addr.Addr()))
}

// Close tears the stack down and waits for its goroutines. The link
// stops reading first: gVisor's Wait waits for the link's reader while
// holding the stack's lock, which a packet being delivered then needs.
func (ns *Stack) Close() {
	if ns.link != nil {
		ns.link.Attach(nil)
		ns.link.Wait()
	}
	ns.s.Close()
	ns.s.Wait()
}

func addrPort(a tcpip.Address, port uint16) netip.AddrPort {
	ip, _ := netip.AddrFromSlice(a.AsSlice())
	return netip.AddrPortFrom(ip, port)
}

func fullAddr(ap netip.AddrPort) tcpip.FullAddress {
	return tcpip.FullAddress{NIC: nicID, Addr: tcpip.AddrFromSlice(ap.Addr().AsSlice()), Port: ap.Port()}
}

func protoOf(a netip.Addr) tcpip.NetworkProtocolNumber {
	if a.Is4() {
		return ipv4.ProtocolNumber
	}
	return ipv6.ProtocolNumber
}

// Stats are the stack's counters (for tests and diagnostics).
func (ns *Stack) Stats() tcpip.Stats { return ns.s.Stats() }
