package engine

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	mdns "github.com/miekg/dns"
	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/adapters/gonet"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/fdbased"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv4"
	"gvisor.dev/gvisor/pkg/tcpip/network/ipv6"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
	"gvisor.dev/gvisor/pkg/tcpip/transport/tcp"
	"gvisor.dev/gvisor/pkg/tcpip/transport/udp"
	"gvisor.dev/gvisor/pkg/waiter"

	"github.com/childflow/childflow/engine/flowlog"
	"github.com/childflow/childflow/engine/proxy"
	"github.com/childflow/childflow/internal/netplan"
	"github.com/childflow/childflow/policy"
	"github.com/childflow/childflow/policy/profile"
)

// sandbox is the far end of the engine's link: a second gVisor stack
// standing in for the sandbox's kernel.
type sandbox struct {
	s      *stack.Stack
	plan   netplan.Plan
	events *eventLog
	eng    *Engine
}

type eventLog struct {
	mu sync.Mutex
	ev []flowlog.Event
}

func (l *eventLog) add(e flowlog.Event) { l.mu.Lock(); l.ev = append(l.ev, e); l.mu.Unlock() }

func (l *eventLog) find(kind string, match func(flowlog.Event) bool) (flowlog.Event, bool) {
	deadline := time.Now().Add(2 * time.Second)
	for time.Now().Before(deadline) {
		l.mu.Lock()
		for _, e := range l.ev {
			if e.Event == kind && match(e) {
				l.mu.Unlock()
				return e, true
			}
		}
		l.mu.Unlock()
		time.Sleep(10 * time.Millisecond)
	}
	return flowlog.Event{}, false
}

func (l *eventLog) count(kind string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	n := 0
	for _, e := range l.ev {
		if e.Event == kind {
			n++
		}
	}
	return n
}

func newSandbox(t *testing.T, p *policy.Policy, dnsUpstream ...netip.AddrPort) *sandbox {
	t.Helper()
	return newSandboxWith(t, p, nil, dnsUpstream...)
}

// newSandboxWith is newSandbox with the engine's Config changed by mod.
func newSandboxWith(t *testing.T, p *policy.Policy, mod func(*Config), dnsUpstream ...netip.AddrPort) *sandbox {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	// A TUN queues what it is given (and drops, rarely); a socketpair
	// with default buffers refuses writes early under load, and the drops
	// back both stacks' retransmission timers off into a stall. Give it
	// room like a TUN's queue.
	for _, fd := range fds {
		for _, opt := range [][2]int{{unix.SO_SNDBUFFORCE, unix.SO_SNDBUF}, {unix.SO_RCVBUFFORCE, unix.SO_RCVBUF}} {
			if unix.SetsockoptInt(fd, unix.SOL_SOCKET, opt[0], 4<<20) != nil {
				unix.SetsockoptInt(fd, unix.SOL_SOCKET, opt[1], 4<<20)
			}
		}
	}
	plan, err := netplan.Choose(nil, testMTU())
	if err != nil {
		t.Fatal(err)
	}
	sb := &sandbox{plan: plan, events: &eventLog{}}
	link := os.NewFile(uintptr(fds[0]), "engine")
	cfg := Config{ID: "test", Link: link, Plan: plan, Policy: p,
		DNS: dnsUpstream, OnEvent: sb.events.add, UDPIdleTimeout: 2 * time.Second, DialTimeout: 2 * time.Second,
		Dial: toLoopback}
	if mod != nil {
		mod(&cfg)
	}
	eng, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := eng.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	if cfg.Link == nil { // mod left the link for later, as childflow exec does
		if err := eng.Attach(link, nil); err != nil {
			t.Fatal(err)
		}
	}
	sb.eng = eng
	t.Cleanup(func() { eng.Close() })

	client, err := os.NewFile(uintptr(fds[1]), "sandbox"), error(nil)
	ep, err := fdbased.New(&fdbased.Options{FDs: []int{int(client.Fd())}, MTU: uint32(plan.MTU)})
	if err != nil {
		t.Fatal(err)
	}
	s := stack.New(stack.Options{
		NetworkProtocols:   []stack.NetworkProtocolFactory{ipv4.NewProtocol, ipv6.NewProtocol},
		TransportProtocols: []stack.TransportProtocolFactory{tcp.NewProtocol, udp.NewProtocol},
	})
	if err := s.CreateNIC(1, ep); err != nil {
		t.Fatal(err)
	}
	for _, a := range []netip.Prefix{netip.PrefixFrom(plan.Sandbox4, 24), netip.PrefixFrom(plan.Sandbox6, 64)} {
		proto := ipv4.ProtocolNumber
		if a.Addr().Is6() {
			proto = ipv6.ProtocolNumber
		}
		s.AddProtocolAddress(1, tcpip.ProtocolAddress{Protocol: proto, AddressWithPrefix: tcpip.AddrFromSlice(a.Addr().AsSlice()).WithPrefix()}, stack.AddressProperties{})
	}
	s.SetRouteTable([]tcpip.Route{{Destination: header.IPv4EmptySubnet, NIC: 1}, {Destination: header.IPv6EmptySubnet, NIC: 1}})
	sb.s = s
	// The link stops first: gVisor's Wait waits for its reader while
	// holding the stack's lock, which a packet being delivered needs.
	t.Cleanup(func() { ep.Attach(nil); s.Close(); s.Wait(); client.Close() })
	return sb
}

// toLoopback stands in for the internet: the sandbox cannot send to
// 127.0.0.0/8 (a martian), so tests address servers on TEST-NET-1 and the
// engine's Dial seam lands them on the loopback servers.
func toLoopback(ctx context.Context, network, address string) (net.Conn, error) {
	ap := netip.MustParseAddrPort(address)
	a := netip.MustParseAddr("127.0.0.1")
	if ap.Addr().Is6() {
		a = netip.IPv6Loopback()
	}
	var d net.Dialer
	return d.DialContext(ctx, network, netip.AddrPortFrom(a, ap.Port()).String())
}

// remote is where the sandbox addresses a loopback server.
func remote(srv netip.AddrPort) netip.AddrPort {
	if srv.Addr().Is6() {
		return netip.AddrPortFrom(netip.MustParseAddr("2001:db8:ffff::1"), srv.Port())
	}
	return netip.AddrPortFrom(netip.MustParseAddr("192.0.2.1"), srv.Port())
}

func full(ap netip.AddrPort) tcpip.FullAddress {
	return tcpip.FullAddress{NIC: 1, Addr: tcpip.AddrFromSlice(ap.Addr().AsSlice()), Port: ap.Port()}
}

func proto(a netip.Addr) tcpip.NetworkProtocolNumber {
	if a.Is4() {
		return ipv4.ProtocolNumber
	}
	return ipv6.ProtocolNumber
}

func (sb *sandbox) dial(t *testing.T, dst netip.AddrPort) (net.Conn, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return gonet.DialContextTCP(ctx, sb.s, full(dst), proto(dst.Addr()))
}

