package steer

import (
	"cmp"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"
	"unsafe"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	mdnetlink "github.com/mdlayher/netlink"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/childflow/childflow/internal/nftexpr"
)

// HostGuard filters, in the host's namespace, what a sandboxed pod sends
// on its veth. Rules inside the pod cannot stop a process with CAP_NET_RAW
// (a default capability) from writing frames to its end of the veth:
// frames to anywhere, from any address. From the pod pass neighbour
// discovery on the link and ARP, and packets from the pod's own
// addresses, not to port 53 (the pod's DNS goes to the engine, whatever
// resolver it names), that answer someone who reached the pod or go to a
// kept range. Checking the source also keeps the pod from making the
// host's conntrack believe a remote host reached it first, with a packet
// "from" that host. On a bridge, its ARP, neighbour discovery and MAC
// address are checked as well (addLinkChain).
type HostGuard struct {
	ID string // the sandbox's; its first 12 characters name its chains
	// Port is the container's interface where its sandbox has more than
	// one guarded (docker's several networks): "" for the first.
	Port   string         `json:",omitempty"`
	HostIf string         // the host's end of the pod's veth
	Pod    []netip.Addr   // the pod's addresses: the only sources it may send from
	Keep   []netip.Prefix // destinations it may reach around the engine
	// On a bridge port, what the pod may claim to its neighbours: its
	// MAC address and, in neighbour discovery, its link-local addresses.
	MAC       string       `json:",omitempty"`
	LinkLocal []netip.Addr `json:",omitempty"`
	// known: on a bridge port, the hosts its guard starts knowing, and
	// answers, what its answer sets start with, by set (Restore's, from a
	// Snapshot).
	known   []knownHost
	answers map[string][]nftables.SetElement
}

// Guards are the host guards of one node, in two tables shared by all
// pods: inet for routed veths, bridge for bridge ports. Each pod has
// chains of its own, which its interface's name selects through a
// verdict map: a packet costs one lookup however many pods there are
// (with a table per pod, 100 pods' tables halved the rate of small
// packets through a bridge: 124 to 66 thousand a second). Dir (the node
// daemon's state directory) holds a lock file that keeps concurrent
// plugin runs from creating or removing a table under each other, and
// each guard's description, from which Restore puts back what a `flush
// ruleset` took.
type Guards struct {
	Dir string
}

func (gs Guards) recordPath(key string) string {
	return filepath.Join(gs.Dir, "guards", key+".json")
}

// GuardTable names the guards' tables.
const GuardTable = "childflow-guard"

// inboundTimeout is how long a remote host that sent a packet to a pod on
// a bridge may hear from it.
const inboundTimeout = time.Hour

// udpAnswerTimeout is how long a pod on a bridge may answer a UDP
// datagram, from the port it came to, to the port it came from: as long
// as conntrack keeps a UDP stream.
const udpAnswerTimeout = 2 * time.Minute

// protoAnswerTimeout is how long a pod on a bridge may answer a packet
// of a protocol but TCP, UDP and ICMP with one of that protocol: as long
// as conntrack keeps a stream of a protocol it knows no more of
// (nf_conntrack_generic_timeout).
const protoAnswerTimeout = 10 * time.Minute

// guardFamilies are the families of the guards' tables.
var guardFamilies = []nftables.TableFamily{nftables.TableFamilyINet, nftables.TableFamilyBridge}

func guardKey(id string) string {
	if len(id) > 12 {
		return id[:12]
	}
	return id
}

// key names g's chains, sets and record: its sandbox's key, with the
// container's interface after a "+" (no id has one) for a second one.
func (g HostGuard) key() string {
	if g.Port == "" {
		return guardKey(g.ID)
	}
	return guardKey(g.ID) + "+" + g.Port
}

// Install adds g's chains. A routed veth is filtered where the host
// forwards or receives (inet, with conntrack's view of who reached whom).
// A bridge's port is not: there the host sees the packets come from the
// bridge, so the frames are filtered by port in a bridge table, which
// sees conntrack only with a module not every kernel has
// (nf_conntrack_bridge), and remembers instead for an hour every address
// that sent one of the pod's addresses a packet (or a neighbour
// solicitation for one) other than an answer (answers: TCP but a SYN,
// echo replies, ICMP errors, fragments but the first; a UDP datagram
// cannot be told from one), to which the pod may send answers alone
// (UDP to the ports of a datagram it was sent, another protocol to who
// sent it that protocol, checked again by the inet table's conntrack
// where it sees the packet: unsureMark). A veth on any other master (Open
// vSwitch, a VRF) or with something that moves frames before netfilter
// cannot be guarded: an error.
func (gs Guards) Install(g HostGuard) error {
	return gs.install(g, false)
}

// InstallLate installs g for a veth that may have carried frames before
// (one added to a running sandbox, whose hold races its runtime): on a
// bridge its guard learns no one new for answerGrace, in which answers
// to those frames come (ForgetConnections deals with conntrack's).
func (gs Guards) InstallLate(g HostGuard) error {
	return gs.install(g, true)
}

func (gs Guards) install(g HostGuard, late bool) error {
	family, err := guardFamily(g)
	if err != nil {
		return err
	}
	unlock, err := gs.lock()
	if err != nil {
		return err
	}
	defer unlock()
	// The record first: a crash between the two leaves a guard that
	// Restore can put back, or a record it drops with its veth.
	if err := gs.record(g); err != nil {
		return err
	}
	if err := install(family, late, g); err != nil {
		os.Remove(gs.recordPath(g.key()))
		return err
	}
	// The guard took its own family's hold of the name (takeName); the
	// other family's goes too.
	c, err := nftables.New()
	if err != nil {
		return err
	}
	if releaseName(c, g.HostIf) {
		if err := nftexpr.Flush(c); err != nil {
			return err
		}
	}
	return ensureTables(c)
}

// ForgetConnections deletes conntrack's entries for the addresses of a
// pod whose veth carried frames before its guard (one added to a running
// sandbox, where its hold lost the race to its plugin), once that is
// installed. A routed veth's guard lets answers through by conntrack's
// word: those of connections made to the pod go (a frame with a forged
// source made one that the pod's next datagram would answer); those the
// pod opened stay, so that their answers, still on their way, are taken
// for answers and not for connections made to it. A bridge's guard takes
// whoever sends the pod a UDP datagram for someone who reached it: all
// go, also the pod's, whose answers NAT would still bring to it. Not for a
// veth guarded before its pod ran: it reads the node's whole table.
func (gs Guards) ForgetConnections(g HostGuard) error {
	family, err := guardFamily(g)
	if err != nil {
		return err
	}
	fields := []netlink.ConntrackFilterType{netlink.ConntrackOrigDstIP, netlink.ConntrackReplySrcIP}
	if family == nftables.TableFamilyBridge {
		fields = append(fields, netlink.ConntrackOrigSrcIP, netlink.ConntrackReplyDstIP)
	}
	var filters []netlink.CustomConntrackFilter
	for _, a := range g.Pod {
		for _, field := range fields {
			f := &netlink.ConntrackFilter{}
			if err := f.AddIP(field, a.AsSlice()); err != nil {
				return err
			}
			filters = append(filters, f)
		}
	}
	if len(filters) == 0 {
		return nil
	}
	for _, ipFamily := range []netlink.InetFamily{unix.AF_INET, unix.AF_INET6} {
		if _, err := netlink.ConntrackDeleteFilters(netlink.ConntrackTable, ipFamily, filters...); err != nil {
			return fmt.Errorf("guarding %s on the host: deleting the conntrack entries of its addresses: %w", g.HostIf, err)
		}
	}
	return nil
}

// guardFamily is the family of the table that can guard g's veth, or
// why none can.
func guardFamily(g HostGuard) (nftables.TableFamily, error) {
	link, err := netlink.LinkByName(g.HostIf)
	if err != nil {
		return 0, fmt.Errorf("guarding %s on the host: %w", g.HostIf, err)
	}
	if what := aroundNetfilter(link); what != "" {
		return 0, fmt.Errorf("cannot guard the pod's veth %s on the host: it has %s, which can send the pod's frames on before netfilter sees them (eBPF data planes such as Cilium's attach them)", g.HostIf, what)
	}
	family := nftables.TableFamilyINet
	if m := link.Attrs().MasterIndex; m != 0 {
		master, err := netlink.LinkByIndex(m)
		if err != nil {
			return 0, fmt.Errorf("guarding %s on the host: its master: %w", g.HostIf, err)
		}
		if master.Type() != "bridge" {
			return 0, fmt.Errorf("cannot guard the pod's veth %s on the host: it is a port of %s, a %s (childflow guards routed veths and Linux bridges' ports)", g.HostIf, master.Attrs().Name, master.Type())
		}
		family = nftables.TableFamilyBridge
	}
	return family, nil
}

