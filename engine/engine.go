// Package engine is one sandbox's relay: it runs the sandbox-side network
// stack on the sandbox's TUN, decides every flow with the policy, carries
// allowed flows over host sockets and reports what happened as flow-log
// events. It holds no process-global state: a daemon runs one Engine per
// sandbox.
package engine

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"gvisor.dev/gvisor/pkg/buffer"

	"github.com/childflow/childflow/engine/dns"
	"github.com/childflow/childflow/engine/flowlog"
	"github.com/childflow/childflow/engine/netstack"
	"github.com/childflow/childflow/engine/proxy"
	"github.com/childflow/childflow/engine/upstream"
	"github.com/childflow/childflow/internal/netplan"
	"github.com/childflow/childflow/internal/procnet"
	"github.com/childflow/childflow/policy"
)

// Config describes one sandbox.
type Config struct {
	// ID names the sandbox in events.
	ID string
	// Link is the TUN queue (in tests: a datagram socket) carrying the
	// sandbox's IP packets. The engine owns it and closes it on Close.
	// Nil: Start prepares the stack and Attach gives it the link.
	Link   *os.File
	Plan   netplan.Plan
	Policy *policy.Policy
	// DNS are the upstream resolvers the engine's resolver forwards to.
	DNS []netip.AddrPort
	// Hosts are the names the sandbox's hosts file gives addresses
	// (dns.ParseHosts): flows to them carry those names, for the domain
	// rules and the flow log, as if the engine had answered them.
	Hosts map[netip.Addr][]string

	// Proxy, if set, carries every TCP flow; nothing falls back to a
	// direct connection when it fails.
	Proxy *proxy.Proxy
	// CallerOwnsHost says the sandbox runs for whoever owns the host
	// (childflow exec): its gateway stands for the host's loopback, and
	// the metadata services that answer with the host's identity are
	// the caller's own, reachable unless the policy blocks them. Without
	// it (the node daemon, whose containers' settings whoever created
	// them wrote, and whose connections leave from the node) nothing the
	// engine opens for the sandbox, a flow or the proxy's connection,
	// goes to the host's loopback, where services trust local callers,
	// and no flow reaches those metadata services, which would answer
	// with the node's identity, not the container's.
	CallerOwnsHost bool
	// Dial opens upstream connections. Nil: a net.Dialer whose UDP
	// sockets refuse broadcast addresses and which, without
	// CallerOwnsHost, refuses the host's loopback.
	Dial func(ctx context.Context, network, address string) (net.Conn, error)
	// Capture, if set, is given every IP packet on the sandbox's link (the
	// child view), sharing the relay's buffers; it owns packet and must
	// Release it. outbound means sent by the sandbox. It must not block.
	Capture func(outbound bool, packet buffer.Buffer)
	// SandboxPID is the sandbox init's pid on the host, used to attribute
	// flows to processes in the flow log: its descendants own the
	// sandbox's sockets. SandboxNetns, the inode of the sandbox's network
	// namespace, says to look among the processes in it instead (a
	// container's execs, a pod's containers). Both zero: not attributed.
	SandboxPID   int
	SandboxNetns uint64
	// SocketDiag, if set, is a NETLINK_SOCK_DIAG socket inside the
	// sandbox: the attribution then looks each socket up by its 4-tuple
	// instead of reading the sandbox's whole socket table.
	SocketDiag *os.File
	// OnEvent receives every flow-log event. Nil: events are discarded.
	// It must not block.
	OnEvent func(flowlog.Event)
	// OnUpstream is told each host socket the engine opens for the
	// sandbox (connections, UDP flows, the proxy, questions to upstream
	// resolvers), bound before its first packet leaves, and when it is
	// done: the egress capture views follow these. It is only told of
	// sockets from the default Dial. Nil: nobody is told. It must not block.
	OnUpstream upstream.Func

	// Limits; zero means the default.
	DialTimeout    time.Duration // 10 s
	UDPIdleTimeout time.Duration // 60 s
	MaxFlows       int           // DefaultMaxFlows open flows
	MaxHalfOpen    int           // 512 TCP handshakes waiting for upstream
	MaxDNSInFlight int           // 128 queries waiting for upstream
	MaxEchoes      int           // 256 echo requests waiting for their answer
	// Flows, if set, bounds the flows of every engine given it together
	// (the node daemon's sandboxes), besides each engine's MaxFlows.
	Flows *FlowBudget
	// Buffers bound what the TCP flows may buffer before new ones get
	// small buffers; engines given the same budget share it. Nil: one of
	// the engine's own, DefaultBufferBudget.
	Buffers *BufferBudget
}