func (sb *sandbox) dialUDP(t *testing.T, dst netip.AddrPort) *gonet.UDPConn {
	c, err := gonet.DialUDP(sb.s, nil, &tcpip.FullAddress{NIC: 1, Addr: tcpip.AddrFromSlice(dst.Addr().AsSlice()), Port: dst.Port()}, proto(dst.Addr()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// echoServer listens on loopback and echoes until EOF, then half-closes.
func echoServer(t testing.TB, network, addr string) netip.AddrPort {
	ap, _ := countingEchoServer(t, network, addr)
	return ap
}

// countingEchoServer also counts the connections it accepted.
func countingEchoServer(t testing.TB, network, addr string) (netip.AddrPort, *atomic.Int32) {
	t.Helper()
	ln, err := net.Listen(network, addr)
	if err != nil {
		t.Fatalf("loopback %s unavailable: %v", addr, err)
	}
	t.Cleanup(func() { ln.Close() })
	var accepted atomic.Int32
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			accepted.Add(1)
			go func() {
				io.Copy(c, c)
				c.(*net.TCPConn).CloseWrite()
				time.Sleep(100 * time.Millisecond)
				c.Close()
			}()
		}
	}()
	return netip.MustParseAddrPort(ln.Addr().String()), &accepted
}

// udpEchoServer answers each datagram on loopback twice, with it and
// with "again:" and it: request/response protocols with several answers
// must work.
func udpEchoServer(t testing.TB) netip.AddrPort {
	t.Helper()
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	go func() {
		buf := make([]byte, 2048)
		for {
			n, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			pc.WriteTo(buf[:n], from)
			pc.WriteTo(append([]byte("again:"), buf[:n]...), from)
		}
	}()
	return netip.MustParseAddrPort(pc.LocalAddr().String())
}

var allowAll = &policy.Policy{}

func TestTCPRelayWithHalfClose(t *testing.T) {
	// childflow exec runs the engine on one processor, where the TUN
	// reader waits in the netpoller rather than in ppoll.
	for _, run := range []struct {
		addr  string
		procs int
	}{{"127.0.0.1:0", 0}, {"[::1]:0", 0}, {"127.0.0.1:0", 1}} {
		t.Run(fmt.Sprintf("%s/procs=%d", run.addr, run.procs), func(t *testing.T) {
			if run.procs > 0 {
				defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(run.procs))
			}
			srv := echoServer(t, "tcp", run.addr)
			sb := newSandbox(t, allowAll)
			c, err := sb.dial(t, remote(srv))
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			// A stall fails in a minute instead of hanging the suite (a rare
			// one is under investigation: see issue #2's notes).
			c.SetDeadline(time.Now().Add(time.Minute))
			payload := strings.Repeat("childflow ", 200000) // 2 MB: exercises back-pressure
			go func() {
				io.WriteString(c, payload)
				c.(*gonet.TCPConn).CloseWrite()
			}()
			got, err := io.ReadAll(c)
			if err != nil {
				t.Fatalf("%v (read %d)\nsandbox stack: %s\nengine stack: %s", err, len(got), tcpStats(sb.s.Stats()), tcpStats(sb.eng.stack.Stats()))
			}
			if string(got) != payload {
				t.Fatalf("echo returned %d bytes, want %d", len(got), len(payload))
			}
			end, ok := sb.events.find(flowlog.FlowEnd, func(e flowlog.Event) bool { return e.DstPort == srv.Port() })
			if !ok || end.BytesUp != int64(len(payload)) || end.BytesDown != int64(len(payload)) || end.ResetBy != "" {
				t.Fatalf("flow_end %+v (found %v), want %d bytes each way and no reset", end, ok, len(payload))
			}
		})
	}
}

// childflow exec starts the engine while the sandbox's namespaces are
// built, and attaches the TUN once it exists: the engine serves DNS and
// relays from then on as one started on its link.
func TestALinkAttachedAfterStart(t *testing.T) {
	upstream, _ := dnsUpstream(t)
	srv := echoServer(t, "tcp", "127.0.0.1:0")
	sb := newSandboxWith(t, allowAll, func(c *Config) { c.Link = nil }, upstream)
	c, err := sb.dial(t, remote(srv))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(c, "ping"); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 4)
	if _, err := io.ReadFull(c, got); err != nil || string(got) != "ping" {
		t.Fatalf("echo %q, %v", got, err)
	}
	if m := sb.query(t, netip.AddrPortFrom(sb.plan.Gateway4, 53), "allowed.test.", mdns.TypeA, false); m.Rcode != mdns.RcodeSuccess || len(m.Answer) == 0 {
		t.Fatalf("DNS on the gateway: %v", m)
	}
	if err := sb.eng.Attach(nil, nil); err == nil {
		t.Fatal("a second Attach was taken")
	}
}