// install adds the guards' chains to the family's table in one
// transaction (a Restore of a node's pods at once), as InstallLate's if
// late; the caller holds the lock.
func install(family nftables.TableFamily, late bool, guards ...HostGuard) error {
	what := "the pods' veths"
	if len(guards) == 1 {
		what = guards[0].HostIf
	}
	c, err := nftables.New(nftables.WithSockOptions(largeBuffers))
	if err != nil {
		return err
	}
	if family == nftables.TableFamilyBridge {
		// What a bridge's guard marks unsure, the inet table decides: it
		// comes first, with its chain for that (one made before has none).
		if _, _, err := guardTable(c, nftables.TableFamilyINet); err != nil {
			return fmt.Errorf("guarding %s on the host: %w", what, err)
		}
	}
	t, maps, err := guardTable(c, family)
	if err != nil {
		return fmt.Errorf("guarding %s on the host: %w", what, err)
	}
	chains := chainNames(c, family)
	held := heldNames(c, maps[0])
	// A pod added again may have had a veth of the other kind.
	other := &nftables.Table{Family: nftables.TableFamilyBridge, Name: GuardTable}
	if family == nftables.TableFamilyBridge {
		other.Family = nftables.TableFamilyINet
	}
	otherChains := chainNames(c, other.Family)
	for _, g := range guards {
		// A pod added again: its old chains go in the transaction that
		// adds its new ones, so that its veth is never unguarded between.
		if old, ok := removeChains(c, t, chains, g.key()); ok {
			delete(held, string(old))
		}
		removeChains(c, other, otherChains, g.key())
		if held[string(nftexpr.IfNameBytes(g.HostIf))] {
			takeName(c, t, maps, g.HostIf)
		}
		if err := addGuard(c, t, maps, g.key(), g); err != nil {
			return err
		}
		if late && family == nftables.TableFamilyBridge {
			if err := c.SetAddElements(youngSet(t), []nftables.SetElement{{Key: nftexpr.IfNameBytes(g.HostIf), Timeout: answerGrace}}); err != nil {
				return err
			}
		}
	}
	if err := nftexpr.Flush(c); err != nil {
		return fmt.Errorf("guarding %s on the host: %w", what, err)
	}
	return nil
}

// answerGrace is how long a bridge's guard installed late (InstallLate,
// or put back after a `flush ruleset`) learns no one new: a UDP answer
// to what its pod sent unguarded cannot be told from a datagram that
// reaches it first, but comes within a round trip.
const answerGrace = 2 * time.Second

// youngSet names the bridge ports whose guards learn no one yet.
func youngSet(t *nftables.Table) *nftables.Set {
	return &nftables.Set{Table: t, Name: "young", KeyType: nftables.TypeIFName, KeyByteOrder: binaryutil.NativeEndian, HasTimeout: true}
}

// largeBuffers lets a transaction of many pods' guards through: the
// kernel acknowledges each of its messages, and the default buffers
// (net.core.rmem_default, wmem_default) hold about five pods' worth. On
// failure the defaults stay, and Restore's batches fall back to one pod
// at a time.
func largeBuffers(c *mdnetlink.Conn) error {
	nftexpr.ForceBuffers(c, 8<<20, unix.SO_SNDBUFFORCE, unix.SO_RCVBUFFORCE)
	return nil
}

// heldNames are the interface names a map leads from.
func heldNames(c *nftables.Conn, m *nftables.Set) map[string]bool {
	held := map[string]bool{}
	elems, _ := c.GetSetElements(m)
	for _, e := range elems {
		held[string(e.Key)] = true
	}
	return held
}

// takeName queues the release of an interface's name from a pod gone
// without DEL that still claims it (a new veth can take the name again):
// the new pod's chains replace its in the maps, and its own removal must
// then leave them be.
func takeName(c *nftables.Conn, t *nftables.Table, maps []*nftables.Set, hostIf string) {
	name := nftexpr.IfNameBytes(hostIf)
	sets, err := c.GetSets(t)
	if err != nil {
		return
	}
	for _, set := range sets {
		if !strings.HasPrefix(set.Name, "if-") {
			continue
		}
		elems, _ := c.GetSetElements(set)
		for _, e := range elems {
			if string(e.Key) != string(name) {
				continue
			}
			c.SetDeleteElements(set, []nftables.SetElement{{Key: name}})
			for _, m := range maps {
				deleteKey(c, m, name)
			}
		}
	}
}

// The verdict maps, keyed by interface name, that lead to each pod's
// chains: for what it sends and, on a bridge, for what is sent to it and
// for what it claims on the link (before the bridge learns from it).
const (
	fromPods  = "from-pods"
	toPods    = "to-pods"
	podsLinks = "pods-links"
)

// guardMapNames are the maps of a family's table.
func guardMapNames(family nftables.TableFamily) []string {
	if family == nftables.TableFamilyBridge {
		return []string{fromPods, toPods, podsLinks}
	}
	return []string{fromPods}
}

// deleteKey queues the deletion of a map's element, if it has it (the
// deletion of a missing one would fail the whole batch).
func deleteKey(c *nftables.Conn, m *nftables.Set, key []byte) {
	elems, _ := c.GetSetElements(m)
	for _, e := range elems {
		if string(e.Key) == string(key) {
			c.SetDeleteElements(m, []nftables.SetElement{{Key: key}})
			return
		}
	}
}

// guardTable returns the family's table and its maps (guardMapNames'
// order), adding what is missing of them and their base chains.
func guardTable(c *nftables.Conn, family nftables.TableFamily) (*nftables.Table, []*nftables.Set, error) {
	t := &nftables.Table{Family: family, Name: GuardTable}
	exists := false
	if existing, err := c.ListTableOfFamily(GuardTable, family); err == nil && existing != nil {
		exists = true
	} else {
		c.AddTable(t)
	}
	// Before the host's own filters (inet's at 0, bridge's at -200): a
	// drop here is final.
	prio := nftables.ChainPriorityRef(-10)
	if family == nftables.TableFamilyBridge {
		prio = nftables.ChainPriorityRef(-210)
	}
	bases := map[string]*nftables.Chain{}
	base := func(name string, hook *nftables.ChainHook) *nftables.Chain {
		if bases[name] == nil {
			bases[name] = c.AddChain(&nftables.Chain{Name: name, Table: t, Type: nftables.ChainTypeFilter, Hooknum: hook, Priority: prio})
		}
		return bases[name]
	}
	vmap := func(ch *nftables.Chain, key expr.MetaKey, m *nftables.Set) {
		c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: []expr.Any{
			&expr.Meta{Key: key, Register: 1},
			&expr.Lookup{SourceRegister: 1, SetName: m.Name, SetID: m.ID, IsDestRegSet: true, DestRegister: 0},
		}})
	}
	if family == nftables.TableFamilyBridge {
		// A no-op where the table has it; a table made before it has not.
		if err := c.AddSet(youngSet(t), nil); err != nil {
			return nil, nil, err
		}
	}
	var maps []*nftables.Set
	for _, name := range guardMapNames(family) {
		if exists {
			if m, err := c.GetSetByName(t, name); err == nil {
				maps = append(maps, m)
				continue
			}
		}
		// Interface names are strings: host byte order, so that nft shows them.
		m := &nftables.Set{Table: t, Name: name, IsMap: true, KeyType: nftables.TypeIFName, KeyByteOrder: binaryutil.NativeEndian, DataType: nftables.TypeVerdict}
		if err := c.AddSet(m, nil); err != nil {
			return nil, nil, err
		}
		maps = append(maps, m)
		switch name {
		case fromPods: // what the pod sends, forwarded or to the host
			vmap(base("forward", nftables.ChainHookForward), expr.MetaKeyIIFNAME, m)
			vmap(base("input", nftables.ChainHookInput), expr.MetaKeyIIFNAME, m)
		case toPods: // what is sent to it, which the inbound sets remember
			vmap(base("forward", nftables.ChainHookForward), expr.MetaKeyOIFNAME, m)
			vmap(base("output", nftables.ChainHookOutput), expr.MetaKeyOIFNAME, m)
		case podsLinks: // a table made before the link checks has none
			vmap(base("prerouting", nftables.ChainHookPrerouting), expr.MetaKeyIIFNAME, m)
		}
	}
	if family == nftables.TableFamilyINet && (!exists || !hasUnsureChain(c)) {
		addUnsureChain(c, t, base("forward", nftables.ChainHookForward), base("input", nftables.ChainHookInput))
	}
	return t, maps, nftexpr.Flush(c)
}