// DefaultMaxFlows is how many flows a sandbox may hold open at once.
const DefaultMaxFlows = 8192

// FlowBudget bounds the open flows of several engines together. The
// node daemon's sandboxes share the node's ephemeral ports: each UDP
// flow holds one of its own, and a few sandboxes at their MaxFlows would
// hold them all, and the node could no longer open a socket (its
// resolver, its kubelet).
type FlowBudget struct{ slots slots }

// NewFlowBudget is a budget of n flows.
func NewFlowBudget(n int) *FlowBudget { return &FlowBudget{slots: make(slots, n)} }

// slots is a semaphore whose take never waits: a limit reached refuses.
type slots chan struct{}

func (s slots) take() bool {
	select {
	case s <- struct{}{}:
		return true
	default:
		return false
	}
}

func (s slots) give() { <-s }

// roomWait is how long a new flow may wait for the one ended to make
// room for it (takeFlow).
const roomWait = time.Second

// takeWithin is take, waiting up to d for a slot.
func (s slots) takeWithin(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case s <- struct{}{}:
		return true
	case <-t.C:
		return false
	}
}

// Engine relays one sandbox.
type Engine struct {
	cfg      Config
	policy   atomic.Pointer[policy.Policy] // with the host's addresses of the moment
	cache    dns.Cache
	resolver *dns.Resolver
	stack    *netstack.Stack
	owners   *procnet.Finder

	ctx     context.Context
	cancel  context.CancelFunc
	wg      sync.WaitGroup // the engine's goroutines and its flows
	flows   slots          // open flows
	idle    idleFlows      // those that end when idle
	dnsSem  slots          // queries waiting for upstream
	echoSem slots          // echo requests waiting for answers

	events    flowlog.Emitter
	uploads   atomic.Int64 // TCP flows still relaying what the sandbox sends
	closeOnce sync.Once
	closeMu   sync.RWMutex
	closing   bool // no new flows: Close waits for those there are

	echoMu sync.Mutex
	echoes map[echoKey]*echoFlow // ping sessions
}