// An engine that never gets its link (the sandbox failed to start)
// closes, and its goroutines end.
func TestAnEngineNeverAttachedCloses(t *testing.T) {
	plan, err := netplan.Choose(nil, testMTU())
	if err != nil {
		t.Fatal(err)
	}
	before := runtime.NumGoroutine()
	eng, err := New(Config{ID: "test", Plan: plan, Policy: allowAll})
	if err != nil {
		t.Fatal(err)
	}
	if err := eng.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	eng.Linger(time.Second) // nothing came in: returns at once
	done := make(chan struct{})
	go func() { eng.Close(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Close hung")
	}
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > before && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := runtime.NumGoroutine(); n > before {
		t.Fatalf("%d goroutines left, %d before", n, before)
	}
}

func TestTCPDeniedIsResetBeforeHandshake(t *testing.T) {
	srv, accepted := countingEchoServer(t, "tcp", "127.0.0.1:0")
	sb := newSandbox(t, &policy.Policy{}) // the gateway is the host: not allowed by default
	start := time.Now()
	_, err := sb.dial(t, netip.AddrPortFrom(sb.plan.Gateway4, srv.Port()))
	if err == nil {
		t.Fatal("connection to the host's loopback through the gateway succeeded")
	}
	if !strings.Contains(err.Error(), "refused") {
		t.Fatalf("dial error %v, want connection refused (RST)", err)
	}
	if time.Since(start) > 2*time.Second {
		t.Fatalf("denial took %v", time.Since(start))
	}
	if n := accepted.Load(); n != 0 {
		t.Fatalf("the host's server saw %d connection(s)", n)
	}
	v, ok := sb.events.find(flowlog.PolicyViolation, func(e flowlog.Event) bool { return e.DstPort == srv.Port() })
	if !ok || v.ReasonCode != policy.ReasonHost || v.Control == "" || v.MatchedCIDR != netip.PrefixFrom(sb.plan.Gateway4, 32).String() {
		t.Fatalf("policy_violation %+v (found %v)", v, ok)
	}
	if sb.eng.Violations() == 0 {
		t.Fatal("violation not counted")
	}
}

func TestTCPUpstreamRefusedIsReset(t *testing.T) {
	ln, _ := net.Listen("tcp", "127.0.0.1:0")
	dead := netip.MustParseAddrPort(ln.Addr().String())
	ln.Close()
	sb := newSandbox(t, allowAll)
	_, err := sb.dial(t, remote(dead))
	if err == nil || !strings.Contains(err.Error(), "refused") {
		t.Fatalf("dial error %v, want connection refused", err)
	}
	r, ok := sb.events.find(flowlog.ConnectResult, func(e flowlog.Event) bool { return e.DstPort == dead.Port() })
	if !ok || r.OK == nil || *r.OK || r.Error == "" {
		t.Fatalf("connect_result %+v (found %v)", r, ok)
	}
}

func TestGatewayStandsForHostLoopbackOnlyWhenAllowed(t *testing.T) {
	srv, accepted := countingEchoServer(t, "tcp", "127.0.0.1:0")
	ownsHost := func(c *Config) { c.CallerOwnsHost = true }
	sb := newSandboxWith(t, &policy.Policy{}, ownsHost)
	gw := netip.AddrPortFrom(sb.plan.Gateway4, srv.Port())
	if _, err := sb.dial(t, gw); err == nil {
		t.Fatal("gateway reached the host's loopback without a rule")
	}
	allow := &policy.Policy{AllowCIDRs: []netip.Prefix{netip.PrefixFrom(sb.plan.Gateway4, 32)}}
	sb2 := newSandboxWith(t, allow, ownsHost)
	c, err := sb2.dial(t, netip.AddrPortFrom(sb2.plan.Gateway4, srv.Port()))
	if err != nil {
		t.Fatalf("allow-cidr on the gateway: %v", err)
	}
	c.Close()
	// The server takes that connection in its own time: counted after
	// the count below, it looked like one the proxy made (once, under
	// the race detector).
	for deadline := time.Now().Add(5 * time.Second); accepted.Load() < 1; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the host's loopback server never took the allowed connection")
		}
	}

	// Without CallerOwnsHost (the node daemon's containers) no rule opens it,
	// and the proxy's own connection does not go there either.
	before := accepted.Load()
	sb3 := newSandbox(t, allow)
	if _, err := sb3.dial(t, netip.AddrPortFrom(sb3.plan.Gateway4, srv.Port())); err == nil {
		t.Fatal("gateway reached the host's loopback without CallerOwnsHost")
	}
	v, ok := sb3.events.find(flowlog.PolicyViolation, func(e flowlog.Event) bool { return e.DstPort == srv.Port() })
	if !ok || v.ReasonCode != policy.ReasonHost {
		t.Fatalf("policy_violation %+v (found %v)", v, ok)
	}
	fwd, err := proxy.Parse(profile.FlagName, fmt.Sprintf("socks5://localhost:%d", srv.Port()), "", "", false)
	if err != nil {
		t.Fatal(err)
	}
	sb4 := newSandboxWith(t, allowAll, func(c *Config) { c.Proxy = fwd })
	if _, err := sb4.dial(t, remote(srv)); err == nil {
		t.Fatal("a connection through a proxy on the host's loopback succeeded")
	}
	r, ok := sb4.events.find(flowlog.ConnectResult, func(e flowlog.Event) bool { return e.Proxy != "" })
	if !ok || !strings.Contains(r.Error, "loopback") {
		t.Errorf("connect_result %+v (found %v), want the loopback refused", r, ok)
	}
	if n := accepted.Load(); n != before {
		t.Fatalf("the host's loopback server saw %d connection(s)", n-before)
	}
}

// Without CallerOwnsHost a flow never reaches the metadata services that
// answer with the host's identity, whatever the policy allows; the
// token-guarded agents stay the policy's to decide.
func TestIdentityEndpointsOnlyForTheHostsOwner(t *testing.T) {
	srv, accepted := countingEchoServer(t, "tcp", "127.0.0.1:0")
	imds := netip.AddrPortFrom(netip.MustParseAddr("169.254.169.254"), srv.Port())
	owner := newSandboxWith(t, allowAll, func(c *Config) { c.CallerOwnsHost = true })
	c, err := owner.dial(t, imds)
	if err != nil {
		t.Fatalf("the host's owner: %v", err)
	}
	c.Close()
	// The server counts a connection once its Accept returns, which may
	// be after the dial did.
	for deadline := time.Now().Add(3 * time.Second); accepted.Load() == 0 && time.Now().Before(deadline); {
		time.Sleep(time.Millisecond)
	}
	before := accepted.Load()
	sb := newSandbox(t, &policy.Policy{AllowCIDRs: []netip.Prefix{netip.MustParsePrefix("169.254.0.0/16")}})
	for _, dst := range []string{"169.254.169.254", "64:ff9b::a9fe:a9fe", "fd00:ec2::254"} {
		if _, err := sb.dial(t, netip.AddrPortFrom(netip.MustParseAddr(dst), srv.Port())); err == nil {
			t.Errorf("%s reached without CallerOwnsHost", dst)
		}
	}
	v, ok := sb.events.find(flowlog.PolicyViolation, func(e flowlog.Event) bool { return e.DstPort == srv.Port() })
	if !ok || v.ReasonCode != policy.ReasonMetadata || v.MatchedCIDR != "169.254.169.254/32" {
		t.Errorf("policy_violation %+v (found %v)", v, ok)
	}
	if c, err := sb.dial(t, netip.AddrPortFrom(netip.MustParseAddr("169.254.170.23"), srv.Port())); err != nil {
		t.Errorf("EKS Pod Identity's agent, which wants a token: %v", err)
	} else {
		c.Close()
	}
	for deadline := time.Now().Add(3 * time.Second); accepted.Load()-before == 0 && time.Now().Before(deadline); {
		time.Sleep(time.Millisecond)
	}
	if n := accepted.Load() - before; n != 1 {
		t.Errorf("%d connections reached the server, want only the agent's", n)
	}
}

func TestUDPRelayAndDenial(t *testing.T) {
	srv := remote(udpEchoServer(t))
	sb := newSandbox(t, allowAll)
	c := sb.dialUDP(t, srv)
	c.Write([]byte("ping"))
	c.SetReadDeadline(time.Now().Add(3 * time.Second))
	buf := make([]byte, 100)
	for _, want := range []string{"ping", "again:ping"} {
		n, err := c.Read(buf)
		if err != nil || string(buf[:n]) != want {
			t.Fatalf("read %q, %v; want %q", buf[:n], err, want)
		}
	}

	denied := newSandbox(t, &policy.Policy{DenyCIDRs: []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}})
	dc := denied.dialUDP(t, srv)
	for i := 0; i < 5; i++ {
		dc.Write([]byte("leak"))
	}
	dc.SetReadDeadline(time.Now().Add(500 * time.Millisecond))
	if n, err := dc.Read(buf); err == nil {
		t.Fatalf("denied UDP flow got a reply %q", buf[:n])
	}
	if _, ok := denied.events.find(flowlog.PolicyViolation, func(e flowlog.Event) bool { return e.Proto == "udp" }); !ok {
		t.Fatal("no policy_violation for denied UDP")
	}
	if v := denied.eng.Violations(); v != 1 {
		t.Fatalf("%d violations for one denied flow of 5 datagrams, want 1", v)
	}
}