// unsureMark is the bit of a packet's mark by which a bridge port's
// guard hands the host's conntrack what it cannot tell for an answer
// (a packet of a protocol but TCP, UDP and ICMP to a host that sent the
// pod one): without it, the pod could send one to any such service of
// that host's (any SCTP port), the node's own. A bit kube-proxy
// (0x4000, 0x8000) and Calico (0xffff0000, which it clears) leave be; the
// packet comes from a veth, which cleared its mark.
const unsureMark = 0x2000

const unsureChain = "unsure"

// hasUnsureChain says whether the inet table has its unsure chain.
func hasUnsureChain(c *nftables.Conn) bool {
	_, err := c.ListChain(&nftables.Table{Family: nftables.TableFamilyINet, Name: GuardTable}, unsureChain)
	return err == nil
}

// addUnsureChain makes the inet table pass what a bridge's guard marked
// unsure only as an answer, where the host forwards it or takes it in
// (also a frame bridged on with br_netfilter, which passes it through
// forward). Only from a bridge, so that another's use of the bit drops
// nothing.
func addUnsureChain(c *nftables.Conn, t *nftables.Table, bases ...*nftables.Chain) {
	unsure := c.AddChain(&nftables.Chain{Name: unsureChain, Table: t})
	ret := []expr.Any{&expr.Verdict{Kind: expr.VerdictReturn}}
	rule := func(e ...[]expr.Any) { c.AddRule(&nftables.Rule{Table: t, Chain: unsure, Exprs: nftexpr.Cat(e...)}) }
	rule(nftexpr.MarkMasked(0, unsureMark), ret)
	rule(nftexpr.IfName(metaKeyIIFKIND, "bridge", false), ret) // a kind compares as a name
	// The bit goes with the answer: it means nothing further on.
	rule(nftexpr.Established(), nftexpr.CtReply(), nftexpr.SetMarkBits(^uint32(unsureMark), 0), ret)
	rule([]expr.Any{&expr.Verdict{Kind: expr.VerdictDrop}})
	for _, b := range bases {
		c.AddRule(&nftables.Rule{Table: t, Chain: b, Exprs: []expr.Any{&expr.Verdict{Kind: expr.VerdictJump, Chain: unsure.Name}}})
	}
}

// metaKeyIIFKIND loads the kind of the input interface ("bridge",
// "veth"): NFT_META_IIFKIND, which the nftables package does not name.
const metaKeyIIFKIND = expr.MetaKey(26)

// addGuard adds the pod's chains and sets, and its interface to the maps
// (guardMapNames' order).
func addGuard(c *nftables.Conn, t *nftables.Table, maps []*nftables.Set, key string, g HostGuard) error {
	bridged := t.Family == nftables.TableFamilyBridge
	ipFamily := nftexpr.Family
	if bridged {
		ipFamily = nftexpr.EtherType
	}
	accept := &expr.Verdict{Kind: expr.VerdictAccept}
	drop := &expr.Verdict{Kind: expr.VerdictDrop}
	rule := func(ch *nftables.Chain, e ...[]expr.Any) {
		c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: nftexpr.Cat(e...)})
	}
	// The maps' verdicts cannot be read back: a set of its own records
	// the interface, whose elements removeChains deletes.
	ifs := &nftables.Set{Table: t, Name: "if-" + key, KeyType: nftables.TypeIFName, KeyByteOrder: binaryutil.NativeEndian}
	if err := c.AddSet(ifs, []nftables.SetElement{{Key: nftexpr.IfNameBytes(g.HostIf)}}); err != nil {
		return err
	}
	from := c.AddChain(&nftables.Chain{Name: "from-" + key, Table: t})
	fromAddr := c.AddChain(&nftables.Chain{Name: "addr-" + key, Table: t})

	// Neighbour discovery on the link only: routed on, a solicitation
	// would carry what it likes to any address.
	onLink := []netip.Prefix{netip.MustParsePrefix("fe80::/10"), netip.MustParsePrefix("ff02::/16")}
	for _, k := range g.Keep {
		if k.Addr().Is6() {
			onLink = append(onLink, k)
		}
	}
	for _, p := range onLink {
		rule(from, ipFamily(true), nftexpr.AddrIn(p, false), nftexpr.NeighbourDiscovery(), []expr.Any{accept})
	}
	if bridged {
		rule(from, nftexpr.EtherTypeIs(unix.ETH_P_ARP), []expr.Any{accept})
	}
	for _, a := range g.Pod {
		rule(from, ipFamily(a.Is6()), nftexpr.AddrIn(netip.PrefixFrom(a, a.BitLen()), true),
			[]expr.Any{&expr.Verdict{Kind: expr.VerdictGoto, Chain: fromAddr.Name}})
	}
	rule(from, []expr.Any{drop})

	// First, as the sets below remember addresses, not connections: the
	// node itself may have probed the pod.
	for _, proto := range []byte{unix.IPPROTO_UDP, unix.IPPROTO_TCP} {
		rule(fromAddr, nftexpr.L4(proto), nftexpr.Dport(53), []expr.Any{drop})
	}
	// Kept ranges take whatever the pod sends, before the hosts it may
	// only answer.
	for _, k := range g.Keep {
		rule(fromAddr, ipFamily(k.Addr().Is6()), nftexpr.AddrIn(k, false), []expr.Any{accept})
	}
	if bridged {
		to := c.AddChain(&nftables.Chain{Name: "to-" + key, Table: t})
		inbound := map[bool]*nftables.Set{}
		for _, is6 := range []bool{false, true} {
			set := &nftables.Set{Table: t, Name: inboundSet(key, is6), KeyType: nftables.TypeIPAddr, HasTimeout: true, Dynamic: true, Timeout: inboundTimeout, Size: 65536}
			if is6 {
				set.KeyType = nftables.TypeIP6Addr
			}
			var known []nftables.SetElement
			for _, h := range g.known {
				if h.addr.Is6() == is6 {
					known = append(known, nftables.SetElement{Key: h.addr.AsSlice(), Timeout: h.left})
				}
			}
			if err := c.AddSet(set, known); err != nil {
				return err
			}
			inbound[is6] = set
		}
		answered, err := addAnswerSets(c, t, key, g.answers)
		if err != nil {
			return err
		}
		addKnownChain(c, t, rule, fromAddr, inbound, answered, key)
		// remember makes the sender of what is sent to the pod known, or
		// keeps it known if it is.
		remember := func(known bool) {
			for _, is6 := range []bool{false, true} {
				set := inbound[is6]
				e := []expr.Any{nftexpr.LoadAddr(is6, true)}
				if known {
					e = append(e, &expr.Lookup{SourceRegister: 1, SetName: set.Name, SetID: set.ID})
				}
				rule(to, ipFamily(is6), append(e, &expr.Dynset{SrcRegKey: 1, SetName: set.Name, SetID: set.ID, Operation: unix.NFT_DYNSET_OP_UPDATE, Timeout: inboundTimeout}))
			}
		}
		// Only what is sent to the pod's own addresses: a bridge floods
		// to every port what it sends to a MAC address it has not learned
		// (a neighbour whose entry outlived the bridge's), to broadcast
		// and to multicast, and whoever sent that reached someone else.
		// And to their solicited-node addresses: a neighbour solicitation
		// for the pod, from the node's global address too, whose
		// advertisement the pod sends back there.
		for _, is6 := range []bool{false, true} {
			mine := ofFamily(g.Pod, is6)
			if is6 {
				for _, a := range mine { // the addresses alone: range reads mine once
					if m := solicitedNode(a); !slices.Contains(mine, m) {
						mine = append(mine, m)
					}
				}
			}
			toOthers := ipFamily(is6)
			if len(mine) > 0 {
				lookup, err := notIn(c, t, is6, mine)
				if err != nil {
					return err
				}
				toOthers = nftexpr.Cat(toOthers, []expr.Any{nftexpr.LoadAddr(is6, false)}, lookup)
			}
			rule(to, toOthers, []expr.Any{&expr.Verdict{Kind: expr.VerdictReturn}})
		}
		// Every UDP datagram to the pod may be answered, from the port it
		// came to, to the one it came from, and a packet of another
		// protocol but TCP and ICMP by that protocol (known hosts only:
		// the known chain).
		for _, is6 := range []bool{false, true} {
			rule(to, ipFamily(is6), nftexpr.L4(unix.IPPROTO_UDP), udpTuple(is6, true), []expr.Any{
				&expr.Dynset{SrcRegKey: regTuple, SetName: answered.udp[is6].Name, SetID: answered.udp[is6].ID, Operation: unix.NFT_DYNSET_OP_UPDATE, Timeout: udpAnswerTimeout},
			})
			rule(to, ipFamily(is6), otherProtocol(), protoPair(is6, true), []expr.Any{
				&expr.Dynset{SrcRegKey: regTuple, SetName: answered.proto[is6].Name, SetID: answered.proto[is6].ID, Operation: unix.NFT_DYNSET_OP_UPDATE, Timeout: protoAnswerTimeout},
			})
		}
		// Whoever the pod answers already stays known while they talk; an
		// answer makes no one new known: a late answer to what the pod
		// sent unguarded (an interface added to a running sandbox before
		// its guard, the window of a `flush ruleset`) would open the way
		// to whoever sent it, a server the pod's policy denies.
		remember(true)
		for _, a := range answers(ipFamily) {
			rule(to, a, []expr.Any{&expr.Verdict{Kind: expr.VerdictReturn}})
		}
		rule(to, []expr.Any{
			&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1},
			&expr.Lookup{SourceRegister: 1, SetName: youngSet(t).Name},
			&expr.Verdict{Kind: expr.VerdictReturn},
		})
		remember(false)
		if err := c.SetAddElements(maps[1], []nftables.SetElement{{Key: nftexpr.IfNameBytes(g.HostIf), VerdictData: &expr.Verdict{Kind: expr.VerdictJump, Chain: to.Name}}}); err != nil {
			return err
		}
		if err := addLinkChain(c, t, maps[2], key, g); err != nil {
			return err
		}
	} else {
		// Answers only: the pod's side of a connection someone else
		// opened. One it opened itself never passes (only kept ranges
		// do), though conntrack knows it, as it may have been opened
		// before this guard (ForgetConnections).
		rule(fromAddr, nftexpr.Established(), nftexpr.CtReply(), []expr.Any{accept})
	}
	rule(fromAddr, []expr.Any{drop})
	return c.SetAddElements(maps[0], []nftables.SetElement{{Key: nftexpr.IfNameBytes(g.HostIf), VerdictData: &expr.Verdict{Kind: expr.VerdictJump, Chain: from.Name}}})
}