// New validates cfg. Nothing runs until Start.
func New(cfg Config) (*Engine, error) {
	if cfg.Policy == nil {
		return nil, errors.New("engine: no policy")
	}
	if !cfg.Plan.Gateway4.IsValid() || !cfg.Plan.Gateway6.IsValid() {
		return nil, errors.New("engine: network plan has no gateway addresses")
	}
	setDefault(&cfg.DialTimeout, 10*time.Second)
	setDefault(&cfg.UDPIdleTimeout, 60*time.Second)
	setDefault(&cfg.MaxFlows, DefaultMaxFlows)
	setDefault(&cfg.MaxDNSInFlight, dns.DefaultMaxInFlight)
	setDefault(&cfg.MaxEchoes, 256)
	if cfg.Buffers == nil {
		cfg.Buffers = NewBufferBudget(DefaultBufferBudget)
	}
	if cfg.Dial == nil {
		// No keepalive probes upstream (four setsockopts per connection):
		// like a socket the sandbox opened itself, which has none unless
		// it asks, and that setting stays with the engine's stack.
		control := upstream.NoBroadcast
		if !cfg.CallerOwnsHost {
			control = refuseHostLoopback
		}
		cfg.Dial = upstream.Dialer(&net.Dialer{KeepAlive: -1, Control: control}).DialContext
	}
	if cfg.Proxy != nil && cfg.Proxy.DialContext == nil && !cfg.CallerOwnsHost {
		// A proxy named by host name may resolve to the loopback.
		cfg.Proxy = cfg.Proxy.Via(upstream.Dialer(&net.Dialer{Control: refuseHostLoopback}).DialContext)
	}
	e := &Engine{cfg: cfg, flows: make(slots, cfg.MaxFlows), dnsSem: make(slots, cfg.MaxDNSInFlight), echoSem: make(slots, cfg.MaxEchoes)}
	e.policy.Store(cfg.Policy) // and the host's addresses, from Start on
	e.events.Sandbox, e.events.OnEvent = cfg.ID, cfg.OnEvent
	e.owners = &procnet.Finder{InitPID: cfg.SandboxPID, Netns: cfg.SandboxNetns, Diag: cfg.SocketDiag}
	e.cache.Pin(cfg.Hosts)
	// A resolver at a broadcast address would have the sandbox's queries
	// sent to every host on a link, and take the first answer.
	e.resolver = &dns.Resolver{Upstreams: cfg.DNS, Policy: cfg.Policy, Cache: &e.cache, Events: &e.events, OnUpstream: cfg.OnUpstream,
		Dialer: &net.Dialer{Control: upstream.NoBroadcast}}
	if cfg.Flows != nil {
		e.resolver.Take = func() (func(), bool) { return e.giveNodeFlow, e.takeNodeFlow(false) }
	}
	return e, nil
}

func setDefault[T comparable](v *T, def T) {
	var zero T
	if *v == zero {
		*v = def
	}
}

// Start brings the stack up on the link and serves DNS on the gateway.
// Without a link yet, it gets everything else ready for Attach: a
// sandbox's namespaces and the engine are then built side by side.
func (e *Engine) Start(ctx context.Context) error {
	e.ctx, e.cancel = context.WithCancel(ctx)
	if err := e.followHostAddrs(); err != nil {
		e.cancel()
		return err
	}
	var err error
	e.stack, err = netstack.New(netstack.Config{
		Plan:        e.cfg.Plan,
		MaxHalfOpen: e.cfg.MaxHalfOpen,
		Handlers:    netstack.Handlers{TCP: e.handleTCP, UDP: e.handleUDP, Echo: e.handleEcho, Tap: e.cfg.Capture},
	})
	if err != nil {
		e.cancel()
		return err
	}
	if e.cfg.Link == nil {
		return nil
	}
	return e.attach()
}

// Attach gives an engine started without a link its link, and the
// sandbox's sock_diag socket (Config.SocketDiag) where there is one.
func (e *Engine) Attach(link, socketDiag *os.File) error {
	if e.stack == nil || e.cfg.Link != nil {
		link.Close()
		socketDiag.Close()
		return errors.New("engine: attach before start or twice")
	}
	e.cfg.Link, e.cfg.SocketDiag = link, socketDiag
	e.owners.Diag = socketDiag
	return e.attach()
}

func (e *Engine) attach() error {
	if err := e.stack.Attach(int(e.cfg.Link.Fd())); err != nil {
		e.Close()
		return err
	}
	for _, gw := range []netip.Addr{e.cfg.Plan.Gateway4, e.cfg.Plan.Gateway6} {
		addr := netip.AddrPortFrom(gw, 53)
		ln, err := e.stack.ListenTCP(addr)
		if err != nil {
			e.Close()
			return fmt.Errorf("serving DNS on %s/tcp: %w", addr, err)
		}
		pc, err := e.stack.ListenUDP(addr)
		if err != nil {
			ln.Close()
			e.Close()
			return fmt.Errorf("serving DNS on %s/udp: %w", addr, err)
		}
		e.goServe(func() { e.serveDNSListener(ln) }, ln.Close)
		e.goServe(func() { e.serveDNSPackets(pc) }, pc.Close)
	}
	return nil
}