// TestWaitingUDPFlowsHoldNoBuffers: UDP flows waiting for their next
// datagram, relayed or refused, hold no 64 KiB read buffers: the heap
// grows by a few KiB per flow, where each relayed flow held two such
// buffers and each refused one held one (a sandbox's 8192 refused flows
// took 490 MiB of RSS).
func TestWaitingUDPFlowsHoldNoBuffers(t *testing.T) {
	srv := remote(udpEchoServer(t))
	sb := newSandbox(t, allowAll)
	denied := newSandbox(t, &policy.Policy{DenyCIDRs: []netip.Prefix{netip.MustParsePrefix("192.0.2.0/24")}})
	heap := func() uint64 {
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return m.HeapInuse
	}
	const flows = 200
	before := heap()
	buf := make([]byte, 100)
	for range flows {
		c := sb.dialUDP(t, srv)
		c.Write([]byte("ping"))
		c.SetReadDeadline(time.Now().Add(3 * time.Second))
		for range 2 {
			if _, err := c.Read(buf); err != nil {
				t.Fatal(err)
			}
		}
		denied.dialUDP(t, srv).Write([]byte("leak"))
	}
	for deadline := time.Now().Add(5 * time.Second); denied.eng.Violations() < flows; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d refused flows seen", denied.eng.Violations(), flows)
		}
	}
	perFlow := (int64(heap()) - int64(before)) / (2 * flows)
	t.Logf("%d bytes of heap per waiting flow", perFlow)
	if perFlow > 32<<10 {
		t.Errorf("%d KiB of heap per waiting UDP flow, want a few", perFlow>>10)
	}
}

// TestCloseEndsOpenFlows: flows still open when the engine closes end
// (flow_end) before Close returns, and nothing is logged after: the
// flow log and the summary are closed then.
func TestCloseEndsOpenFlows(t *testing.T) {
	udpSrv := remote(udpEchoServer(t))
	tcpSrv := remote(echoServer(t, "tcp", "127.0.0.1:0"))
	var closed atomic.Bool
	var late atomic.Int32
	events := &eventLog{}
	sb := newSandboxWith(t, allowAll, func(c *Config) {
		c.UDPIdleTimeout = time.Minute
		c.OnEvent = func(ev flowlog.Event) {
			if closed.Load() {
				late.Add(1)
			}
			events.add(ev)
		}
	})
	// Many flows: a race between their ends and Close's return is lost
	// by some of them.
	const flows = 20
	var conns []net.Conn
	for range flows {
		conns = append(conns, sb.dialUDP(t, udpSrv))
		tc, err := sb.dial(t, tcpSrv)
		if err != nil {
			t.Fatal(err)
		}
		defer tc.Close()
		conns = append(conns, tc)
	}
	buf := make([]byte, 16)
	for _, c := range conns {
		c.Write([]byte("open"))
		c.SetReadDeadline(time.Now().Add(3 * time.Second))
		if _, err := io.ReadFull(c, buf[:4]); err != nil {
			t.Fatal(err)
		}
	}
	sb.eng.Close()
	closed.Store(true)
	if n := events.count(flowlog.FlowEnd); n != 2*flows {
		t.Errorf("%d flow_end events when Close returned, want %d", n, 2*flows)
	}
	time.Sleep(200 * time.Millisecond)
	if n := late.Load(); n > 0 {
		t.Fatalf("%d events logged after Close returned", n)
	}
}

// A flow whose upstream stopped reading blocks one copy in a write to
// the host's socket and the other in a read from it, where closing the
// stack does not reach; Close must still end it (a sandbox's exit, a
// pod's CNI DEL) rather than wait for it forever.
func TestCloseEndsStuckFlows(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	var held sync.Map // the server's ends, kept open, never read
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			held.Store(c, true)
		}
	}()
	t.Cleanup(func() { held.Range(func(c, _ any) bool { c.(net.Conn).Close(); return true }) })
	events := &eventLog{}
	sb := newSandboxWith(t, allowAll, func(c *Config) { c.OnEvent = events.add })
	srv := remote(netip.MustParseAddrPort(ln.Addr().String()))
	for range 2 {
		c, err := sb.dial(t, srv)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		// Write until neither the engine nor the host's socket takes more.
		chunk := make([]byte, 64<<10)
		for {
			c.SetWriteDeadline(time.Now().Add(300 * time.Millisecond))
			if _, err := c.Write(chunk); err != nil {
				break
			}
		}
	}
	closed := make(chan struct{})
	go func() { sb.eng.Close(); close(closed) }()
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("Close still waits for the stuck flows after 10s")
	}
	if n := events.count(flowlog.FlowEnd); n != 2 {
		t.Errorf("%d flow_end events, want 2", n)
	}
}

// dnsUpstream runs a resolver on loopback with a few fixed names.
func dnsUpstream(t testing.TB) (netip.AddrPort, *sync.Map) {
	t.Helper()
	var asked sync.Map
	h := mdns.HandlerFunc(func(w mdns.ResponseWriter, r *mdns.Msg) {
		m := new(mdns.Msg)
		m.SetReply(r)
		q := r.Question[0]
		asked.Store(strings.ToLower(q.Name), true)
		add := func(s string) {
			rr, err := mdns.NewRR(s)
			if err != nil {
				t.Error(err)
			}
			m.Answer = append(m.Answer, rr)
		}
		switch strings.ToLower(q.Name) {
		case "allowed.test.":
			if q.Qtype == mdns.TypeA {
				add("allowed.test. 60 IN A 192.0.2.1")
			}
		case "alias.test.":
			add("alias.test. 60 IN CNAME allowed.test.")
			add("allowed.test. 60 IN A 192.0.2.1")
			// An unrelated record in the answer must not be attributed.
			add("other.test. 60 IN A 192.0.2.9")
		case "big.test.":
			for i := 1; i <= 60; i++ {
				add(fmt.Sprintf("big.test. 60 IN A 192.0.2.%d", i))
			}
		default:
			// A wildcard zone, as many have: any name under it resolves.
			if strings.HasSuffix(strings.ToLower(q.Name), ".wild.test.") && q.Qtype == mdns.TypeA {
				add(q.Name + " 60 IN A 192.0.2.1")
			}
		}
		w.WriteMsg(m)
	})
	// One port for UDP and TCP: the UDP port the kernel picks may be taken
	// for TCP by another test's connection, so try a few.
	var pc net.PacketConn
	var ln net.Listener
	for i := 0; ln == nil; i++ {
		var err error
		if pc, err = net.ListenPacket("udp", "127.0.0.1:0"); err != nil {
			t.Fatal(err)
		}
		if ln, err = net.Listen("tcp", pc.LocalAddr().String()); err != nil {
			pc.Close()
			if i == 20 {
				t.Fatal(err)
			}
		}
	}
	udpSrv := &mdns.Server{PacketConn: pc, Handler: h}
	tcpSrv := &mdns.Server{Listener: ln, Handler: h}
	go udpSrv.ActivateAndServe()
	go tcpSrv.ActivateAndServe()
	t.Cleanup(func() { udpSrv.Shutdown(); tcpSrv.Shutdown() })
	return netip.MustParseAddrPort(pc.LocalAddr().String()), &asked
}

func (sb *sandbox) query(t *testing.T, server netip.AddrPort, name string, qtype uint16, overTCP bool) *mdns.Msg {
	t.Helper()
	m := new(mdns.Msg)
	m.SetQuestion(name, qtype)
	var conn net.Conn
	var err error
	if overTCP {
		conn, err = sb.dial(t, server)
		if err != nil {
			t.Fatal(err)
		}
	} else {
		conn = sb.dialUDP(t, server)
	}
	defer conn.Close()
	co := &mdns.Conn{Conn: conn, UDPSize: 65535}
	conn.SetDeadline(time.Now().Add(5 * time.Second))
	if err := co.WriteMsg(m); err != nil {
		t.Fatal(err)
	}
	r, err := co.ReadMsg()
	if err != nil {
		t.Fatalf("query %s: %v", name, err)
	}
	return r
}