// addKnownChain sends what a bridged pod sends to a host that reached it
// (its inbound sets) to a chain that passes answers alone. The sets
// remember addresses, not connections: without it the pod could open a
// connection of its own to any service of that host's, the node's own
// after a probe from it (kubelet's, docker-proxy's), or ping it. A
// connection opens with a SYN, which no answer is, and a TCP header too
// short to tell (a first fragment of 8 bytes) is none. A UDP datagram
// answers one the pod was sent (its udp sets), whether the host's
// conntrack sees it or not (between two pods on a bridge without
// br_netfilter nothing but this table does). A packet of another
// protocol passes only to a host that sent the pod that protocol (its
// proto sets), marked for the host's conntrack to tell the rest, where it
// sees the packet (unsureMark): this table knows no ports of SCTP's or
// DCCP's, and no more of the others.
func addKnownChain(c *nftables.Conn, t *nftables.Table, rule func(*nftables.Chain, ...[]expr.Any), fromAddr *nftables.Chain, inbound map[bool]*nftables.Set, answered answerSets, key string) {
	known := c.AddChain(&nftables.Chain{Name: "known-" + key, Table: t})
	accept := []expr.Any{&expr.Verdict{Kind: expr.VerdictAccept}}
	for _, is6 := range []bool{false, true} {
		set := inbound[is6]
		rule(fromAddr, nftexpr.EtherType(is6), []expr.Any{nftexpr.LoadAddr(is6, false),
			&expr.Lookup{SourceRegister: 1, SetName: set.Name, SetID: set.ID},
			&expr.Verdict{Kind: expr.VerdictGoto, Chain: known.Name}})
	}
	// UDP and the rest first, then TCP: what most packets are.
	for _, is6 := range []bool{false, true} {
		rule(known, nftexpr.EtherType(is6), nftexpr.L4(unix.IPPROTO_UDP), udpTuple(is6, false), []expr.Any{
			&expr.Lookup{SourceRegister: regTuple, SetName: answered.udp[is6].Name, SetID: answered.udp[is6].ID}}, accept)
		rule(known, nftexpr.EtherType(is6), otherProtocol(), protoPair(is6, false), []expr.Any{
			&expr.Lookup{SourceRegister: regTuple, SetName: answered.proto[is6].Name, SetID: answered.proto[is6].ID}},
			nftexpr.SetMarkBits(^uint32(unsureMark), unsureMark), accept)
	}
	// A fragment but the first has no ports to load: it passes as an
	// answer (below), as its first could not.
	rule(known, nftexpr.L4(unix.IPPROTO_UDP), []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: 2},
		&expr.Verdict{Kind: expr.VerdictDrop}})
	rule(known, otherProtocol(), []expr.Any{&expr.Verdict{Kind: expr.VerdictDrop}})
	for _, a := range answers(nftexpr.EtherType) {
		rule(known, a, accept)
	}
	// Neighbour discovery to the host's own address (a unicast probe of
	// it): the link chain has already dropped what would mislead.
	rule(known, nftexpr.NeighbourDiscovery(), accept)
	rule(known, []expr.Any{&expr.Verdict{Kind: expr.VerdictDrop}})
}

// answers match what only answers something the pod sent: a TCP segment
// other than a connection's first (a SYN without ACK), an echo reply, an
// ICMP error. Stateless, as a bridge table sees no conntrack here. A
// fragment but the first carries no header to tell: it counts as one, as
// what reaches the pod first in fragments is known by its first.
func answers(ipFamily func(is6 bool) []expr.Any) [][]expr.Any {
	icmpType := func(proto, from, to byte) []expr.Any {
		return nftexpr.Cat(nftexpr.L4(proto), []expr.Any{
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: 1},
			&expr.Range{Op: expr.CmpOpEq, Register: 1, FromData: []byte{from}, ToData: []byte{to}},
		})
	}
	return [][]expr.Any{
		nftexpr.Cat(nftexpr.L4(unix.IPPROTO_TCP), []expr.Any{
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 13, Len: 1}, // flags
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 1, Mask: []byte{0x12}, Xor: []byte{0}},
			&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte{0x02}}, // SYN alone
		}),
		icmpType(unix.IPPROTO_ICMP, 0, 0),       // echo reply
		icmpType(unix.IPPROTO_ICMP, 3, 5),       // unreachable, source quench, redirect
		icmpType(unix.IPPROTO_ICMP, 11, 12),     // time exceeded, parameter problem
		icmpType(unix.IPPROTO_ICMP, 14, 14),     // timestamp reply
		icmpType(unix.IPPROTO_ICMPV6, 1, 4),     // errors
		icmpType(unix.IPPROTO_ICMPV6, 129, 129), // echo reply
		nftexpr.Cat(ipFamily(false), []expr.Any{
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: 6, Len: 2},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 2, Mask: []byte{0x1f, 0xff}, Xor: []byte{0, 0}},
			&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte{0, 0}}, // a fragment's offset
		}),
		nftexpr.Cat(ipFamily(true), []expr.Any{
			&expr.Exthdr{Op: expr.ExthdrOpIpv6, Type: unix.IPPROTO_FRAGMENT, Offset: 2, Len: 2, DestRegister: 1},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 2, Mask: []byte{0xff, 0xf8}, Xor: []byte{0, 0}},
			&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte{0, 0}},
		}),
	}
}