// goServe runs serve until the engine closes, then calls stop.
func (e *Engine) goServe(serve func(), stop func() error) {
	e.wg.Add(2)
	go func() { defer e.wg.Done(); serve() }()
	go func() { defer e.wg.Done(); <-e.ctx.Done(); stop() }()
}

// LingerMax bounds how long Linger relays, once the command or container
// has exited, what its sandbox sent before: an upstream that stops
// reading must not hold the exit for longer.
const LingerMax = 5 * time.Second

// Linger waits, up to max, for what the sandbox sent before its command
// ended to be on its way: each TCP flow's upload relayed up to the
// sandbox's FIN (the host's kernel still delivers what an upstream socket
// holds once closed), every datagram on the TUN taken in and each UDP
// flow's passed on to its host socket, and the TUN quiet for a moment.
// Without it a command that writes and exits at once (nc -q0, a log
// shipper) lost the tail of its data: 2 of 5 uploads of 50 MB arrived
// short; and a datagram sent as the command exited was lost in 3 of 50
// runs, 15 of 100 with the host's CPUs busy, while the sandbox's only
// flow was not yet counted. A sandbox that sent nothing does not wait.
func (e *Engine) Linger(max time.Duration) {
	if e.stack == nil {
		return
	}
	settled := func() bool { return e.uploads.Load() == 0 && e.stack.Settled() }
	if e.events.Flows() == 0 && settled() {
		return
	}
	const quiet = 5 * time.Millisecond
	deadline := time.Now().Add(max)
	seen := e.stack.Received()
	for time.Now().Before(deadline) {
		time.Sleep(quiet)
		now := e.stack.Received()
		if now == seen && settled() {
			return
		}
		seen = now
	}
}

// Close stops the stack; open flows are cut.
func (e *Engine) Close() error {
	e.closeOnce.Do(func() {
		e.closeMu.Lock()
		e.closing = true
		e.closeMu.Unlock()
		if e.cancel != nil {
			e.cancel()
		}
		if e.stack != nil {
			e.stack.Close()
		}
		e.wg.Wait()
		if e.cfg.Link != nil {
			e.cfg.Link.Close()
		}
		if e.cfg.SocketDiag != nil {
			e.cfg.SocketDiag.Close()
		}
	})
	return nil
}

// Violations is the number of policy violations so far (--fail-on-leak).
func (e *Engine) Violations() uint64 { return e.events.Violations() }

// admit logs a new flow's connect_attempt and decides it. A denied flow
// is logged as a policy_violation and admit returns false. DNS over TLS
// or QUIC (port 853) is always denied: no resolver but the engine's.
func (e *Engine) admit(proto policy.Proto, src, dst netip.AddrPort, viaProxy bool) (flowlog.Event, bool) {
	names := e.cache.Names(dst.Addr())
	ev := e.events.Flow(proto, src, dst, names)
	if (e.cfg.SandboxPID != 0 || e.cfg.SandboxNetns != 0) && e.cfg.OnEvent != nil {
		// Only when someone records events: this reads the sandbox's /proc.
		if o, ok := e.owners.Find(string(proto), src, dst); ok {
			ev.PID, ev.Comm = o.PID, o.Comm
		}
	}
	d := e.policy.Load().Decide(policy.Flow{Proto: proto, Dst: dst, Names: names, ViaProxy: viaProxy})
	switch {
	case !d.Allow:
	case viaProxy && e.cfg.Proxy.IsSelf(dst):
		d = policy.ProxyLoop
	case e.cfg.CallerOwnsHost:
	default:
		if m, ok := e.hostLoopback(dst.Addr()); ok {
			d = policy.DenyCIDR(policy.ReasonHost, m)
		} else if m, ok := policy.IdentityEndpoint(dst.Addr()); ok {
			d = policy.DenyCIDR(policy.ReasonMetadata, m)
		}
	}
	return e.events.Attempt(ev, d), d.Allow
}

