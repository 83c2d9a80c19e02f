package engine

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"syscall"
	"time"

	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
	"golang.org/x/sys/unix"

	"github.com/childflow/childflow/engine/flowlog"
	"github.com/childflow/childflow/engine/netstack"
	"github.com/childflow/childflow/engine/upstream"
	"github.com/childflow/childflow/policy"
)

const echoTimeout = 5 * time.Second

var errNoEchoSocket = errors.New("cannot relay ICMP echo: the host allows this user no ping socket (sysctl net.ipv4.ping_group_range) and no raw socket (CAP_NET_RAW)")

func (e *Engine) handleEcho(req netstack.EchoRequest, reply func()) {
	if req.TTL <= 1 {
		// The gateway is the first hop (traceroute -I, mtr).
		e.stack.SendGatewayError(netstack.TimeExceeded, netstack.QuoteEcho(req))
		return
	}
	// Each echo waiting for its answer (up to 5 s, to a host that never
	// answers) holds a host socket and its payload: a ping flood is cut
	// here, as a router rate-limits ICMP, rather than held (8 pings of
	// 60,000 bytes every 2 ms grew childflow to 718 MB in 5 s).
	if !e.echoSem.take() {
		e.events.FailureOnce("echoes", fmt.Sprintf("%d echo requests wait for their answers, the engine's limit: more are dropped", cap(e.echoSem)))
		return
	}
	// Off the goroutine that delivers the sandbox's packets: a new flow
	// looks for its process, and the echo waits for its answer.
	if !e.acquire(false) {
		e.echoSem.give()
		return
	}
	go func() {
		defer e.echoSem.give()
		defer e.release()
		f := e.echoFlow(req)
		if f == nil {
			return
		}
		if !f.allowed {
			e.stack.SendGatewayError(netstack.AdminProhibited, netstack.QuoteEcho(req))
			e.echoDone(f, netip.Addr{}, 0, 0, nil)
			return
		}
		target := e.upstreamAddr(netip.AddrPortFrom(req.Dst, 0)).Addr()
		herr, err := ping(e.ctx, target, req, req.TTL-1, e.cfg.OnUpstream)
		sent, answered := len(req.Payload), 0
		switch {
		case herr != nil:
			from := sandboxView(herr.from, target, req.Dst)
			e.stack.SendICMPError(from, herr.err, netstack.QuoteEcho(req))
			err = fmt.Errorf("%s from %s", herr.err, from)
		case err == nil:
			reply()
			answered = sent
		case errors.Is(err, errNoEchoSocket):
			e.events.FailureOnce("icmp", err.Error())
			sent = 0
		}
		e.echoDone(f, target, sent, answered, err)
	}()
}

// echoFlow is one ping session, logged as one flow as a UDP flow is: the
// echo requests of one sandbox socket (source and identifier) to one
// destination. It ends after the UDP idle timeout without a request, or
// with the engine.
type echoFlow struct {
	allowed bool
	start   time.Time
	idle    *idleTimer

	mu       sync.Mutex
	ev       flowlog.Event // the connect_attempt's, and the result's
	resulted bool          // connect_result logged
	up, down int64         // echo data relayed each way
	pending  int           // echoes waiting for their answer
	ending   bool          // idle, or the engine closing
	ended    bool
}

type echoKey struct {
	src, dst netip.Addr
	id       uint16
}

// echoFlow returns the flow of req, starting it (decided and logged) if
// there is none; nil when the engine holds its most flows.
func (e *Engine) echoFlow(req netstack.EchoRequest) *echoFlow {
	key := echoKey{req.Src, req.Dst, req.ID}
	e.echoMu.Lock()
	defer e.echoMu.Unlock()
	if f := e.echoes[key]; f != nil {
		f.idle.touch()
		f.mu.Lock()
		f.pending++
		f.mu.Unlock()
		return f
	}
	if !e.acquire(false) {
		return nil
	}
	// The identifier as source port finds the sandbox's ping socket.
	ev, ok := e.admit(policy.ICMP, netip.AddrPortFrom(req.Src, req.ID), netip.AddrPortFrom(req.Dst, 0), false)
	f := &echoFlow{ev: ev, allowed: ok, start: time.Now(), pending: 1}
	if e.echoes == nil {
		e.echoes = make(map[echoKey]*echoFlow)
	}
	e.echoes[key] = f
	f.idle = e.afterIdle(func() { e.endEcho(key, f) })
	return f
}

