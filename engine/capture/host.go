package capture

import (
	"encoding/binary"
	"fmt"
	"maps"
	"net"
	"net/netip"
	"os"
	"slices"
	"sync"
	"time"

	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"

	"github.com/childflow/childflow/policy"
)

// HostTap captures, on the host's own interfaces, the packets of one
// sandbox's host-side sockets: the egress and wire-egress views. It
// follows the sockets the engine reports (Upstream) by protocol, local
// port and remote end, known before each socket's first packet, so it
// records handshakes and nothing else the host sends: another process
// talking to the same remote end has another local port. It needs
// CAP_NET_RAW.
type HostTap struct {
	sock   *os.File // a packet socket, read through Go's poller
	w      *Writer
	lo     loopback // the loopback interfaces; none: the wire-egress view
	link   bool     // bound to one link, every packet on it is the sandbox's
	exited chan struct{}

	mu        sync.Mutex
	open      map[flow]int       // sockets in use, counted
	linger    map[flow]time.Time // closed recently: FIN and ACK still flow
	filtered  map[uint32]bool    // the remote ends the socket's filter passes (remoteKey)
	wide      bool               // too many ends: it passes every TCP and UDP packet
	recounted time.Time
}

// flow is one host socket as its packets show it.
type flow struct {
	proto     uint8
	localPort uint16
	remote    netip.AddrPort
}

// lingerFor keeps a closed socket watched for its last packets.
const lingerFor = 3 * time.Second

// StartHostTap opens a packet socket on every interface and writes the
// matching packets to w. wireOnly leaves out loopback interfaces.
func StartHostTap(w *Writer, wireOnly bool) (*HostTap, error) {
	lo := loopback{none: wireOnly}
	if ifs, err := net.Interfaces(); err == nil {
		for _, i := range ifs {
			if i.Flags&net.FlagLoopback != 0 {
				lo.indexes = append(lo.indexes, uint32(i.Index))
			}
		}
	}
	h, err := newTap(w, 0, remoteFilter(nil, lo))
	if err != nil {
		return nil, err
	}
	h.lo = lo
	go h.run()
	return h, nil
}

// StartLinkTap writes every packet on one link to w: the host end of a
// rootful sandbox's veth, which carries nothing but the sandbox's
// traffic. Packets the host receives on it are the sandbox's outbound.
func StartLinkTap(w *Writer, ifindex int) (*HostTap, error) {
	h, err := newTap(w, ifindex, nil)
	if err != nil {
		return nil, err
	}
	h.link = true
	go h.run()
	return h, nil
}

// newTap opens the packet socket on ifindex (0: every interface) with
// filter on it, if any, before it takes its first packet.
func newTap(w *Writer, ifindex int, filter []bpf.Instruction) (*HostTap, error) {
	// Protocol 0 takes no packets until the bind below.
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
	if err != nil {
		return nil, fmt.Errorf("opening the capture's packet socket: %w", err)
	}
	unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, 4<<20)
	if filter != nil {
		err = attachFilter(fd, filter)
	}
	if err == nil {
		err = unix.Bind(fd, &unix.SockaddrLinklayer{Protocol: htons(unix.ETH_P_ALL), Ifindex: ifindex})
	}
	if err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("setting up the capture's packet socket: %w", err)
	}
	return &HostTap{sock: os.NewFile(uintptr(fd), "packet socket"), w: w, exited: make(chan struct{}),
		open: map[flow]int{}, linger: map[flow]time.Time{}, filtered: map[uint32]bool{}}, nil
}

func htons(v uint16) uint16 { return v<<8 | v>>8 }

// Upstream is the engine's OnUpstream. For ICMP echo the port is the
// echo identifier.
func (h *HostTap) Upstream(proto policy.Proto, local, remote netip.AddrPort, open bool) {
	remote = netip.AddrPortFrom(remote.Addr().Unmap(), remote.Port())
	e := flow{protoNumber(proto, remote.Addr()), local.Port(), remote}
	h.mu.Lock()
	defer h.mu.Unlock()
	if open {
		h.open[e]++
		delete(h.linger, e)
		if !h.link && (e.proto == unix.IPPROTO_TCP || e.proto == unix.IPPROTO_UDP) {
			h.filterInLocked(e.remote)
		}
		return
	}
	if h.open[e]--; h.open[e] <= 0 {
		delete(h.open, e)
		h.linger[e] = time.Now().Add(lingerFor)
	}
}

