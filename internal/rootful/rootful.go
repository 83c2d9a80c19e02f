// Package rootful is the `--root` backend: the sandbox's network
// namespace gets a veth pair whose host end is routed and masqueraded by
// the kernel, and one nftables table per sandbox holds NAT and the whole
// policy. childflow's resolver answers the sandbox's DNS on the gateway
// and adds the addresses of names that domain rules decide to the
// table's sets, with their TTL as timeout. Every object is recorded
// under /run/childflow/root before it exists, so a crashed run's objects
// are removed by the next run or `childflow cleanup`.
package rootful

import (
	"cmp"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"syscall"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/childflow/childflow/engine"
	"github.com/childflow/childflow/engine/dns"
	"github.com/childflow/childflow/engine/flowlog"
	"github.com/childflow/childflow/engine/proxy"
	"github.com/childflow/childflow/engine/upstream"
	"github.com/childflow/childflow/internal/accept"
	"github.com/childflow/childflow/internal/netplan"
	"github.com/childflow/childflow/internal/procnet"
	"github.com/childflow/childflow/internal/tun"
	"github.com/childflow/childflow/internal/tunns"
	"github.com/childflow/childflow/policy"
)

// maxSlots bounds concurrent rootful sandboxes on one host (marks,
// routing tables and NFLOG groups are numbered by slot).
const maxSlots = 4000

// Config is one rootful sandbox.
type Config struct {
	StateDir string // DefaultStateDir when empty
	MTU      int
	Policy   *policy.Policy
	DNS      []netip.AddrPort
	// Hosts are the names the sandbox's hosts file gives (engine.Config).
	Hosts map[netip.Addr][]string
	// Proxy, if set, carries every TCP connection (TPROXY).
	Proxy *proxy.Proxy
	// Iface, if set, is the host interface direct traffic and the proxy
	// connection leave by; IfaceName names what set it in errors
	// (default --iface).
	Iface, IfaceName string
	// Warn, if set, tells the user of trouble while the sandbox runs.
	Warn func(string)
	// CountViolations: Violations is read at the end (--fail-on-leak).
	CountViolations bool
}

// Sandbox is the host side of a running rootful sandbox.
type Sandbox struct {
	cfg     Config
	rec     Record
	recFile *os.File
	// Plan is the sandbox's addressing; HostIf the host end of its veth.
	Plan   netplan.Plan
	HostIf string

	iface    netlink.Link // --iface, nil for none
	events   flowlog.Emitter
	cache    dns.Cache
	resolver *dns.Resolver
	sets     *domainSets
	ctx      context.Context
	cancel   context.CancelFunc
	closers  []interface{ Close() error }
	drain    *nflog // the flow-event reader, drained before it closes
	// owners finds the process behind a logged flow, for the reader;
	// nil when nobody records events.
	owners *procnet.Finder
	// The connections the sandbox has open to the host (proxied flows,
	// DNS over TCP), held within the engine's limits.
	conns   chan struct{}
	buffers *engine.BufferBudget
	// The DNS queries on the gateway's UDP sockets waiting for upstream.
	dnsSlots  chan struct{}
	wg        sync.WaitGroup
	closeOnce sync.Once
	closeErr  error
}

// Reserve takes a slot and a subnet for a new sandbox and records them;
// Attach then builds its network. Close undoes either.
func Reserve(cfg Config) (sb *Sandbox, err error) {
	if cfg.StateDir == "" {
		cfg.StateDir = DefaultStateDir
	}
	if cfg.MTU == 0 {
		cfg.MTU = 1500
	}
	var iface netlink.Link
	if cfg.Iface != "" {
		if iface, err = netlink.LinkByName(cfg.Iface); err != nil {
			name := cmp.Or(cfg.IfaceName, "--iface")
			return nil, policy.Usagef("invalid %s %q: no such interface", name, cfg.Iface)
		}
	}
	unlock, err := lockDir(cfg.StateDir)
	if err != nil {
		return nil, err
	}
	defer unlock()
	// A killed run's objects go first: they may hold the subnet or slot.
	live, _, _ := removeDead(cfg.StateDir)
	slot := freeSlot(live)
	if slot == 0 {
		return nil, fmt.Errorf("too many rootful sandboxes (%d)", maxSlots)
	}
	taken := netplan.Routes()
	for _, r := range live { // reserved, maybe not routed yet
		taken = append(taken, r.Plan.Prefix4, r.Plan.Prefix6)
	}
	plan, err := netplan.ChooseRoot(taken, cfg.MTU)
	if err != nil {
		return nil, err
	}
	id := newID()
	sb = &Sandbox{cfg: cfg, Plan: plan, HostIf: hostIfName(id), iface: iface,
		conns: make(chan struct{}, engine.DefaultMaxFlows), dnsSlots: make(chan struct{}, dns.DefaultMaxInFlight), buffers: engine.NewBufferBudget(engine.DefaultBufferBudget)}
	sb.events.Sandbox = id
	sb.ctx, sb.cancel = context.WithCancel(context.Background())
	sb.rec = Record{ID: id, Slot: slot, HostIf: sb.HostIf, Table: tableName(id), Plan: plan, Owner: os.Getpid()}
	if sb.recFile, err = writeRecord(cfg.StateDir, sb.rec); err != nil {
		return nil, err
	}
	return sb, nil
}