// echoDone adds one answered (or failed) echo to the flow; the flow's
// connect_result is its first echo's. A denied echo counts nothing.
func (e *Engine) echoDone(f *echoFlow, upstream netip.Addr, sent, answered int, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.pending--
	if f.allowed {
		f.up += int64(sent)
		f.down += int64(answered)
		if !f.resulted {
			f.resulted = true
			f.ev.Upstream = upstream.String()
			e.events.Result(f.ev, err)
		}
	}
	e.maybeEndLocked(f)
}

// endEcho ends the flow once its last echo is answered.
func (e *Engine) endEcho(key echoKey, f *echoFlow) {
	e.echoMu.Lock()
	if e.echoes[key] == f {
		delete(e.echoes, key)
	}
	e.echoMu.Unlock()
	f.mu.Lock()
	defer f.mu.Unlock()
	f.ending = true
	e.maybeEndLocked(f)
}

func (e *Engine) maybeEndLocked(f *echoFlow) {
	if !f.ending || f.pending > 0 || f.ended {
		return
	}
	f.ended = true
	f.idle.stop()
	if f.allowed {
		e.events.End(f.ev, f.up, f.down, time.Since(f.start).Milliseconds())
	}
	e.release()
}

// ping sends one echo request from the host with hops as its TTL (hop
// limit) and waits for its reply, or for an ICMP error about it. It uses
// an unprivileged ICMP socket (net.ipv4.ping_group_range) where the host
// allows one, else a raw socket (CAP_NET_RAW). A ping socket gets the
// errors about its own requests on its error queue; a raw socket sees
// every ICMP message, so an error counts when it quotes our request.
// onUpstream (if set) is told the echo identifier, the port of ICMP. It
// gives up when ctx ends.
func ping(ctx context.Context, target netip.Addr, req netstack.EchoRequest, hops uint8, onUpstream upstream.Func) (*hostError, error) {
	v4 := target.Is4()
	var typ, replyType icmp.Type = ipv6.ICMPTypeEchoRequest, ipv6.ICMPTypeEchoReply
	proto := 58
	if v4 {
		typ, replyType, proto = ipv4.ICMPTypeEcho, ipv4.ICMPTypeEchoReply, 1
	}
	conn, rc, err := listenPing(!v4, hops)
	if err != nil {
		if conn, err = listenRaw(!v4, hops); err != nil {
			return nil, fmt.Errorf("%w: %v", errNoEchoSocket, err)
		}
	}
	defer conn.Close()
	defer context.AfterFunc(ctx, func() { conn.SetReadDeadline(time.Now()) })()
	raw := rc == nil
	if onUpstream != nil {
		// A ping socket's identifier is its port; a raw socket sends ours.
		id := req.ID
		if a, ok := conn.LocalAddr().(*net.UDPAddr); ok && !raw {
			id = uint16(a.Port)
		}
		local, remote := netip.AddrPortFrom(netip.IPv4Unspecified(), id), netip.AddrPortFrom(target, 0)
		onUpstream(policy.ICMP, local, remote, true)
		defer onUpstream(policy.ICMP, local, remote, false)
	}
	msg := icmp.Message{Type: typ, Body: &icmp.Echo{ID: int(req.ID), Seq: int(req.Seq), Data: req.Payload}}
	b, err := msg.Marshal(nil)
	if err != nil {
		return nil, err
	}
	var to net.Addr = &net.UDPAddr{IP: target.AsSlice()}
	if raw {
		to = &net.IPAddr{IP: target.AsSlice()}
	}
	if _, err := conn.WriteTo(b, to); err != nil {
		return nil, err
	}
	conn.SetReadDeadline(time.Now().Add(echoTimeout))
	// The answer carries the request's payload; an ICMP error read from
	// a raw socket quotes at most 1280 bytes of it.
	buf := make([]byte, len(req.Payload)+1500)
	for {
		n, from, err := conn.ReadFrom(buf)
		if ctx.Err() != nil {
			return nil, errors.New("no answer before the sandbox ended")
		}
		if err != nil {
			// On a ping socket, a queued ICMP error fails the read.
			if !raw {
				if errs := hostICMPErrors(rc); len(errs) > 0 {
					return &errs[0], nil
				}
			}
			return nil, err
		}
		m, err := icmp.ParseMessage(proto, buf[:n])
		if err != nil {
			continue
		}
		var quoted []byte
		switch body := m.Body.(type) {
		case *icmp.Echo:
			// Ping sockets rewrite the id; raw sockets see every reply,
			// so match the sender and id there.
			if m.Type != replyType || body.Seq != int(req.Seq) || !bytes.Equal(body.Data, req.Payload) {
				continue
			}
			if raw && (body.ID != int(req.ID) || addrOf(from) != target) {
				continue
			}
			return nil, nil
		case *icmp.TimeExceeded:
			quoted = body.Data
		case *icmp.DstUnreach:
			quoted = body.Data
		default:
			continue
		}
		// A raw socket sees every error: ours quotes our request.
		kind, ok := netstack.ICMPErrorOf(!v4, buf[0], buf[1])
		if !ok || !raw {
			continue
		}
		if q, isEcho := netstack.ParseEcho(quoted); isEcho && q.Dst == target && q.ID == req.ID && q.Seq == req.Seq {
			return &hostError{err: kind, from: addrOf(from)}, nil
		}
	}
}