// recountEvery is how often the filter's ends are counted again, those
// of sockets closed since taken out.
const recountEvery = time.Second

// filterInLocked has the socket's filter pass remote's packets before
// the new socket's first one. Should the kernel refuse the filter, the
// socket goes without: the capture is whole, only dearer.
func (h *HostTap) filterInLocked(remote netip.AddrPort) {
	k := remoteKey(remote)
	if h.filtered[k] {
		return
	}
	h.filtered[k] = true
	if now := time.Now(); now.Sub(h.recounted) > recountEvery {
		h.recountLocked(now)
	}
	wide := len(h.filtered) > maxFilterRemotes
	if wide && h.wide {
		return // it passes every end already
	}
	h.wide = wide
	prog := remoteFilter(slices.Sorted(maps.Keys(h.filtered)), h.lo)
	if raw, err := h.sock.SyscallConn(); err == nil {
		raw.Control(func(fd uintptr) {
			if attachFilter(int(fd), prog) != nil {
				unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_DETACH_FILTER, 0)
			}
		})
	}
}

// recountLocked makes the filter's ends those of the sockets open or
// lingering now.
func (h *HostTap) recountLocked(now time.Time) {
	h.recounted = now
	clear(h.filtered)
	for e, until := range h.linger {
		if now.After(until) {
			delete(h.linger, e)
		}
	}
	add := func(e flow) {
		if e.proto == unix.IPPROTO_TCP || e.proto == unix.IPPROTO_UDP {
			h.filtered[remoteKey(e.remote)] = true
		}
	}
	for e := range h.open {
		add(e)
	}
	for e := range h.linger {
		add(e)
	}
}

func protoNumber(p policy.Proto, remote netip.Addr) uint8 {
	switch {
	case p == policy.UDP:
		return unix.IPPROTO_UDP
	case p == policy.ICMP && remote.Is4():
		return unix.IPPROTO_ICMP
	case p == policy.ICMP:
		return unix.IPPROTO_ICMPV6
	}
	return unix.IPPROTO_TCP
}

// match reports whether a packet between src and dst belongs to a watched
// socket, and whether it goes to the remote end: one lock per packet.
func (h *HostTap) match(proto uint8, src, dst netip.AddrPort) (ok, toRemote bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.watchedLocked(flow{proto, src.Port(), dst}) {
		return true, true
	}
	return h.watchedLocked(flow{proto, dst.Port(), src}), false
}

func (h *HostTap) watchedLocked(e flow) bool {
	if h.open[e] > 0 {
		return true
	}
	if until, ok := h.linger[e]; ok {
		if time.Now().Before(until) {
			return true
		}
		delete(h.linger, e)
	}
	return false
}

func (h *HostTap) run() {
	defer close(h.exited)
	raw, err := h.sock.SyscallConn()
	if err != nil {
		return
	}
	buf := make([]byte, 65536)
	for {
		var n int
		var from unix.Sockaddr
		var recvErr error
		if raw.Read(func(fd uintptr) bool {
			n, from, recvErr = unix.Recvfrom(int(fd), buf, 0)
			return recvErr != unix.EAGAIN
		}) != nil {
			return // closed
		}
		if recvErr != nil || n == 0 {
			continue
		}
		ll, ok := from.(*unix.SockaddrLinklayer)
		if ok && h.link {
			h.w.PacketCopy(ll.Pkttype != unix.PACKET_OUTGOING, buf[:n])
			continue
		}
		if !ok {
			continue
		}
		// What the filter does, for a socket the kernel left without one:
		// loopback shows each packet twice (sent, then received), keep
		// one, or none for wire-egress.
		if slices.Contains(h.lo.indexes, uint32(ll.Ifindex)) && (h.lo.none || ll.Pkttype == unix.PACKET_OUTGOING) {
			continue
		}
		proto, src, dst, ok := ends(buf[:n])
		if !ok {
			continue
		}
		if ok, toRemote := h.match(proto, src, dst); ok {
			h.w.PacketCopy(toRemote, buf[:n])
		}
	}
}

