package engine

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/childflow/childflow/engine/dns"
	"github.com/childflow/childflow/engine/netstack"
	"github.com/childflow/childflow/engine/upstream"
	"github.com/childflow/childflow/policy"
)

func (e *Engine) handleUDP(f *netstack.UDPFlow) {
	defer f.Conn.Close()
	if !e.acquire() {
		return
	}
	defer e.release()
	if f.Dst.Port() == portDNS {
		// DNS to any resolver is answered by ours, from the address the
		// sandbox asked.
		e.serveDNSFlow(f.Conn)
		return
	}
	if f.TTL <= 1 {
		// The gateway is the first hop: a probe that ends there is
		// answered from it, and goes nowhere.
		e.refuseUDP(f, netstack.TimeExceeded)
		return
	}
	ev, ok := e.admit(policy.UDP, f.Src, f.Dst, false)
	if !ok {
		e.refuseUDP(f, netstack.AdminProhibited)
		return
	}
	up := e.upstreamAddr(f.Dst)
	ctx, cancel := context.WithTimeout(e.ctx, e.cfg.DialTimeout)
	ctx, closed := upstream.Watch(ctx, e.cfg.OnUpstream)
	defer closed()
	host, err := e.cfg.Dial(ctx, "udp", up.String())
	cancel()
	res := ev
	res.Upstream = up.String()
	e.events.Result(res, err)
	if err != nil {
		if why, ok := unreachable(err); ok {
			e.refuseUDP(f, why)
		}
		return
	}
	start := time.Now()
	bytesUp, bytesDown := e.relayUDP(f.Conn, host, e.passICMPErrors(f, host, up))
	e.events.End(res, bytesUp, bytesDown, time.Since(start).Milliseconds())
}

// refuseUDP answers a flow's first datagram with an ICMP error from the
// gateway, as a router would, and swallows the rest until the flow is
// idle, so a sender in a loop makes one violation, not one per datagram.
func (e *Engine) refuseUDP(f *netstack.UDPFlow, why netstack.ICMPError) {
	ic := e.newIdleCloser(f.Conn)
	defer ic.stop()
	buf := make([]byte, 65535)
	for first := true; ; first = false {
		n, err := f.Conn.Read(buf)
		if err != nil {
			return
		}
		if first {
			e.stack.SendGatewayError(why, netstack.QuoteUDP(f.Src, f.Dst, f.TTL, n))
		}
		ic.touch()
	}
}

// passICMPErrors forwards the flow's datagrams with one hop less than the
// sandbox gave them, and returns what to call when the host socket
// reports ICMP errors: it passes them on to the sandbox.
func (e *Engine) passICMPErrors(f *netstack.UDPFlow, host net.Conn, up netip.AddrPort) func() {
	sc, ok := host.(syscall.Conn)
	if !ok {
		return func() {}
	}
	rc, err := sc.SyscallConn()
	if err != nil || setHops(rc, up.Addr().Is6(), f.TTL-1) != nil {
		return func() {}
	}
	return func() {
		for _, he := range hostICMPErrors(rc) {
			from := sandboxView(he.from, up.Addr(), f.Dst.Addr())
			e.stack.SendICMPError(from, he.err, netstack.QuoteUDP(f.Src, f.Dst, f.TTL, he.payloadLen))
		}
	}
}

// idleTimer calls its function once nothing has moved (touch) for the
// idle timeout, or when the engine closes.
type idleTimer struct {
	timer    *time.Timer
	idle     time.Duration
	unhookFn func() bool
}

// newIdleCloser closes conns when idle.
func (e *Engine) newIdleCloser(conns ...net.Conn) *idleTimer {
	return e.afterIdle(func() {
		for _, c := range conns {
			c.Close()
		}
	})
}

// afterIdle calls fn when idle (fn may be called twice: idle, then the
// engine closing).
func (e *Engine) afterIdle(fn func()) *idleTimer {
	return &idleTimer{
		idle:     e.cfg.UDPIdleTimeout,
		timer:    time.AfterFunc(e.cfg.UDPIdleTimeout, fn),
		unhookFn: context.AfterFunc(e.ctx, fn),
	}
}

func (ic *idleTimer) touch() { ic.timer.Reset(ic.idle) }

func (ic *idleTimer) stop() {
	ic.timer.Stop()
	ic.unhookFn()
}

// relayUDP carries datagrams both ways until the flow is idle. ICMP
// errors about what was sent (host read errors such as ECONNREFUSED) are
// not the end of the flow: onError passes them on, and the sandbox may
// still send.
func (e *Engine) relayUDP(sandbox, host net.Conn, onError func()) (up, down int64) {
	ic := e.newIdleCloser(sandbox, host)
	defer ic.stop()
	var upBytes atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		buf := make([]byte, 65535)
		for {
			n, err := sandbox.Read(buf)
			if err != nil {
				host.Close()
				return
			}
			ic.touch()
			if _, err := host.Write(buf[:n]); err == nil {
				upBytes.Add(int64(n))
			}
		}
	}()
	buf := make([]byte, 65535)
	for {
		n, err := host.Read(buf)
		if err != nil {
			var errno syscall.Errno
			if errors.As(err, &errno) && icmpErrnos[errno] {
				onError()
				continue
			}
			sandbox.Close()
			break
		}
		ic.touch()
		if _, err := sandbox.Write(buf[:n]); err == nil {
			down += int64(n)
		}
	}
	<-done
	return upBytes.Load(), down
}

// icmpErrnos are what a connected UDP socket's read returns for an ICMP
// error about an earlier datagram.
var icmpErrnos = map[syscall.Errno]bool{syscall.ECONNREFUSED: true, syscall.EHOSTUNREACH: true, syscall.ENETUNREACH: true, syscall.EACCES: true, syscall.EPROTO: true}

// serveDNSFlow answers every datagram of one UDP flow to port 53.
func (e *Engine) serveDNSFlow(c net.Conn) {
	ic := e.newIdleCloser(c)
	defer ic.stop()
	buf := make([]byte, 65535)
	for {
		n, err := c.Read(buf)
		if err != nil {
			return
		}
		ic.touch()
		if resp := e.resolver.Answer(e.ctx, buf[:n], false); resp != nil {
			c.Write(resp)
		}
	}
}

// serveDNSPackets answers DNS on the gateway's unconnected UDP socket.
// It runs inside the WaitGroup, so each answer may join it: Close waits
// for the queries in flight and their dns_answer.
func (e *Engine) serveDNSPackets(pc net.PacketConn) {
	spawn := func(f func()) {
		e.wg.Add(1)
		go func() { defer e.wg.Done(); f() }()
	}
	dns.ServeUDP(e.ctx, e.resolver, pc, e.dnsSem, spawn, func() {
		e.fail("dns", fmt.Sprintf("%d DNS queries wait for the upstream resolvers, the engine's limit: more are dropped", cap(e.dnsSem)))
	})
}