func TestDNSAndDomainRules(t *testing.T) {
	up, asked := dnsUpstream(t)
	srv := echoServer(t, "tcp", "127.0.0.1:0")
	p := &policy.Policy{DefaultDeny: true, AllowDomains: []string{"allowed.test"}, DenyDomains: []string{"denied.test"}}
	sb := newSandbox(t, p, up)
	gw := netip.AddrPortFrom(sb.plan.Gateway4, 53)

	// Before any lookup the address is not attributed to a name.
	if _, err := sb.dial(t, remote(srv)); err == nil {
		t.Fatal("connected to an allowed name's address before resolving it")
	}
	r := sb.query(t, gw, "allowed.test.", mdns.TypeA, false)
	if len(r.Answer) != 1 {
		t.Fatalf("answer %v", r)
	}
	c, err := sb.dial(t, remote(srv))
	if err != nil {
		t.Fatalf("connect after resolving an allowed name: %v", err)
	}
	c.Close()

	// Denied and unlisted names: NODATA, never sent upstream.
	for _, n := range []string{"x.denied.test.", "exfil-data.attacker.test."} {
		r := sb.query(t, gw, n, mdns.TypeA, false)
		if r.Rcode != mdns.RcodeSuccess || len(r.Answer) != 0 {
			t.Fatalf("%s: %v, want NODATA", n, r)
		}
		if _, ok := asked.Load(n); ok {
			t.Fatalf("%s was sent upstream", n)
		}
	}
	if _, ok := sb.events.find(flowlog.PolicyViolation, func(e flowlog.Event) bool { return e.QName == "x.denied.test" }); !ok {
		t.Fatal("no policy_violation for the denied name")
	}

	// DNS over TCP, and to another resolver's address: answered by ours.
	if r := sb.query(t, netip.AddrPortFrom(sb.plan.Gateway6, 53), "allowed.test.", mdns.TypeA, true); len(r.Answer) != 1 {
		t.Fatalf("DNS over TCP on the IPv6 gateway: %v", r)
	}
	other := netip.MustParseAddrPort("203.0.113.44:53")
	if r := sb.query(t, other, "allowed.test.", mdns.TypeA, false); len(r.Answer) != 1 {
		t.Fatalf("DNS to another resolver was not answered by the engine: %v", r)
	}
	if r := sb.query(t, other, "x.denied.test.", mdns.TypeA, true); len(r.Answer) != 0 {
		t.Fatalf("denied name resolved through another resolver over TCP: %v", r)
	}
	// DNS over TLS is refused outright.
	if _, err := sb.dial(t, netip.MustParseAddrPort("203.0.113.44:853")); err == nil {
		t.Fatal("DoT connection was allowed")
	}
}

func TestDNSCNAMEChainAndOwnerNames(t *testing.T) {
	up, _ := dnsUpstream(t)
	sb := newSandbox(t, &policy.Policy{}, up)
	gw := netip.AddrPortFrom(sb.plan.Gateway4, 53)
	sb.query(t, gw, "alias.test.", mdns.TypeA, false)
	names := sb.eng.cache.Names(netip.MustParseAddr("192.0.2.1"))
	if strings.Join(names, ",") != "alias.test,allowed.test" {
		t.Fatalf("names for 192.0.2.1 = %v, want the CNAME chain", names)
	}
	if n := sb.eng.cache.Names(netip.MustParseAddr("192.0.2.9")); len(n) != 0 {
		t.Fatalf("record with an owner off the chain was attributed: %v", n)
	}
	// A truncated UDP answer is completed over TCP by the engine.
	r := sb.query(t, gw, "big.test.", mdns.TypeA, false)
	if !r.Truncated || len(sb.eng.cache.Names(netip.MustParseAddr("192.0.2.60"))) == 0 {
		t.Fatalf("last address of a large answer not recorded (answer had %d records, tc=%v)", len(r.Answer), r.Truncated)
	}
}

func TestDNSAliasOfADeniedNameIsWithheld(t *testing.T) {
	up, _ := dnsUpstream(t)
	sb := newSandbox(t, &policy.Policy{DenyDomains: []string{"allowed.test"}}, up)
	r := sb.query(t, netip.AddrPortFrom(sb.plan.Gateway4, 53), "alias.test.", mdns.TypeA, false)
	if len(r.Answer) != 0 {
		t.Fatalf("alias of a denied name answered: %v", r)
	}
	if n := sb.eng.cache.Names(netip.MustParseAddr("192.0.2.1")); len(n) != 0 {
		t.Fatalf("withheld answer was recorded: %v", n)
	}
	v, ok := sb.events.find(flowlog.PolicyViolation, func(e flowlog.Event) bool { return e.QName == "alias.test" })
	if !ok || v.MatchedDomain != "allowed.test" || v.ReasonCode != policy.ReasonDenyDomain {
		t.Fatalf("violation %+v (found %v)", v, ok)
	}
}

func TestDNSRefusesGarbage(t *testing.T) {
	up, _ := dnsUpstream(t)
	sb := newSandbox(t, &policy.Policy{}, up)
	c := sb.dialUDP(t, netip.AddrPortFrom(sb.plan.Gateway4, 53))
	garbage := []byte{0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0, 0, 0, 0, 0, 0, 0xff, 0xff}
	c.Write(garbage)
	c.SetReadDeadline(time.Now().Add(2 * time.Second))
	buf := make([]byte, 512)
	n, err := c.Read(buf)
	if err != nil {
		t.Fatal(err)
	}
	if n < 12 || buf[0] != 0x12 || buf[1] != 0x34 || buf[3]&0xf != mdns.RcodeRefused {
		t.Fatalf("reply % x, want REFUSED with the query id", buf[:n])
	}
}

func TestFlowLimit(t *testing.T) {
	srv := echoServer(t, "tcp", "127.0.0.1:0")
	fds, _ := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET, 0)
	unix.Close(fds[1])
	plan, _ := netplan.Choose(nil, 0)
	if _, err := New(Config{Link: os.NewFile(uintptr(fds[0]), "x"), Plan: plan}); err == nil {
		t.Fatal("engine without a policy was accepted")
	}
	sb := newSandboxWith(t, allowAll, func(c *Config) { c.MaxFlows = 2 })
	var conns []net.Conn
	for i := 0; i < 2; i++ {
		c, err := sb.dial(t, remote(srv))
		if err != nil {
			t.Fatal(err)
		}
		conns = append(conns, c)
	}
	for i := 0; i < 2; i++ {
		if _, err := sb.dial(t, remote(srv)); err == nil || !errors.Is(err, syscall.ECONNREFUSED) && !strings.Contains(err.Error(), "refused") {
			t.Fatalf("flow over the limit: %v, want refused", err)
		}
	}
	// The limit is a runtime_failure in the flow log, once.
	if _, ok := sb.events.find(flowlog.RuntimeFailure, func(e flowlog.Event) bool { return strings.Contains(e.Error, "2 flows") }); !ok {
		t.Fatal("no runtime_failure for the flow limit")
	}
	if n := sb.events.count(flowlog.RuntimeFailure); n != 1 {
		t.Fatalf("%d runtime_failure events, want 1", n)
	}
	for _, c := range conns {
		c.Close()
	}
}