// ends parses the protocol and transport endpoints of an IPv4 or IPv6
// packet: TCP and UDP; ICMP echo, its identifier standing for the port
// of the side that sends requests; and an ICMP error, as the endpoints of
// the packet it quotes seen from the other side, since the error goes
// back to that packet's sender.
func ends(p []byte) (proto uint8, src, dst netip.AddrPort, ok bool) {
	return endsOf(p, false)
}

// endsOf is ends of p, which an ICMP error quoted if quoted: errors are
// never sent about errors, so one quoting another is not followed.
func endsOf(p []byte, quoted bool) (proto uint8, src, dst netip.AddrPort, ok bool) {
	var sa, da netip.Addr
	var l4 []byte
	switch {
	case len(p) >= 20 && p[0]>>4 == 4:
		ihl := int(p[0]&0xf) * 4
		if len(p) < ihl+8 || binary.BigEndian.Uint16(p[6:8])&0x1fff != 0 {
			return 0, src, dst, false // not a first fragment
		}
		proto, sa, da, l4 = p[9], netip.AddrFrom4([4]byte(p[12:16])), netip.AddrFrom4([4]byte(p[16:20])), p[ihl:]
	case len(p) >= 48 && p[0]>>4 == 6:
		proto, sa, da, l4 = p[6], netip.AddrFrom16([16]byte(p[8:24])), netip.AddrFrom16([16]byte(p[24:40])), p[40:]
	default:
		return 0, src, dst, false
	}
	switch proto {
	case unix.IPPROTO_TCP, unix.IPPROTO_UDP:
		sp, dp := binary.BigEndian.Uint16(l4[0:2]), binary.BigEndian.Uint16(l4[2:4])
		return proto, netip.AddrPortFrom(sa, sp), netip.AddrPortFrom(da, dp), true
	case unix.IPPROTO_ICMP, unix.IPPROTO_ICMPV6:
		id := binary.BigEndian.Uint16(l4[4:6])
		switch icmpKind(proto, l4[0]) {
		case echoRequest:
			return proto, netip.AddrPortFrom(sa, id), netip.AddrPortFrom(da, 0), true
		case echoReply:
			return proto, netip.AddrPortFrom(sa, 0), netip.AddrPortFrom(da, id), true
		case icmpError:
			if quoted {
				break
			}
			proto, src, dst, ok = endsOf(l4[8:], true)
			return proto, dst, src, ok
		}
	}
	return 0, src, dst, false
}

const (
	echoRequest = iota + 1
	echoReply
	icmpError
)

// icmpKind sorts an ICMP (proto 1) or ICMPv6 (58) message type.
func icmpKind(proto, typ uint8) int {
	if proto == unix.IPPROTO_ICMP {
		switch typ {
		case 8:
			return echoRequest
		case 0:
			return echoReply
		case 3, 11, 12:
			return icmpError
		}
		return 0
	}
	switch typ {
	case 128:
		return echoRequest
	case 129:
		return echoReply
	case 1, 2, 3, 4:
		return icmpError
	}
	return 0
}

// stats is the packet socket's count of the packets it took and dropped
// since the last call.
func (h *HostTap) stats() (st *unix.TpacketStats, err error) {
	raw, err := h.sock.SyscallConn()
	if err != nil {
		return nil, err
	}
	if cerr := raw.Control(func(fd uintptr) {
		st, err = unix.GetsockoptTpacketStats(int(fd), unix.SOL_PACKET, unix.PACKET_STATISTICS)
	}); cerr != nil {
		return nil, cerr
	}
	return st, err
}

// Close stops capturing; the Writer is the caller's to close after.
func (h *HostTap) Close() {
	// The packets the kernel dropped from the socket's full queue are
	// missing from the file too.
	if st, err := h.stats(); err == nil {
		h.w.Lost(uint64(st.Drops))
	}
	h.sock.Close() // ends run's read
	<-h.exited
}