// Attach builds the network of the sandbox whose init is pid (already in
// its own network namespace); onEvent, nil when nobody records them,
// receives its flow events. On error the caller Closes.
func (sb *Sandbox) Attach(pid int, onEvent func(flowlog.Event)) (err error) {
	sb.events.OnEvent = onEvent
	cfg, slot := sb.cfg, sb.rec.Slot
	unlock, err := lockDir(cfg.StateDir)
	if err != nil {
		return err
	}
	defer unlock()
	if err = enableForwarding(cfg.StateDir); err != nil {
		return err
	}
	// The backstop before the link: nothing from it is ever routed
	// without the table's mark.
	if err = addBackstop(slot, sb.HostIf); err != nil {
		return err
	}
	if err = sb.createVeth(pid); err != nil {
		return err
	}
	spec := tableSpec{name: sb.rec.Table, hostIf: sb.HostIf, plan: sb.Plan, policy: cfg.Policy,
		group: slotLogGroup(slot), mark: slotMark(slot), logAllowed: onEvent != nil}
	if sb.iface != nil {
		spec.ifMark, spec.iface = ifaceMark(slot), cfg.Iface
		if err = addIfaceRouting(slot, sb.iface, sb.HostIf); err != nil {
			return err
		}
	}
	if cfg.Proxy != nil {
		if cfg.Iface != "" {
			sb.cfg.Proxy = cfg.Proxy.Via(sb.dialer().DialContext)
		}
		spec.tpMark = tproxyMark(slot)
		if spec.tproxy, err = sb.startTProxy(); err != nil {
			return err
		}
		if err = addTProxyRouting(slot, sb.HostIf); err != nil {
			return err
		}
	}
	if err = forgetConnections(slot); err != nil {
		return err
	}
	sb.sets = &domainSets{table: sb.rec.Table}
	sb.cache.Pin(cfg.Hosts)
	if err = installTable(spec, sb.domainElements()); err != nil {
		return err
	}
	if cfg.Warn != nil {
		// Only a warning: looked for beside the command, not before it.
		sb.spawn(func() {
			if drops := ForwardDrops(); len(drops) > 0 {
				cfg.Warn(fmt.Sprintf("warning: the host's nftables chain %s drops forwarded packets no rule accepts (Docker and ufw set iptables' FORWARD so): the sandbox reaches nothing beyond the host unless the host accepts them, e.g. iptables -I FORWARD -i %s+ -j ACCEPT; iptables -I FORWARD -o %s+ -j ACCEPT (DOCKER-USER with Docker)",
					strings.Join(drops, ", "), vethPrefix, vethPrefix))
			}
		})
	}
	if err = sb.keepTable(spec); err != nil {
		return err
	}
	if err = sb.keepRouting(spec); err != nil {
		return err
	}
	sb.resolver = &dns.Resolver{Upstreams: cfg.DNS, Policy: cfg.Policy, Cache: &sb.cache, Events: &sb.events, OnAnswer: sb.onAnswer, Dialer: sb.dialer()}
	if err = sb.serveDNS(); err != nil {
		return err
	}
	if onEvent != nil {
		// The sockets are looked up in the sandbox's namespace; without
		// that, flows are logged with no process.
		if diag, err := tunns.SockDiagIn(fmt.Sprintf("/proc/%d/ns/net", pid)); err == nil {
			sb.owners = &procnet.Finder{InitPID: pid, Diag: diag}
		}
	}
	if onEvent == nil && !cfg.CountViolations {
		// Nobody reads the verdicts: the kernel drops them, and the end
		// does not wait for the last ones (20 ms).
		return nil
	}
	return sb.watchFlows(slotLogGroup(slot))
}

func newID() string {
	b := make([]byte, 4)
	rand.Read(b)
	return hex.EncodeToString(b)
}

func freeSlot(live []Record) int {
	used := map[int]bool{}
	for _, r := range live {
		used[r.Slot] = true
	}
	for s := 1; s <= maxSlots; s++ {
		if !used[s] {
			return s
		}
	}
	return 0
}