// At the flow limit, the UDP flow idle longest ends to make room for a
// new flow, TCP or UDP: a sandbox starting UDP flows faster than they
// idle out would otherwise have every new flow refused.
func TestTheFlowIdleLongestMakesRoom(t *testing.T) {
	tcpSrv := echoServer(t, "tcp", "127.0.0.1:0")
	udpSrv := udpEchoServer(t)
	sb := newSandboxWith(t, allowAll, func(c *Config) { c.MaxFlows, c.UDPIdleTimeout = 3, time.Minute })
	// Each datagram gets two answers from the UDP server, both read so
	// that none is left for the next exchange; the TCP echo one.
	exchange := func(c net.Conn, answers ...string) error {
		c.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := c.Write([]byte("ping")); err != nil {
			return err
		}
		for _, want := range answers {
			b := make([]byte, 64)
			n, err := c.Read(b)
			if err != nil {
				return err
			}
			if string(b[:n]) != want {
				return fmt.Errorf("got %q, want %q", b[:n], want)
			}
		}
		return nil
	}
	udp := func(c net.Conn) error { return exchange(c, "ping", "again:ping") }
	var flows []net.Conn
	for range 3 {
		c := sb.dialUDP(t, remote(udpSrv))
		if err := udp(c); err != nil {
			t.Fatal(err)
		}
		flows = append(flows, c)
	}
	time.Sleep(minIdleToEnd + 100*time.Millisecond)
	// The first two flows are busy again: the third is idle longest.
	for _, c := range flows[:2] {
		if err := udp(c); err != nil {
			t.Fatal(err)
		}
	}
	c, err := sb.dial(t, remote(tcpSrv))
	if err != nil {
		t.Fatalf("a TCP flow with the limit held by UDP flows idle for a second: %v", err)
	}
	defer c.Close()
	if err := exchange(c, "ping"); err != nil {
		t.Fatal(err)
	}
	third := flows[2].LocalAddr().String()
	if _, ok := sb.events.find(flowlog.FlowEnd, func(e flowlog.Event) bool { return e.Src == third }); !ok {
		t.Error("the flow idle longest did not end")
	}
	for _, c := range flows[:2] {
		if err := udp(c); err != nil {
			t.Errorf("a busy flow was ended: %v", err)
		}
	}
}

// Engines given one FlowBudget hold at most that many flows together,
// questions to the upstream resolvers counted; a flow refused for it
// leaves the engine's own slot free.
func TestSharedFlowBudget(t *testing.T) {
	srv := echoServer(t, "tcp", "127.0.0.1:0")
	up, asked := dnsUpstream(t)
	budget := NewFlowBudget(2)
	shared := func(c *Config) { c.Flows, c.MaxFlows = budget, 2 }
	a, b := newSandboxWith(t, allowAll, shared), newSandboxWith(t, allowAll, shared, up)
	held, err := a.dial(t, remote(srv))
	if err != nil {
		t.Fatal(err)
	}
	c, err := b.dial(t, remote(srv))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.dial(t, remote(srv)); err == nil {
		t.Fatal("a third flow of two engines sharing a budget of 2 was relayed")
	}
	if _, ok := b.events.find(flowlog.RuntimeFailure, func(e flowlog.Event) bool { return strings.Contains(e.Error, "--max-flows") }); !ok {
		t.Error("no runtime_failure naming the node's limit")
	}
	gw := netip.AddrPortFrom(b.plan.Gateway4, 53)
	if r := b.query(t, gw, "allowed.test.", mdns.TypeA, false); r.Rcode != mdns.RcodeServerFailure {
		t.Errorf("a question with the budget spent got %s, want SERVFAIL", mdns.RcodeToString[r.Rcode])
	}
	if _, ok := asked.Load("allowed.test."); ok {
		t.Error("a question with the budget spent reached the upstream resolver")
	}
	held.Close()
	for i := 0; ; i++ { // the engine ends the flow when it sees the close
		c2, err := b.dial(t, remote(srv))
		if err == nil {
			c2.Close()
			break
		}
		if i == 50 {
			t.Fatalf("no slot came free after a flow ended: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	c.Close()
	for i := 0; ; i++ { // once the engine has seen the closes
		r := b.query(t, gw, "allowed.test.", mdns.TypeA, false)
		if r.Rcode == mdns.RcodeSuccess && len(r.Answer) == 1 {
			break
		}
		if i == 50 {
			t.Fatalf("with slots free: %v", r)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func TestDNSFloodIsBounded(t *testing.T) {
	// An upstream that never answers: every query waits for its timeout.
	pc, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	sb := newSandbox(t, &policy.Policy{}, netip.MustParseAddrPort(pc.LocalAddr().String()))
	c := sb.dialUDP(t, netip.AddrPortFrom(sb.plan.Gateway4, 53))
	m := new(mdns.Msg)
	before := runtime.NumGoroutine()
	// The client stack may push back on its own full send buffer.
	c.SetWriteDeadline(time.Now().Add(5 * time.Second))
	sent := 0
	for i := 0; i < 2000; i++ {
		m.SetQuestion(fmt.Sprintf("flood%d.test.", i), mdns.TypeA)
		b, _ := m.Pack()
		if _, err := c.Write(b); err != nil {
			break
		}
		sent++
	}
	if sent < 2*cap(sb.eng.dnsSem) {
		t.Fatalf("only %d queries sent: the flood did not exceed the bound", sent)
	}
	time.Sleep(300 * time.Millisecond)
	if grown := runtime.NumGoroutine() - before; grown > 2*cap(sb.eng.dnsSem)+50 {
		t.Fatalf("%d goroutines for a flood of 2000 queries, want about %d at most", grown, cap(sb.eng.dnsSem))
	}
	if n := sb.events.count(flowlog.RuntimeFailure); n != 1 {
		t.Fatalf("%d runtime_failure events for the dropped queries, want 1", n)
	}
}

func testMTU() int {
	if v, err := strconv.Atoi(os.Getenv("CF_TEST_MTU")); err == nil {
		return v
	}
	return 65000
}

func tcpStats(st tcpip.Stats) string {
	t := st.TCP
	return fmt.Sprintf("sent %d retrans %d timeouts %d sendErr %d fastRetrans %d sackRecov %d tlp %d invalidRx %d rxDropped(nic) %d ipOutErr %d",
		t.SegmentsSent.Value(), t.Retransmits.Value(), t.Timeouts.Value(), t.SegmentSendErrors.Value(), t.FastRetransmit.Value(),
		t.SACKRecovery.Value(), t.TLPRecovery.Value(), t.InvalidSegmentsReceived.Value(), st.NICs.Rx.Packets.Value(), st.IP.OutgoingPacketErrors.Value())
}

// A server that closes first leaves the engine's side in TIME_WAIT while
// the sandbox may reuse its port at once (Linux does). The new SYN must
// be answered, not dropped until TIME_WAIT ends.
func TestSourcePortReusedAfterServerClose(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			c.Write([]byte("x"))
			c.Close() // the server closes first
		}
	}()
	sb := newSandbox(t, allowAll)
	srv := netip.MustParseAddrPort(ln.Addr().String())
	local := tcpip.FullAddress{NIC: 1, Addr: tcpip.AddrFromSlice(sb.plan.Sandbox4.AsSlice()), Port: 40123}
	for i := 0; i < 3; i++ {
		ctx, cancel := context.WithTimeout(context.Background(), 900*time.Millisecond)
		start := time.Now()
		c, err := gonet.DialTCPWithBind(ctx, sb.s, local, full(remote(srv)), ipv4.ProtocolNumber)
		cancel()
		if err != nil {
			t.Fatalf("connection %d from the same port: %v after %v", i+1, err, time.Since(start))
		}
		io.ReadAll(c)
		c.Close()
		time.Sleep(10 * time.Millisecond) // our side's last ACK
	}
}

// recordingProxy is a socks5h proxy at an address that is not this
// host's, whose connections land on a SOCKS5 server on loopback that
// tells, for each, the target it was asked for (a name or an address),
// and then echoes.
func recordingProxy(t *testing.T) (*proxy.Proxy, chan string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	targets := make(chan string, 16)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				b := make([]byte, 262)
				// Greeting: version, n methods, methods; we take "none".
				if _, err := io.ReadFull(c, b[:2]); err != nil || b[0] != 5 {
					return
				}
				io.ReadFull(c, b[:b[1]])
				c.Write([]byte{5, 0})
				// Request: version, connect, reserved, address type.
				if _, err := io.ReadFull(c, b[:4]); err != nil {
					return
				}
				var target string
				switch b[3] {
				case 1, 4:
					a := make([]byte, 4+12*int(b[3]/4))
					io.ReadFull(c, a)
					ip, _ := netip.AddrFromSlice(a)
					target = ip.String()
				case 3:
					io.ReadFull(c, b[:1])
					n := int(b[0])
					io.ReadFull(c, b[:n])
					target = string(b[:n])
				}
				io.ReadFull(c, b[:2]) // port
				targets <- target
				c.Write([]byte{5, 0, 0, 1, 0, 0, 0, 0, 0, 0})
				io.Copy(c, c)
			}()
		}
	}()
	fwd, err := proxy.Parse(profile.FlagName, "socks5h://203.0.113.30:1080", "", "", false)
	if err != nil {
		t.Fatal(err)
	}
	return fwd.Via(func(ctx context.Context, network, _ string) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, network, ln.Addr().String())
	}), targets
}