// listenPing opens an unprivileged ICMP socket sending with hops and
// queueing the ICMP errors about what it sent.
func listenPing(v6 bool, hops uint8) (net.PacketConn, syscall.RawConn, error) {
	family, proto := unix.AF_INET, unix.IPPROTO_ICMP
	if v6 {
		family, proto = unix.AF_INET6, unix.IPPROTO_ICMPV6
	}
	fd, err := unix.Socket(family, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, proto)
	if err != nil {
		return nil, nil, err // not allowed by net.ipv4.ping_group_range
	}
	// Bound now rather than on the first send, so that its identifier
	// (the port) is known before the request leaves.
	var unspecified unix.Sockaddr = &unix.SockaddrInet4{}
	if v6 {
		unspecified = &unix.SockaddrInet6{}
	}
	if err := unix.Bind(fd, unspecified); err != nil {
		unix.Close(fd)
		return nil, nil, err
	}
	f := os.NewFile(uintptr(fd), "ping")
	defer f.Close()
	conn, err := net.FilePacketConn(f)
	if err != nil {
		return nil, nil, err
	}
	rc, err := conn.(syscall.Conn).SyscallConn()
	if err == nil {
		err = setHops(rc, v6, hops)
	}
	if err != nil {
		conn.Close()
		return nil, nil, err
	}
	return conn, rc, nil
}

// listenRaw opens a raw ICMP socket (CAP_NET_RAW) sending with hops.
func listenRaw(v6 bool, hops uint8) (net.PacketConn, error) {
	network := "ip4:icmp"
	if v6 {
		network = "ip6:ipv6-icmp"
	}
	lc := net.ListenConfig{Control: upstream.NoBroadcast}
	conn, err := lc.ListenPacket(context.Background(), network, "")
	if err != nil {
		return nil, err
	}
	if v6 {
		err = ipv6.NewPacketConn(conn).SetHopLimit(int(hops))
	} else {
		err = ipv4.NewPacketConn(conn).SetTTL(int(hops))
	}
	if err != nil {
		conn.Close()
		return nil, err
	}
	return conn, nil
}

func addrOf(a net.Addr) netip.Addr {
	var ip net.IP
	switch a := a.(type) {
	case *net.IPAddr:
		ip = a.IP
	case *net.UDPAddr:
		ip = a.IP
	}
	addr, _ := netip.AddrFromSlice(ip)
	return addr.Unmap()
}