// addLinkChain adds what keeps a pod on a bridge from posing as another
// to its neighbours (other pods, the node): frames only from its own MAC
// address (the bridge learns the sender of every frame it receives,
// before any forward rule), ARP only for its own IPv4 addresses,
// neighbour discovery only from and, in advertisements, for its own
// IPv6 addresses, naming only its MAC address, and no router
// advertisements or redirects. It runs
// where the bridge receives the frame. A guard recorded without a MAC
// address (before these checks) has none.
func addLinkChain(c *nftables.Conn, t *nftables.Table, links *nftables.Set, key string, g HostGuard) error {
	if g.MAC == "" {
		return nil
	}
	mac, err := net.ParseMAC(g.MAC)
	if err != nil || len(mac) != 6 {
		return fmt.Errorf("guarding %s on the host: the pod's MAC address %q is not an Ethernet address", g.HostIf, g.MAC)
	}
	link := c.AddChain(&nftables.Chain{Name: "link-" + key, Table: t})
	add := func(v expr.VerdictKind, e ...[]expr.Any) {
		c.AddRule(&nftables.Rule{Table: t, Chain: link, Exprs: nftexpr.Cat(append(e, []expr.Any{&expr.Verdict{Kind: v}})...)})
	}
	rule := func(e ...[]expr.Any) { add(expr.VerdictDrop, e...) }
	// What the rules below have nothing more to say about leaves at once:
	// every frame of the pod's goes through this chain.
	done := func(e ...[]expr.Any) { add(expr.VerdictAccept, e...) }
	load := func(base expr.PayloadBase, offset, n uint32) []expr.Any {
		return []expr.Any{&expr.Payload{DestRegister: 1, Base: base, Offset: offset, Len: n}}
	}
	differs := func(b []byte) []expr.Any {
		return []expr.Any{&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: b}}
	}
	is := func(b ...byte) []expr.Any {
		return []expr.Any{&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: b}}
	}
	v4 := append([]netip.Addr{netip.IPv4Unspecified()}, ofFamily(g.Pod, false)...)
	v6 := append(slices.Clone(g.LinkLocal), ofFamily(g.Pod, true)...)
	arp := nftexpr.EtherTypeIs(unix.ETH_P_ARP)
	icmp6 := nftexpr.Cat(nftexpr.EtherType(true), nftexpr.L4(unix.IPPROTO_ICMPV6))
	icmp6Type := load(expr.PayloadBaseTransportHeader, 0, 1)

	rule(load(expr.PayloadBaseLLHeader, 6, 6), differs(mac))
	done(nftexpr.EtherType(false))
	// ARP for IPv4 over Ethernet only, from the pod's MAC address and
	// one of its addresses (or none: a probe).
	for _, f := range []struct {
		offset uint32
		want   []byte
	}{{0, []byte{0, 1}}, {2, []byte{8, 0}}, {4, []byte{6}}, {5, []byte{4}}} {
		rule(arp, load(expr.PayloadBaseNetworkHeader, f.offset, uint32(len(f.want))), differs(f.want))
	}
	rule(arp, load(expr.PayloadBaseNetworkHeader, 8, 6), differs(mac))
	sender, err := notIn(c, t, false, v4)
	if err != nil {
		return err
	}
	rule(arp, load(expr.PayloadBaseNetworkHeader, 14, 4), sender)
	done(arp)
	done(nftexpr.EtherType(true), []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte{unix.IPPROTO_ICMPV6}},
	})
	rule(icmp6, icmp6Type, is(134)) // router advertisement
	rule(icmp6, icmp6Type, is(137)) // redirect
	// Neighbour discovery from the pod's addresses, or none (duplicate
	// address detection), and advertising only them.
	source, err := notIn(c, t, true, append(v6, netip.IPv6Unspecified()))
	if err != nil {
		return err
	}
	rule(icmp6, icmp6Type, []expr.Any{&expr.Range{Op: expr.CmpOpEq, Register: 1, FromData: []byte{133}, ToData: []byte{136}}},
		[]expr.Any{nftexpr.LoadAddr(true, true)}, source)
	advertised := []expr.Any{}
	if len(v6) > 0 {
		if advertised, err = notIn(c, t, true, v6); err != nil {
			return err
		}
	}
	rule(icmp6, icmp6Type, is(136), load(expr.PayloadBaseTransportHeader, 8, 16), advertised)
	// Their link-layer address option names the pod's MAC address, as
	// ARP's sender does, and comes first: Linux takes the first option
	// of a type. One without options has none to load: no match.
	specified := []expr.Any{nftexpr.LoadAddr(true, true), &expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: make([]byte, 16)}}
	for _, m := range []struct {
		typ, option byte // option 1: source, 2: target link-layer address
		offset      uint32
	}{{133, 1, 8}, {135, 1, 24}, {136, 2, 24}} {
		rule(icmp6, icmp6Type, is(m.typ), specified, load(expr.PayloadBaseTransportHeader, m.offset, 8), differs(append([]byte{m.option, 1}, mac...)))
	}
	return c.SetAddElements(links, []nftables.SetElement{{Key: nftexpr.IfNameBytes(g.HostIf), VerdictData: &expr.Verdict{Kind: expr.VerdictJump, Chain: link.Name}}})
}

// answerSets are a bridged pod's sets of what it may answer, by IPv6 or
// not: UDP datagrams (udpTuple), and the hosts that sent it another
// protocol but TCP and ICMP, with the protocol (protoPair).
type answerSets struct {
	udp, proto map[bool]*nftables.Set
}

// addAnswerSets adds guard key's answer sets, with the elements given by
// set.
func addAnswerSets(c *nftables.Conn, t *nftables.Table, key string, elements map[string][]nftables.SetElement) (answerSets, error) {
	sets := answerSets{udp: map[bool]*nftables.Set{}, proto: map[bool]*nftables.Set{}}
	for _, is6 := range []bool{false, true} {
		addr := nftables.TypeIPAddr
		if is6 {
			addr = nftables.TypeIP6Addr
		}
		udp := &nftables.Set{Table: t, Name: udpAnswerSet(key, is6), HasTimeout: true, Dynamic: true, Timeout: udpAnswerTimeout, Size: 65536,
			Concatenation: true, KeyType: nftables.MustConcatSetType(addr, nftables.TypeInetService, nftables.TypeInetService)}
		proto := &nftables.Set{Table: t, Name: protoAnswerSet(key, is6), HasTimeout: true, Dynamic: true, Timeout: protoAnswerTimeout, Size: 65536,
			Concatenation: true, KeyType: nftables.MustConcatSetType(addr, nftables.TypeInetProto)}
		for _, set := range []*nftables.Set{udp, proto} {
			if err := c.AddSet(set, elements[set.Name]); err != nil {
				return answerSets{}, err
			}
		}
		sets.udp[is6], sets.proto[is6] = udp, proto
	}
	return sets, nil
}

// udpAnswerSet names guard key's set of the UDP datagrams its pod may
// answer over IPv6 if is6, else IPv4.
func udpAnswerSet(key string, is6 bool) string {
	if is6 {
		return "udp6-" + key
	}
	return "udp4-" + key
}

// protoAnswerSet names guard key's set of the hosts its pod may answer
// in a protocol but TCP, UDP and ICMP over IPv6 if is6, else IPv4.
func protoAnswerSet(key string, is6 bool) string {
	if is6 {
		return "proto6-" + key
	}
	return "proto4-" + key
}

// answerSetNames names guard key's four answer sets.
func answerSetNames(key string) []string {
	return []string{udpAnswerSet(key, false), udpAnswerSet(key, true), protoAnswerSet(key, false), protoAnswerSet(key, true)}
}

// regTuple is the first of the 32-bit registers udpTuple and protoPair
// load: a concatenation takes one or more of them a field.
const regTuple = unix.NFT_REG32_00

// otherProtocol matches a packet of a protocol but TCP, UDP, ICMP and
// ICMPv6: one whose answers this table cannot tell by its header.
func otherProtocol() []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte{unix.IPPROTO_TCP}},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte{unix.IPPROTO_UDP}},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte{unix.IPPROTO_ICMP}},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: []byte{unix.IPPROTO_ICMPV6}},
	}
}

// protoPair loads what a packet to the pod (to) or from it answers by,
// in a protocol but TCP, UDP and ICMP: the other end's address and the
// protocol.
func protoPair(is6, to bool) []expr.Any {
	addr := nftexpr.LoadAddr(is6, to)
	addr.DestRegister = regTuple
	return []expr.Any{addr, &expr.Meta{Key: expr.MetaKeyL4PROTO, Register: regTuple + nftexpr.AddrLen(is6)/4}}
}

// udpTuple loads what a UDP datagram to the pod (to) or from it answers
// by: the other end's address, its port and the pod's port. A fragment
// but the first has no ports: the rule ends there.
func udpTuple(is6, to bool) []expr.Any {
	addr := nftexpr.LoadAddr(is6, to)
	addr.DestRegister = regTuple
	next := regTuple + nftexpr.AddrLen(is6)/4
	theirs, ours := uint32(0), uint32(2) // source and destination port of what is sent to the pod
	if !to {
		theirs, ours = ours, theirs
	}
	return []expr.Any{
		addr,
		&expr.Payload{DestRegister: next, Base: expr.PayloadBaseTransportHeader, Offset: theirs, Len: 2},
		&expr.Payload{DestRegister: next + 1, Base: expr.PayloadBaseTransportHeader, Offset: ours, Len: 2},
	}
}