// A proxy told a name resolves it itself and may get another address
// than the sandbox did. It is told the name only where any address would
// have been allowed: not for a container's flow (the identity endpoints,
// which no container reaches, would be among them), nor under a
// deny-cidr.
func TestAProxyIsToldANameOnlyWhereAnyAddressWouldDo(t *testing.T) {
	up, _ := dnsUpstream(t)
	fwd, targets := recordingProxy(t)
	for _, tc := range []struct {
		why       string
		p         *policy.Policy
		ownsHost  bool
		wantNamed bool
	}{
		{"exec, the default policy", &policy.Policy{}, true, true},
		{"exec, a deny-cidr", &policy.Policy{DenyCIDRs: []netip.Prefix{netip.MustParsePrefix("198.51.100.0/24")}}, true, false},
		{"a container, the default policy", &policy.Policy{}, false, false},
	} {
		sb := newSandboxWith(t, tc.p, func(c *Config) { c.Proxy, c.CallerOwnsHost = fwd, tc.ownsHost }, up)
		if r := sb.query(t, netip.AddrPortFrom(sb.plan.Gateway4, 53), "allowed.test.", mdns.TypeA, false); len(r.Answer) != 1 {
			t.Fatalf("%s: answer %v", tc.why, r)
		}
		c, err := sb.dial(t, netip.MustParseAddrPort("192.0.2.1:80"))
		if err != nil {
			t.Fatalf("%s: %v", tc.why, err)
		}
		c.Close()
		want := "192.0.2.1"
		if tc.wantNamed {
			want = "allowed.test"
		}
		if got := <-targets; got != want {
			t.Errorf("%s: the proxy was asked for %q, want %q", tc.why, got, want)
		}
	}
}

// A DNS label may hold any byte, which the resolver writes escaped: a
// name under an allowed wildcard zone whose escaped form is longer than
// SOCKS5's length byte holds was cut short at the proxy, which took its
// first 11 bytes, "denied.test", for the name. A name that is no plain
// host name reaches the proxy as the address.
func TestAProxyIsToldOnlyPlainNames(t *testing.T) {
	up, _ := dnsUpstream(t)
	fwd, targets := recordingProxy(t)
	p := &policy.Policy{DefaultDeny: true, AllowDomains: []string{"wild.test"}, DenyDomains: []string{"denied.test"}}
	sb := newSandboxWith(t, p, func(c *Config) { c.Proxy, c.CallerOwnsHost = fwd, true }, up)
	// 61 bytes 0x01 (written \001) and an "a": 12 + 245 + 10 = 267
	// characters, 11 more than 256.
	name := "denied.test." + strings.Repeat(`\001`, 61) + "a.wild.test."
	for _, n := range []string{"plain.wild.test.", name} {
		if r := sb.query(t, netip.AddrPortFrom(sb.plan.Gateway4, 53), n, mdns.TypeA, false); len(r.Answer) != 1 {
			t.Fatalf("%s: answer %v", n, r)
		}
		c, err := sb.dial(t, netip.MustParseAddrPort("192.0.2.1:80"))
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
		want := "plain.wild.test"
		if n == name {
			want = "192.0.2.1"
		}
		if got := <-targets; got != want {
			t.Errorf("after resolving %q the proxy was asked for %q, want %q", n, got, want)
		}
	}
}

