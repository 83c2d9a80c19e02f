package engine

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
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
	if !e.acquire(true) {
		return
	}
	defer e.release()
	if f.Dst.Port() == portDNS {
		// DNS to any resolver is answered by ours, from the address the
		// sandbox asked.
		f.Unawaited()
		e.serveDNSFlow(f)
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
	bytesUp, bytesDown := e.relayUDP(f, host, e.passICMPErrors(f, host, up))
	e.events.End(res, bytesUp, bytesDown, time.Since(start).Milliseconds())
}

// refuseUDP answers a flow's first datagram with an ICMP error from the
// gateway, as a router would, and swallows the rest until the flow is
// idle, so a sender in a loop makes one violation, not one per datagram.
func (e *Engine) refuseUDP(f *netstack.UDPFlow, why netstack.ICMPError) {
	ic := e.newIdleCloser(f.Conn)
	defer ic.stop()
	for first := true; ; first = false {
		if f.Next(func(b []byte) {
			if first {
				e.stack.SendGatewayError(why, netstack.QuoteUDP(f.Src, f.Dst, f.TTL, len(b)))
			}
		}) != nil {
			return
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
// idle timeout, or when the engine closes, or when its flow, idle, must
// make room for a new one (idleFlows).
type idleTimer struct {
	timer    *time.Timer
	idle     time.Duration
	unhookFn func() bool
	end      func()
	last     atomic.Int64 // unix nanoseconds of the last touch
	flows    *idleFlows
}

// newIdleCloser closes conns when idle.
func (e *Engine) newIdleCloser(conns ...net.Conn) *idleTimer {
	return e.afterIdle(func() {
		for _, c := range conns {
			c.Close()
		}
	})
}

// afterIdle calls fn when idle (fn may be called more than once: idle,
// then the engine closing).
func (e *Engine) afterIdle(fn func()) *idleTimer {
	ic := &idleTimer{
		idle:     e.cfg.UDPIdleTimeout,
		timer:    time.AfterFunc(e.cfg.UDPIdleTimeout, fn),
		unhookFn: context.AfterFunc(e.ctx, fn),
		end:      fn,
		flows:    &e.idle,
	}
	ic.last.Store(time.Now().UnixNano())
	e.idle.add(ic)
	return ic
}

func (ic *idleTimer) touch() {
	ic.last.Store(time.Now().UnixNano())
	ic.timer.Reset(ic.idle)
}

func (ic *idleTimer) stop() {
	ic.timer.Stop()
	ic.unhookFn()
	ic.flows.remove(ic)
}

// idleFlows are the flows that end when idle.
type idleFlows struct {
	mu sync.Mutex
	m  map[*idleTimer]struct{}
}

// minIdleToEnd keeps a flow in use from being ended for a new one.
const minIdleToEnd = time.Second

func (f *idleFlows) add(ic *idleTimer) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.m == nil {
		f.m = make(map[*idleTimer]struct{})
	}
	f.m[ic] = struct{}{}
}

func (f *idleFlows) remove(ic *idleTimer) {
	f.mu.Lock()
	defer f.mu.Unlock()
	delete(f.m, ic)
}

// endIdleSample bounds the flows endIdlest looks at: a sandbox starting
// flows at the limit would otherwise have each one scan them all.
const endIdleSample = 64

// endIdlest ends the flow idle longest among endIdleSample of them (a
// map's order starts anywhere), if it has been idle for minIdleToEnd,
// and says whether it did. The flow releases its slot once its
// goroutines see the end.
func (f *idleFlows) endIdlest() bool {
	f.mu.Lock()
	var idlest *idleTimer
	seen := 0
	for ic := range f.m {
		if idlest == nil || ic.last.Load() < idlest.last.Load() {
			idlest = ic
		}
		if seen++; seen == endIdleSample {
			break
		}
	}
	if idlest == nil || time.Since(time.Unix(0, idlest.last.Load())) < minIdleToEnd {
		f.mu.Unlock()
		return false
	}
	delete(f.m, idlest)
	f.mu.Unlock()
	// Not here: the caller may hold what ending takes (an echo's lock).
	go idlest.end()
	return true
}

// relayUDP carries datagrams both ways until the flow is idle. ICMP
// errors about what was sent (host read errors such as ECONNREFUSED) are
// not the end of the flow: onError passes them on, and the sandbox may
// still send.
func (e *Engine) relayUDP(f *netstack.UDPFlow, host net.Conn, onError func()) (up, down int64) {
	ic := e.newIdleCloser(f.Conn, host)
	defer ic.stop()
	var upBytes atomic.Int64
	done := make(chan struct{})
	go func() {
		defer close(done)
		// Touched before the datagram is passed on, so that a flow
		// whose peer answered is never the idlest (idleFlows).
		for f.Next(func(b []byte) {
			ic.touch()
			if _, err := host.Write(b); err == nil {
				upBytes.Add(int64(len(b)))
			}
		}) == nil {
		}
		host.Close()
	}()
	next := hostDatagrams(host)
	for {
		err := next(func(b []byte) {
			ic.touch()
			if _, err := f.Conn.Write(b); err == nil {
				down += int64(len(b))
			}
		})
		if err != nil {
			var errno syscall.Errno
			if errors.As(err, &errno) && icmpErrnos[errno] {
				onError()
				continue
			}
			f.Conn.Close()
			break
		}
	}
	<-done
	return upBytes.Load(), down
}

// hostDatagrams reads the host socket's datagrams one at a time, each in
// a buffer lent while it is handled (netstack.NextFromHost); a socket
// from a Dial of the caller's that is not a system one gets a buffer of
// its own.
func hostDatagrams(host net.Conn) func(use func([]byte)) error {
	if sc, ok := host.(syscall.Conn); ok {
		if rc, err := sc.SyscallConn(); err == nil {
			return func(use func([]byte)) error { return netstack.NextFromHost(rc, use) }
		}
	}
	buf := make([]byte, 1<<16)
	return func(use func([]byte)) error {
		n, err := host.Read(buf)
		if err == nil {
			use(buf[:n])
		}
		return err
	}
}

// icmpErrnos are what a connected UDP socket's read returns for an ICMP
// error about an earlier datagram.
var icmpErrnos = map[syscall.Errno]bool{syscall.ECONNREFUSED: true, syscall.EHOSTUNREACH: true, syscall.ENETUNREACH: true, syscall.EACCES: true, syscall.EPROTO: true}

// serveDNSFlow answers every datagram of one UDP flow to port 53. The
// query is copied out of the lent buffer: its answer may wait seconds
// for the upstream resolvers.
func (e *Engine) serveDNSFlow(f *netstack.UDPFlow) {
	ic := e.newIdleCloser(f.Conn)
	defer ic.stop()
	var query []byte
	for f.Next(func(b []byte) { query = append(query[:0], b...) }) == nil {
		ic.touch()
		if resp := e.resolver.Answer(e.ctx, query, false); resp != nil {
			f.Conn.Write(resp)
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
		e.events.FailureOnce("dns", fmt.Sprintf("%d DNS queries wait for the upstream resolvers, the engine's limit: more are dropped", cap(e.dnsSem)))
	})
}