// inboundSet names guard key's set of the hosts that reached its pod
// over IPv6 if is6, else IPv4.
func inboundSet(key string, is6 bool) string {
	if is6 {
		return "inbound6-" + key
	}
	return "inbound4-" + key
}

// solicitedNode is the solicited-node multicast address of the IPv6
// address a (RFC 4291), where neighbour solicitations for it go.
func solicitedNode(a netip.Addr) netip.Addr {
	b := a.As16()
	return netip.AddrFrom16([16]byte{0xff, 0x02, 10: 0, 11: 0x01, 12: 0xff, 13: b[13], 14: b[14], 15: b[15]})
}

// ofFamily is those of addrs that are IPv6 addresses if is6, else IPv4.
func ofFamily(addrs []netip.Addr, is6 bool) []netip.Addr {
	var of []netip.Addr
	for _, a := range addrs {
		if a.Is6() == is6 {
			of = append(of, a)
		}
	}
	return of
}

// notIn matches what register 1 holds when none of addrs (one family's,
// at least one) is it.
func notIn(c *nftables.Conn, t *nftables.Table, is6 bool, addrs []netip.Addr) ([]expr.Any, error) {
	set := &nftables.Set{Table: t, Anonymous: true, Constant: true, KeyType: nftables.TypeIPAddr}
	if is6 {
		set.KeyType = nftables.TypeIP6Addr
	}
	var elems []nftables.SetElement
	for _, a := range addrs {
		elems = append(elems, nftables.SetElement{Key: a.AsSlice()})
	}
	if err := c.AddSet(set, elems); err != nil {
		return nil, err
	}
	return []expr.Any{&expr.Lookup{SourceRegister: 1, SetName: set.Name, SetID: set.ID, Invert: true}}, nil
}

// chainNames lists the chains of the family's guard table.
func chainNames(c *nftables.Conn, family nftables.TableFamily) map[string]bool {
	names := map[string]bool{}
	chains, _ := c.ListChainsOfTableFamily(family)
	for _, ch := range chains {
		if ch.Table.Name == GuardTable {
			names[ch.Name] = true
		}
	}
	return names
}

// removeChains queues the removal of the pod's map elements, chains and
// sets from t, as far as they exist (names: chainNames), and says from
// which interface name (the maps' key) they led.
func removeChains(c *nftables.Conn, t *nftables.Table, names map[string]bool, key string) (name []byte, ok bool) {
	if !names["from-"+key] {
		return nil, false
	}
	var ifs []nftables.SetElement
	if set, err := c.GetSetByName(t, "if-"+key); err == nil {
		ifs, _ = c.GetSetElements(set)
	}
	if len(ifs) > 0 {
		name = ifs[0].Key
		for _, m := range guardMapNames(t.Family) {
			if set, err := c.GetSetByName(t, m); err == nil {
				deleteKey(c, set, ifs[0].Key)
			}
		}
	}
	mine := []string{"from-" + key, "addr-" + key, "known-" + key, "to-" + key, "link-" + key}
	for _, n := range mine {
		if names[n] {
			c.FlushChain(&nftables.Chain{Table: t, Name: n})
		}
	}
	for _, n := range mine {
		if names[n] {
			c.DelChain(&nftables.Chain{Table: t, Name: n})
		}
	}
	for _, n := range append(answerSetNames(key), inboundSet(key, false), inboundSet(key, true), "if-"+key) {
		if set, err := c.GetSetByName(t, n); err == nil {
			c.DelSet(set)
		}
	}
	return name, true
}

// Remove deletes the pod's guards, and the tables once no pod is left; a
// missing guard is fine.
func (gs Guards) Remove(id string) error {
	return gs.remove(id, func(key string) bool { return Matches(key, id) })
}

// holdSet names the interfaces Hold holds, as a guard's "if-" set names
// its own: takeName hands the name to the guard that replaces the hold.
const holdSet = "if-holds"

// Hold drops everything the host's interface hostIf sends, from now
// until a guard takes its name (Install) or Release: for an interface
// that appeared in a sandbox's namespace, which must send nothing before
// its guard is made. In both families' tables, as it may yet become a
// bridge's port or stay routed; the hold is one short transaction,
// without the lock, that looks up only which tables there are, so it
// can land before the plugin that made the interface brings it up, as a
// whole guard (made after looking at the interface, its addresses and
// the tables) would not. A name a guard has already is not taken: the
// transaction fails.
func (gs Guards) Hold(hostIf string) error {
	c, err := nftables.New()
	if err != nil {
		return err
	}
	if err := ensureTables(c); err != nil {
		return fmt.Errorf("holding %s on the host: %w", hostIf, err)
	}
	name := nftexpr.IfNameBytes(hostIf)
	drop := &expr.Verdict{Kind: expr.VerdictDrop}
	for _, f := range guardFamilies {
		t := &nftables.Table{Family: f, Name: GuardTable}
		holds := &nftables.Set{Table: t, Name: holdSet, KeyType: nftables.TypeIFName, KeyByteOrder: binaryutil.NativeEndian}
		if err := c.AddSet(holds, []nftables.SetElement{{Key: name}}); err != nil {
			return err
		}
		for _, m := range guardMapNames(f) {
			if m == toPods {
				continue
			}
			vmap := &nftables.Set{Table: t, Name: m, IsMap: true, KeyType: nftables.TypeIFName, KeyByteOrder: binaryutil.NativeEndian, DataType: nftables.TypeVerdict}
			if err := c.SetAddElements(vmap, []nftables.SetElement{{Key: name, VerdictData: drop}}); err != nil {
				return err
			}
		}
	}
	if err := nftexpr.Flush(c); err != nil {
		return fmt.Errorf("holding %s on the host: %w", hostIf, err)
	}
	return nil
}

// releaseHolds queues the release of t's holds of the interfaces
// named that match.
func releaseHolds(c *nftables.Conn, t *nftables.Table, match func(hostIf string) bool) (queued bool) {
	holds, err := c.GetSetByName(t, holdSet)
	if err != nil {
		return false // no table, or no hold yet
	}
	elems, _ := c.GetSetElements(holds)
	for _, e := range elems {
		if !match(unix.ByteSliceToString(e.Key)) {
			continue
		}
		c.SetDeleteElements(holds, []nftables.SetElement{{Key: e.Key}})
		for _, m := range guardMapNames(t.Family) {
			if set, err := c.GetSetByName(t, m); err == nil {
				deleteKey(c, set, e.Key)
			}
		}
		queued = true
	}
	return queued
}

// gone says whether the host has no interface of that name.
func gone(hostIf string) bool {
	_, err := netlink.LinkByName(hostIf)
	return errors.As(err, new(netlink.LinkNotFoundError))
}

// releaseName queues the release of hostIf's holds in both families'
// tables.
func releaseName(c *nftables.Conn, hostIf string) (queued bool) {
	for _, f := range guardFamilies {
		t := &nftables.Table{Family: f, Name: GuardTable}
		queued = releaseHolds(c, t, func(name string) bool { return name == hostIf }) || queued
	}
	return queued
}

// Release ends Hold's hold of hostIf, for an interface that went, or
// that needs no guard, before a guard took its name.
func (gs Guards) Release(hostIf string) error {
	unlock, err := gs.lock()
	if err != nil {
		return err
	}
	defer unlock()
	c, err := nftables.New()
	if err != nil {
		return err
	}
	if !releaseName(c, hostIf) {
		return nil
	}
	return nftexpr.Flush(c)
}

// RemovePort deletes the guard of sandbox id's interface port (HostGuard.Port).
func (gs Guards) RemovePort(id, port string) error {
	key := HostGuard{ID: id, Port: port}.key()
	return gs.remove(id, func(k string) bool { return k == key })
}