// A reset travels as a reset both ways: a peer's abort taken for an end
// would pass a truncated stream off as complete. What the server sent
// before its reset still reaches the sandbox first, as from a kernel,
// even where the sandbox reads only after the reset.
func TestTCPResetsTravelAsResets(t *testing.T) {
	// The flow log's flow_end names the side whose reset ended the flow.
	resetBy := func(t *testing.T, sb *sandbox, srv netip.AddrPort, want string) {
		t.Helper()
		for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
			if end, ok := sb.events.find(flowlog.FlowEnd, func(e flowlog.Event) bool { return e.DstPort == srv.Port() }); ok {
				if end.ResetBy != want {
					t.Errorf("flow_end reset_by %q, want %q", end.ResetBy, want)
				}
				return
			}
			if time.Now().After(deadline) {
				t.Fatal("no flow_end")
			}
		}
	}
	t.Run("from upstream", func(t *testing.T) {
		const size = 1 << 20
		reset := make(chan error, 1)
		srv := tcpServer(t, func(c *net.TCPConn) {
			_, err := c.Write(make([]byte, size))
			// All of it with the engine's kernel before the reset drops
			// what the server still holds.
			for deadline := time.Now().Add(10 * time.Second); err == nil && outq(c) > 0; time.Sleep(time.Millisecond) {
				if time.Now().After(deadline) {
					err = errors.New("the engine took nothing for 10 s")
				}
			}
			c.SetLinger(0)
			c.Close()
			reset <- err
		})
		sb := newSandbox(t, allowAll)
		// A small window keeps most of the data queued in the engine
		// when the reset comes.
		rcv := tcpip.TCPReceiveBufferSizeRangeOption{Min: 4 << 10, Default: 16 << 10, Max: 16 << 10}
		sb.s.SetTransportProtocolOption(tcp.ProtocolNumber, &rcv)
		c, err := sb.dial(t, remote(srv))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(time.Minute))
		if err := <-reset; err != nil {
			t.Fatal(err)
		}
		got, err := io.ReadAll(c)
		if len(got) != size || err == nil || !strings.Contains(err.Error(), "reset") {
			t.Fatalf("the sandbox read %d bytes, then %v; want all %d, then a reset", len(got), err, size)
		}
		resetBy(t, sb, srv, flowlog.ResetByDestination)
	})
	// A server that answers an upload it refuses and resets while the
	// sandbox still sends: the reset reaches the engine's writer first,
	// and the answer must still arrive whole before it.
	t.Run("from upstream while the sandbox sends", func(t *testing.T) {
		const size = 256 << 10
		reset := make(chan error, 1)
		srv := tcpServer(t, func(c *net.TCPConn) {
			_, err := io.ReadFull(c, make([]byte, 64<<10))
			if err == nil {
				_, err = c.Write(make([]byte, size))
			}
			for deadline := time.Now().Add(10 * time.Second); err == nil && outq(c) > 0; time.Sleep(time.Millisecond) {
				if time.Now().After(deadline) {
					err = errors.New("the engine took nothing for 10 s")
				}
			}
			c.SetLinger(0)
			c.Close()
			reset <- err
		})
		sb := newSandbox(t, allowAll)
		rcv := tcpip.TCPReceiveBufferSizeRangeOption{Min: 4 << 10, Default: 16 << 10, Max: 16 << 10}
		sb.s.SetTransportProtocolOption(tcp.ProtocolNumber, &rcv)
		c, err := sb.dial(t, remote(srv))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(time.Minute))
		sent := make(chan error, 1)
		go func() {
			chunk := make([]byte, 64<<10)
			for {
				if _, err := c.Write(chunk); err != nil {
					sent <- err
					return
				}
			}
		}()
		if err := <-reset; err != nil {
			t.Fatal(err)
		}
		got, err := io.ReadAll(c)
		if err == nil {
			// A kernel tells of a reset once: here the writer was told.
			err = <-sent
		}
		if len(got) != size || err == nil || !strings.Contains(err.Error(), "reset") {
			t.Fatalf("the sandbox read %d bytes, then %v; want all %d, then a reset", len(got), err, size)
		}
		resetBy(t, sb, srv, flowlog.ResetByDestination)
	})
	// A sandbox's reset reaches the server, whether the engine had the
	// connection (it relayed a first answer) or the reset came as the
	// handshake ended (the engine's accept fails: the upstream is reset).
	for _, relayed := range []bool{true, false} {
		t.Run(fmt.Sprintf("from the sandbox/relayed=%v", relayed), func(t *testing.T) {
			ended := make(chan error, 1)
			srv := tcpServer(t, func(c *net.TCPConn) {
				if relayed {
					c.Write([]byte("relayed"))
				}
				_, err := io.Copy(io.Discard, c)
				ended <- err
			})
			sb := newSandbox(t, allowAll)
			var wq waiter.Queue
			ep, terr := sb.s.NewEndpoint(tcp.ProtocolNumber, ipv4.ProtocolNumber, &wq)
			if terr != nil {
				t.Fatal(terr)
			}
			entry, notified := waiter.NewChannelEntry(waiter.WritableEvents | waiter.EventErr | waiter.EventHUp)
			wq.EventRegister(&entry)
			ep.Connect(full(remote(srv)))
			for tcp.EndpointState(ep.State()) != tcp.StateEstablished {
				select {
				case <-notified:
				case <-time.After(10 * time.Second):
					t.Fatalf("no connection in 10 s (%v)", tcp.EndpointState(ep.State()))
				}
			}
			wq.EventUnregister(&entry)
			c := gonet.NewTCPConn(&wq, ep)
			c.SetDeadline(time.Now().Add(10 * time.Second))
			if relayed {
				if _, err := io.ReadFull(c, make([]byte, len("relayed"))); err != nil {
					t.Fatal(err)
				}
			}
			if _, err := c.Write([]byte("partial upload")); err != nil {
				t.Fatal(err)
			}
			ep.Abort()
			c.Close()
			select {
			case err := <-ended:
				if !errors.Is(err, syscall.ECONNRESET) {
					t.Fatalf("the server's read ended with %v, want a reset", err)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("the server's read did not end in 10 s")
			}
			if relayed {
				resetBy(t, sb, srv, flowlog.ResetBySandbox)
			}
		})
	}
}

// tcpServer runs serve for each connection to a loopback listener.
func tcpServer(t *testing.T, serve func(*net.TCPConn)) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				serve(c.(*net.TCPConn))
			}()
		}
	}()
	return netip.MustParseAddrPort(ln.Addr().String())
}

// outq is what c has sent and not had acknowledged, or not sent yet.
func outq(c *net.TCPConn) int {
	raw, err := c.SyscallConn()
	if err != nil {
		return -1
	}
	n := -1
	raw.Control(func(fd uintptr) { n, _ = unix.IoctlGetInt(int(fd), unix.SIOCOUTQ) })
	return n
}

// TestLingerPassesOnTheLastDatagrams: datagrams the sandbox sent just
// before its end are passed on before the engine closes, though the
// flows' handlers are slow to dial (here 200 ms) and no flow has been
// counted yet; a DNS query waiting for a resolver that never answers is
// not waited for.
func TestLingerPassesOnTheLastDatagrams(t *testing.T) {
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	var got sync.Map
	go func() {
		buf := make([]byte, 100)
		for {
			n, _, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			got.Store(string(buf[:n]), true)
		}
	}()
	silent, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	sb := newSandboxWith(t, allowAll, func(c *Config) {
		c.Dial = func(ctx context.Context, network, address string) (net.Conn, error) {
			time.Sleep(200 * time.Millisecond)
			return toLoopback(ctx, network, address)
		}
	}, netip.MustParseAddrPort(silent.LocalAddr().String()))
	dst := remote(netip.MustParseAddrPort(pc.LocalAddr().String()))
	want := []string{"a1", "a2", "a3", "b1"}
	a, b := sb.dialUDP(t, dst), sb.dialUDP(t, dst)
	for _, d := range want {
		c := a
		if d[0] == 'b' {
			c = b
		}
		if _, err := c.Write([]byte(d)); err != nil {
			t.Fatal(err)
		}
	}
	q := new(mdns.Msg)
	q.SetQuestion("waits.test.", mdns.TypeA)
	query, _ := q.Pack()
	sb.dialUDP(t, netip.MustParseAddrPort("192.0.2.53:53")).Write(query)

	start := time.Now()
	sb.eng.Linger(LingerMax)
	took := time.Since(start)
	sb.eng.Close()
	time.Sleep(100 * time.Millisecond) // the loopback's delivery
	for _, d := range want {
		if _, ok := got.Load(d); !ok {
			t.Errorf("datagram %q was not passed on (lingered %v)", d, took)
		}
	}
	if took > time.Second {
		t.Errorf("lingered %v: waited for the DNS query's answer", took)
	}
}