// createVeth makes the pair, the host end here and cf0 in the sandbox,
// and configures both ends.
func (sb *Sandbox) createVeth(pid int) error {
	p := sb.Plan
	la := netlink.NewLinkAttrs()
	la.Name, la.MTU = sb.HostIf, p.MTU
	veth := &netlink.Veth{LinkAttrs: la, PeerName: p.Interface, PeerNamespace: netlink.NsPid(pid)}
	if err := netlink.LinkAdd(veth); err != nil {
		return fmt.Errorf("creating veth %s: %w", sb.HostIf, err)
	}
	host, err := netlink.LinkByName(sb.HostIf)
	if err != nil {
		return err
	}
	// A host with IPv6 turned off (default.disable_ipv6) would refuse the
	// link's address and the sandbox its start: IPv6 on this link only,
	// first, as turning it on sets the link's IPv6 settings afresh.
	writeSysctl("/proc/sys/net/ipv6/conf/"+sb.HostIf+"/disable_ipv6", "0")
	// Forwarding for what arrives from the sandbox: per link, gone with it.
	writeSysctl("/proc/sys/net/ipv4/conf/"+sb.HostIf+"/forwarding", "1")
	writeSysctl("/proc/sys/net/ipv6/conf/"+sb.HostIf+"/force_forwarding", "1")
	writeSysctl("/proc/sys/net/ipv6/conf/"+sb.HostIf+"/accept_ra", "0")
	h0, err := netlink.NewHandle()
	if err != nil {
		return err
	}
	defer h0.Close()
	if err := tun.AddAddresses(h0, host, p.GatewayPrefixes()); err != nil {
		return err
	}
	if err := netlink.LinkSetUp(host); err != nil {
		return fmt.Errorf("setting %s up: %w", sb.HostIf, err)
	}

	ns, err := netns.GetFromPid(pid)
	if err != nil {
		return fmt.Errorf("opening the sandbox's network namespace: %w", err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return err
	}
	defer h.Close()
	var cf0 netlink.Link
	for _, name := range []string{"lo", p.Interface} {
		l, err := h.LinkByName(name)
		if err != nil {
			return fmt.Errorf("finding %s in the sandbox: %w", name, err)
		}
		if name == p.Interface {
			cf0 = l
			if err := tun.AddAddresses(h, l, p.SandboxPrefixes()); err != nil {
				return err
			}
		}
		if err := h.LinkSetUp(l); err != nil {
			return fmt.Errorf("setting %s up in the sandbox: %w", name, err)
		}
	}
	if err := tun.AddDefaultRoutes(h, cf0, p.Gateways()); err != nil {
		return fmt.Errorf("in the sandbox: %w", err)
	}
	return nil
}

// dialer is how childflow's own connections for the sandbox (upstream
// DNS, the proxy) leave: by --iface when set, and never as a broadcast.
func (sb *Sandbox) dialer() *net.Dialer {
	d := &net.Dialer{Control: upstream.NoBroadcast}
	if sb.cfg.Iface != "" {
		iface := sb.cfg.Iface
		d.Control = func(network, address string, c syscall.RawConn) error {
			if err := upstream.NoBroadcast(network, address, c); err != nil {
				return err
			}
			var serr error
			c.Control(func(fd uintptr) { serr = unix.BindToDevice(int(fd), iface) })
			return serr
		}
	}
	return d
}

// Violations counts the flows the policy denied (--fail-on-leak), given
// Config.CountViolations or an onEvent.
func (sb *Sandbox) Violations() uint64 { return sb.events.Violations() }

// Close stops the sandbox's services and removes every object it
// created; the shared forwarding state goes with the last sandbox.
func (sb *Sandbox) Close() error {
	sb.closeOnce.Do(func() {
		if sb.cancel != nil {
			sb.cancel()
		}
		for _, c := range sb.closers {
			c.Close()
		}
		if sb.drain != nil {
			sb.drain.drain()
		}
		sb.wg.Wait()
		if sb.drain != nil && limitReached(sb.rec.Table) {
			sb.limitFailure()
		}
		if sb.owners != nil {
			sb.owners.Diag.Close()
		}
		unlock, err := lockDir(sb.cfg.StateDir)
		if err != nil {
			sb.closeErr = err
			return
		}
		defer unlock()
		sb.closeErr = sb.teardownLocked()
	})
	return sb.closeErr
}

func (sb *Sandbox) teardownLocked() error {
	var err error
	if live, _ := records(sb.cfg.StateDir); len(live) == 1 && live[0].ID == sb.rec.ID {
		// The last sandbox puts forwarding back first (its own is gone
		// with its processes), and its table goes in the guard's
		// transaction: one deletion less, 8-24 ms.
		err = restoreForwarding(sb.cfg.StateDir, sb.rec.Table)
	}
	err = errors.Join(err, removeObjects(sb.cfg.StateDir, sb.rec))
	sb.recFile.Close()
	return err
}

// serveConns accepts on ln until the sandbox closes and handles each
// connection on a goroutine of its own. One over the limit is reset.
func (sb *Sandbox) serveConns(ln net.Listener, handle func(net.Conn)) {
	for {
		c, err := accept.Next(sb.ctx, ln)
		if err != nil {
			return
		}
		select {
		case sb.conns <- struct{}{}:
		default:
			sb.events.FailureOnce("conns", fmt.Sprintf("the sandbox holds %d connections to the host, the limit: new ones are refused until some end", cap(sb.conns)))
			resetOnClose(c)
			c.Close()
			continue
		}
		sb.spawn(func() {
			defer func() { <-sb.conns }()
			defer context.AfterFunc(sb.ctx, func() { c.Close() })()
			handle(c)
		})
	}
}

// spawn runs f until Close.
func (sb *Sandbox) spawn(f func()) {
	sb.wg.Add(1)
	go func() {
		defer sb.wg.Done()
		f()
	}()
}