// acquire reserves a flow slot (takeFlow); false when the sandbox has
// too many flows or the engine is closing. Close waits for every slot's
// release, so no flow logs an event after Close returns (the flow log
// and the summary are closed then).
func (e *Engine) acquire(mayWait bool) bool {
	e.closeMu.RLock()
	closing := e.closing
	e.closeMu.RUnlock()
	if closing || !e.takeFlow(mayWait) {
		return false
	}
	e.closeMu.RLock()
	defer e.closeMu.RUnlock()
	if e.closing {
		e.giveFlow()
		return false
	}
	e.wg.Add(1)
	return true
}

// takeFlow reserves a flow of the sandbox's and of the node's. At either
// limit a flow idle for a second (UDP, DNS, ping; the idlest of a
// sample) ends to make room, as conntrack drops an unreplied entry when
// its table is full: without that, a sandbox starting new UDP flows
// faster than they idle out (statsd, a scan) would have every new flow
// refused, TCP too. mayWait says the caller may wait for it to go: not
// the goroutine that delivers the sandbox's packets.
func (e *Engine) takeFlow(mayWait bool) bool {
	if e.flows.take() {
		if e.takeNodeFlow(false) {
			return true
		}
		e.flows.give()
	}
	if !e.idle.endIdlest() {
		e.events.FailureOnce("flows", fmt.Sprintf("the sandbox holds %d flows, the engine's limit, none idle: new ones are refused until some end", cap(e.flows)))
		return false
	}
	e.events.FailureOnce("flows ended", fmt.Sprintf("the sandbox holds %d flows, the engine's limit: idle flows end to make room for new ones", cap(e.flows)))
	if !mayWait || !e.flows.takeWithin(roomWait) {
		return false
	}
	if !e.takeNodeFlow(true) {
		e.flows.give()
		return false
	}
	return true
}

func (e *Engine) giveFlow() {
	e.flows.give()
	e.giveNodeFlow()
}

func (e *Engine) release() {
	e.giveFlow()
	e.wg.Done()
}

// takeNodeFlow reserves a slot of the node's flow budget, if the engine
// has one: for a flow, or for a question to the upstream resolvers,
// whose socket holds a port of the node's too. wait: for up to a second
// (a flow of ours is ending to make room).
func (e *Engine) takeNodeFlow(wait bool) bool {
	b := e.cfg.Flows
	if b == nil || b.slots.take() || wait && b.slots.takeWithin(roomWait) {
		return true
	}
	e.events.FailureOnce("node flows", fmt.Sprintf("the node's sandboxes hold %d flows together, the daemon's limit (--max-flows): new ones are refused until some end", cap(b.slots)))
	return false
}

func (e *Engine) giveNodeFlow() {
	if e.cfg.Flows != nil {
		e.cfg.Flows.slots.give()
	}
}

// upstreamAddr is where an allowed flow is really sent: the canonical
// address, with the gateway standing for the host's loopback (where
// CallerOwnsHost lets it).
func (e *Engine) upstreamAddr(dst netip.AddrPort) netip.AddrPort {
	a := policy.Canonical(dst.Addr())
	switch {
	case !e.cfg.CallerOwnsHost:
	case a == e.cfg.Plan.Gateway4:
		a = netip.AddrFrom4([4]byte{127, 0, 0, 1})
	case a == e.cfg.Plan.Gateway6:
		a = netip.IPv6Loopback()
	}
	return netip.AddrPortFrom(a, dst.Port())
}

// hostLoopback says whether a stands for the host's loopback: is, maps or
// tunnels a loopback address, or is the gateway.
func (e *Engine) hostLoopback(a netip.Addr) (netip.Prefix, bool) {
	for _, x := range policy.Embedded(a) {
		if x.IsLoopback() || x == e.cfg.Plan.Gateway4 || x == e.cfg.Plan.Gateway6 {
			return netip.PrefixFrom(x, x.BitLen()), true
		}
	}
	return netip.Prefix{}, false
}

// DNS anywhere is answered by the engine's resolver (DNS over TLS or
// QUIC is refused: policy.DNSBypass), so no resolver but ours is reachable.
const portDNS = 53