// remove deletes those of sandbox id's guards whose keys match, and the
// tables once no pod is left.
func (gs Guards) remove(id string, match func(key string) bool) error {
	unlock, err := gs.lock()
	if err != nil {
		return err
	}
	defer unlock()
	c, err := nftables.New()
	if err != nil {
		return err
	}
	var errs []error
	records, _ := filepath.Glob(gs.recordPath(guardKey(id) + "*"))
	for _, p := range records {
		if key, _ := strings.CutSuffix(filepath.Base(p), ".json"); match(key) {
			errs = append(errs, os.Remove(p))
		}
	}
	for _, f := range guardFamilies {
		t := &nftables.Table{Family: f, Name: GuardTable}
		names, removed := chainNames(c, f), false
		for name := range names {
			if k, ok := strings.CutPrefix(name, "from-"); ok && match(k) {
				_, ok := removeChains(c, t, names, k)
				removed = removed || ok
			}
		}
		// And the holds of interfaces whose sandbox ended before they
		// were guarded: a new interface could take the name.
		if releaseHolds(c, t, gone) || removed {
			errs = append(errs, nftexpr.Flush(c))
		}
	}
	// The tables go with the node's last guard, both at once (ensureTables).
	left := 0
	for _, f := range guardFamilies {
		keys, err := guardKeys(c, f)
		if err != nil {
			return errors.Join(errs...)
		}
		left += len(keys)
	}
	if left == 0 {
		queued := false
		for _, f := range guardFamilies {
			if tt, err := c.ListTableOfFamily(GuardTable, f); err == nil && tt != nil {
				c.DelTable(tt)
				queued = true
			}
		}
		if queued { // one transaction: each that deletes costs 8-24 ms here
			errs = append(errs, nftexpr.Flush(c))
		}
	}
	return errors.Join(errs...)
}

// ensureTables adds the families' tables that are missing while the node
// has a guard: a hold (Hold) of an added veth, which may stay routed or
// become a bridge's port, then finds both (one that had to make a table
// first took 2.7-3.2 ms, against 0.4-1.0, and lost more of its race).
func ensureTables(c *nftables.Conn) error {
	tables, err := c.ListTablesOfFamily(nftables.TableFamilyUnspecified)
	if err != nil {
		return err
	}
	have := map[nftables.TableFamily]bool{}
	for _, t := range tables {
		have[t.Family] = have[t.Family] || t.Name == GuardTable
	}
	for _, f := range guardFamilies {
		if have[f] {
			continue
		}
		if _, _, err := guardTable(c, f); err != nil {
			return err
		}
	}
	return nil
}

// guardKeys lists the keys of the pods guarded in the family's table.
func guardKeys(c *nftables.Conn, f nftables.TableFamily) ([]string, error) {
	chains, err := c.ListChainsOfTableFamily(f)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, ch := range chains {
		if k, ok := strings.CutPrefix(ch.Name, "from-"); ok && ch.Table.Name == GuardTable {
			out = append(out, k)
		}
	}
	return out, nil
}

// Recorded reports whether Dir holds a record of the pod's guard: it was
// installed, and not removed since.
func (gs Guards) Recorded(id string) bool {
	_, err := os.Stat(gs.recordPath(guardKey(id)))
	return err == nil
}

// RecordedAny reports whether Dir holds a record of any of sandbox id's
// guards (Recorded: of its first interface's).
func (gs Guards) RecordedAny(id string) bool { return len(gs.recordsOf(id)) > 0 }

// HostIfs names the host's interfaces sandbox id's recorded guards guard.
func (gs Guards) HostIfs(id string) map[string]bool {
	out := map[string]bool{}
	for _, r := range gs.recordsOf(id) {
		out[r.HostIf] = true
	}
	return out
}

// recordsOf reads sandbox id's guard records.
func (gs Guards) recordsOf(id string) []guardRecord {
	var out []guardRecord
	paths, _ := filepath.Glob(gs.recordPath(guardKey(id) + "*"))
	for _, p := range paths {
		if key, _ := strings.CutSuffix(filepath.Base(p), ".json"); Matches(key, id) {
			if r, err := readRecord(p); err == nil {
				out = append(out, r)
			}
		}
	}
	return out
}

// Has reports whether the pod's guard exists, whole: a bridge port's
// with the inet table's chain that decides what it marks unsure.
func (gs Guards) Has(id string) (bool, error) {
	c, err := nftables.New()
	if err != nil {
		return false, err
	}
	for _, f := range guardFamilies {
		keys, err := listedKeys(c, f)
		if err != nil {
			return false, err
		}
		if slices.Contains(keys, guardKey(id)) {
			return f == nftables.TableFamilyINet || hasUnsureChain(c), nil
		}
	}
	return false, nil
}

// List names the guarded pods by the first 12 characters of their ids.
func (gs Guards) List() ([]string, error) {
	c, err := nftables.New()
	if err != nil {
		return nil, err
	}
	var out []string
	for _, f := range guardFamilies {
		keys, err := listedKeys(c, f)
		if err != nil {
			return nil, err
		}
		out = append(out, keys...)
	}
	return out, nil
}

// listedKeys is guardKeys, none where nftables has nothing to list.
func listedKeys(c *nftables.Conn, f nftables.TableFamily) ([]string, error) {
	keys, err := guardKeys(c, f)
	if errors.Is(err, unix.ENOENT) {
		return nil, nil
	}
	return keys, err
}

// Matches reports whether a key from List is one of id's guards.
func Matches(key, id string) bool {
	k := guardKey(id)
	return key == k || strings.HasPrefix(key, k+"+")
}

// guardRecord is what Restore needs of a guard: the guard, and its
// veth's index, so that a veth of the same name made since (the pod
// went without DEL, another took the name) is not mistaken for it.
type guardRecord struct {
	HostGuard
	Index int `json:"ifindex"`
}

func readRecord(path string) (guardRecord, error) {
	var r guardRecord
	b, err := os.ReadFile(path)
	if err == nil {
		err = json.Unmarshal(b, &r)
	}
	return r, err
}

// record keeps g's description for Restore; the caller holds the lock.
func (gs Guards) record(g HostGuard) error {
	path := gs.recordPath(g.key())
	link, err := netlink.LinkByName(g.HostIf)
	if err == nil {
		err = os.MkdirAll(filepath.Dir(path), 0o700)
	}
	if err != nil {
		return fmt.Errorf("recording the guard of %s: %w", g.HostIf, err)
	}
	// A pod gone without DEL whose veth's name g's took (takeName) no
	// longer guards anything: Restore must not give it the name back.
	if others, err := filepath.Glob(filepath.Join(filepath.Dir(path), "*.json")); err == nil {
		for _, p := range others {
			if old, err := readRecord(p); err == nil && old.HostIf == g.HostIf && p != path {
				os.Remove(p)
			}
		}
	}
	b, _ := json.Marshal(guardRecord{HostGuard: g, Index: link.Attrs().Index})
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return fmt.Errorf("recording the guard of %s: %w", g.HostIf, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("recording the guard of %s: %w", g.HostIf, err)
	}
	return nil
}

// Restore puts back every recorded guard whose chains are gone (a
// `flush ruleset` takes the tables) and says whose it put back. A
// guard whose veth is gone goes (its pod went without DEL), also where
// another veth has its name now; one that cannot be put back is an
// error naming it. A bridge port's guard put back knows whom it knew in
// snapshot (nil: no one), for as long as it would have.
func (gs Guards) Restore(snapshot *Snapshot) (restored []string, err error) {
	dir := filepath.Join(gs.Dir, "guards")
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		return nil, nil // no pod was ever guarded here
	}
	unlock, err := gs.lock()
	if err != nil {
		return nil, err
	}
	defer unlock()
	entries, err := os.ReadDir(dir)
	if err != nil {
		return nil, err
	}
	c, err := nftables.New()
	if err != nil {
		return nil, err
	}
	have := map[string]bool{}
	for _, f := range guardFamilies {
		keys, _ := guardKeys(c, f)
		for _, k := range keys {
			have[k] = true
		}
	}
	var errs []error
	missing := map[nftables.TableFamily][]HostGuard{}
	for _, e := range entries {
		key, ok := strings.CutSuffix(e.Name(), ".json")
		if !ok || have[key] {
			continue
		}
		r, err := readRecord(gs.recordPath(key))
		if err != nil {
			errs = append(errs, fmt.Errorf("the guard of pod %s: %w", key, err))
			continue
		}
		g := r.HostGuard
		if link, err := netlink.LinkByName(g.HostIf); errors.As(err, new(netlink.LinkNotFoundError)) || err == nil && link.Attrs().Index != r.Index {
			os.Remove(gs.recordPath(key)) // the pod's veth is gone
			continue
		}
		family, err := guardFamily(g)
		if err != nil {
			errs = append(errs, fmt.Errorf("putting back the guard of pod %s: %w", key, err))
			continue
		}
		missing[family] = append(missing[family], g)
	}
	// What a bridge port's guard knew went with the flush.
	bridged := missing[nftables.TableFamilyBridge]
	for i := range bridged {
		bridged[i].known = snapshot.of(bridged[i].key())
		bridged[i].answers = snapshot.answersOf(bridged[i].key())
	}
	// A family's guards a batch per transaction: one at a time, a node's
	// hundredth pod waited ~2 s (and a transaction of a hundred is too
	// long a netlink message). One at a time again if a batch fails, to
	// name the guard that cannot be put back.
	const batchSize = 64
	for _, family := range guardFamilies {
		for rest := missing[family]; len(rest) > 0; {
			batch := rest[:min(len(rest), batchSize)]
			rest = rest[len(batch):]
			if len(batch) > 1 && install(family, true, batch...) == nil {
				for _, g := range batch {
					restored = append(restored, g.key())
				}
				continue
			}
			for _, g := range batch {
				err := install(family, true, g)
				if err != nil && (g.known != nil || g.answers != nil) {
					g.known, g.answers = nil, nil // the guard first, knowing no one
					err = install(family, true, g)
				}
				if err != nil {
					errs = append(errs, fmt.Errorf("putting back the guard of pod %s: %w", g.key(), err))
					continue
				}
				restored = append(restored, g.key())
			}
		}
	}
	// Also where only the inet table went: the bridges' guards need it.
	if len(restored) > 0 || len(have) > 0 {
		errs = append(errs, ensureTables(c))
	}
	return restored, errors.Join(errs...)
}

// A Snapshot is what the guards of bridge ports know of who reached their
// pods (Guards.Snapshot), for Restore to give back after a `flush ruleset`
// took it: what those hosts send the pods then is answers, which make no
// one known, so the pods' sides of connections they made would stay cut.
// Taken from the guards' own sets rather than from conntrack, which may
// hold a connection a pod forged with itself through the node in the
// flush's window. So are the answer sets, without which the pods'
// answers to datagrams sent before would be dropped.
type Snapshot struct {
	taken   time.Time
	known   map[string][]knownHost // by guard
	answers map[string][]setEntry  // by answer set
}

// setEntry is an element of a set with a timeout, and the time it has left.
type setEntry struct {
	key  []byte
	left time.Duration
}

type knownHost struct {
	addr netip.Addr
	left time.Duration // until the guard would forget it
}

// Snapshot reads what the bridge ports' guards know now; nil where there
// are none (the table is gone).
func (gs Guards) Snapshot() *Snapshot {
	c, err := nftables.New(nftables.AsLasting()) // a socket for every set's elements
	if err != nil {
		return nil
	}
	defer c.CloseLasting()
	sets, err := c.GetSets(&nftables.Table{Family: nftables.TableFamilyBridge, Name: GuardTable})
	if err != nil {
		return nil
	}
	s := &Snapshot{taken: time.Now(), known: map[string][]knownHost{}, answers: map[string][]setEntry{}}
	for _, set := range sets {
		if isAnswerSet(set.Name) {
			elems, _ := c.GetSetElements(set)
			for _, e := range elems {
				if e.Expires > 0 {
					s.answers[set.Name] = append(s.answers[set.Name], setEntry{e.Key, e.Expires})
				}
			}
			continue
		}
		key, ok := strings.CutPrefix(set.Name, inboundSet("", false))
		if !ok {
			if key, ok = strings.CutPrefix(set.Name, inboundSet("", true)); !ok {
				continue
			}
		}
		elems, _ := c.GetSetElements(set)
		for _, e := range elems {
			if a, ok := netip.AddrFromSlice(e.Key); ok && e.Expires > 0 {
				s.known[key] = append(s.known[key], knownHost{a.Unmap(), e.Expires})
			}
		}
	}
	return s
}

// of is what guard key knew, as far as it would know it still: at most
// maxKnown hosts, those heard from last, as a guard put back is one
// netlink message of a transaction.
func (s *Snapshot) of(key string) []knownHost {
	if s == nil {
		return nil
	}
	return stillDue(s.known[key], time.Since(s.taken), maxKnown, func(h *knownHost) *time.Duration { return &h.left })
}

// stillDue is what of entries has time left since after the snapshot,
// that taken off, most left first: at most max.
func stillDue[E any](entries []E, since time.Duration, max int, left func(*E) *time.Duration) []E {
	var due []E
	for _, e := range entries {
		if l := left(&e); *l > since {
			*l -= since
			due = append(due, e)
		}
	}
	slices.SortFunc(due, func(a, b E) int { return cmp.Compare(*left(&b), *left(&a)) })
	return due[:min(len(due), max)]
}

const maxKnown = 4096

// answersOf is what guard key's answer sets held, by set, as far as they
// would hold it still: at most maxAnswers elements a set, the last
// refreshed, so that the message stays within a transaction's.
func (s *Snapshot) answersOf(key string) map[string][]nftables.SetElement {
	if s == nil {
		return nil
	}
	since := time.Since(s.taken)
	out := map[string][]nftables.SetElement{}
	for _, name := range answerSetNames(key) {
		for _, e := range stillDue(s.answers[name], since, maxAnswers, func(e *setEntry) *time.Duration { return &e.left }) {
			out[name] = append(out[name], nftables.SetElement{Key: e.key, Timeout: e.left})
		}
	}
	return out
}

const maxAnswers = 1024

// isAnswerSet says whether name is a guard's answer set.
func isAnswerSet(name string) bool {
	return slices.ContainsFunc(answerSetNames(""), func(prefix string) bool { return strings.HasPrefix(name, prefix) })
}

// WithoutLinkChecks names the recorded pods on a bridge whose guards an
// earlier childflow made, before the link checks (addLinkChain): their
// records have no MAC address, and they get the checks only when added
// again.
func (gs Guards) WithoutLinkChecks() []string {
	paths, _ := filepath.Glob(filepath.Join(gs.Dir, "guards", "*.json"))
	var out []string
	for _, p := range paths {
		r, err := readRecord(p)
		if err != nil || r.MAC != "" {
			continue
		}
		if link, err := netlink.LinkByName(r.HostIf); err == nil && link.Attrs().Index == r.Index && link.Attrs().MasterIndex != 0 {
			out = append(out, strings.TrimSuffix(filepath.Base(p), ".json"))
		}
	}
	return out
}

// lock takes the guards' lock file.
func (gs Guards) lock() (func(), error) {
	path := filepath.Join(gs.Dir, "guards.lock")
	if err := os.MkdirAll(gs.Dir, 0o700); err != nil {
		return nil, fmt.Errorf("host guards' lock: %w", err)
	}
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("host guards' lock: %w", err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("host guards' lock: %w", err)
	}
	return func() { f.Close() }, nil
}

// aroundNetfilter names what, on the host end's receive path, can move
// the pod's frames on before netfilter sees them: an XDP program, a tc
// ingress filter that redirects or runs a program, a tcx program. A
// redirect to an IFB device (the bandwidth plugin's shaping) hands the
// frame back to the same path and is fine.
func aroundNetfilter(link netlink.Link) string {
	if x := link.Attrs().Xdp; x != nil && x.Attached {
		return "an XDP program"
	}
	filters, err := netlink.FilterList(link, netlink.HANDLE_MIN_INGRESS)
	if err != nil {
		return "a tc ingress filter that could not be listed (" + err.Error() + ")"
	}
	for _, f := range filters {
		var actions []netlink.Action
		switch f := f.(type) {
		case *netlink.U32:
			actions = f.Actions
		case *netlink.MatchAll:
			actions = f.Actions
		case *netlink.Flower:
			actions = f.Actions
		default: // a BPF program, or a filter not known here
			return "a tc ingress filter (" + f.Type() + ")"
		}
		for _, a := range actions {
			switch a := a.(type) {
			case *netlink.BpfAction:
				return "a tc ingress filter running a BPF program"
			case *netlink.MirredAction:
				if to, err := netlink.LinkByIndex(a.Ifindex); err != nil || to.Type() != "ifb" {
					return "a tc ingress filter redirecting to another interface"
				}
			}
		}
	}
	if tcxPrograms(link.Attrs().Index) > 0 {
		return "a tcx program"
	}
	return ""
}

// tcxPrograms counts the programs attached to the interface's tcx
// ingress hook (Linux 6.6; before it the query fails: none).
func tcxPrograms(ifindex int) uint32 {
	// union bpf_attr's query: target_ifindex, attach_type, query_flags,
	// attach_flags, prog_ids, prog_cnt, ...
	var attr [64]byte
	binary.NativeEndian.PutUint32(attr[0:], uint32(ifindex))
	binary.NativeEndian.PutUint32(attr[4:], unix.BPF_TCX_INGRESS)
	_, _, errno := unix.Syscall(unix.SYS_BPF, unix.BPF_PROG_QUERY, uintptr(unsafe.Pointer(&attr[0])), uintptr(len(attr)))
	if errno != 0 {
		return 0
	}
	return binary.NativeEndian.Uint32(attr[24:])
}
