package steer

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"strings"
	"time"
	"unsafe"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/childflow/childflow/internal/nftexpr"
)

// HostGuardTable names the host-side table that guards one pod's veth.
func HostGuardTable(id string) string {
	if len(id) > 12 {
		id = id[:12]
	}
	return "childflow-" + id
}

// HostGuard filters, in the host's namespace, what a sandboxed pod sends
// on its veth. Rules inside the pod cannot stop a process with CAP_NET_RAW
// (a default capability) from writing frames to its end of the veth:
// frames to anywhere, from any address. From the pod pass neighbour
// discovery and ARP, and packets from the pod's own addresses, not to
// port 53 (the pod's DNS goes to the engine, whatever resolver it names),
// that answer someone who reached the pod or go to a kept range. Checking
// the source also keeps the pod from making the host's conntrack believe
// a remote host reached it first, with a packet "from" that host.
type HostGuard struct {
	Table  string         // HostGuardTable(id)
	HostIf string         // the host's end of the pod's veth
	Pod    []netip.Addr   // the pod's addresses: the only sources it may send from
	Keep   []netip.Prefix // destinations it may reach around the engine
}

// inboundTimeout is how long a remote host that sent a packet to a pod on
// a bridge may hear from it.
const inboundTimeout = time.Hour

// InstallHostGuard adds g's table. A routed veth is filtered where the
// host forwards or receives (inet, with conntrack's view of who reached
// whom). A bridge's port is not: there the host sees the packets come
// from the bridge, so the frames are filtered by port in a bridge table,
// which sees conntrack only with a module not every kernel has
// (nf_conntrack_bridge), and remembers instead for an hour every address
// that sent the pod a packet. A veth on any other master (Open vSwitch, a
// VRF) cannot be guarded: an error.
func InstallHostGuard(g HostGuard) error {
	link, err := netlink.LinkByName(g.HostIf)
	if err != nil {
		return fmt.Errorf("guarding %s on the host: %w", g.HostIf, err)
	}
	if what := aroundNetfilter(link); what != "" {
		return fmt.Errorf("cannot guard the pod's veth %s on the host: %s on it (as Cilium's or Calico's eBPF data plane attaches) can send the pod's frames on before netfilter sees them", g.HostIf, what)
	}
	bridged := false
	if m := link.Attrs().MasterIndex; m != 0 {
		master, err := netlink.LinkByIndex(m)
		if err != nil {
			return fmt.Errorf("guarding %s on the host: its master: %w", g.HostIf, err)
		}
		if master.Type() != "bridge" {
			return fmt.Errorf("cannot guard the pod's veth %s on the host: it is a port of %s, a %s (childflow guards routed veths and Linux bridges' ports)", g.HostIf, master.Attrs().Name, master.Type())
		}
		bridged = true
	}
	c, err := nftables.New()
	if err != nil {
		return err
	}
	family, ipFamily := nftables.TableFamilyINet, nftexpr.Family
	if bridged {
		family, ipFamily = nftables.TableFamilyBridge, nftexpr.EtherType
	}
	t := c.AddTable(&nftables.Table{Family: family, Name: g.Table})
	accept := &expr.Verdict{Kind: expr.VerdictAccept}
	drop := &expr.Verdict{Kind: expr.VerdictDrop}
	on := func(key expr.MetaKey) []expr.Any {
		return []expr.Any{&expr.Meta{Key: key, Register: 1}, &expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: nftexpr.IfNameBytes(g.HostIf)}}
	}
	rule := func(ch *nftables.Chain, e ...[]expr.Any) {
		c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: nftexpr.Cat(e...)})
	}

	fromPod := c.AddChain(&nftables.Chain{Name: "from-pod", Table: t})
	fromPodAddr := c.AddChain(&nftables.Chain{Name: "from-pod-address", Table: t})
	// Before the host's own filters (inet's at 0, bridge's at -200): a
	// drop here is final.
	prio := nftables.ChainPriorityRef(-10)
	if bridged {
		prio = nftables.ChainPriorityRef(-210)
	}
	base := func(hook *nftables.ChainHook) *nftables.Chain {
		return c.AddChain(&nftables.Chain{Name: hookName(hook), Table: t, Type: nftables.ChainTypeFilter, Hooknum: hook, Priority: prio})
	}
	forward, input := base(nftables.ChainHookForward), base(nftables.ChainHookInput)
	for _, ch := range []*nftables.Chain{forward, input} {
		rule(ch, on(expr.MetaKeyIIFNAME), []expr.Any{&expr.Verdict{Kind: expr.VerdictJump, Chain: fromPod.Name}})
	}

	rule(fromPod, nftexpr.NeighbourDiscovery(), []expr.Any{accept})
	if bridged {
		rule(fromPod, nftexpr.EtherTypeIs(unix.ETH_P_ARP), []expr.Any{accept})
	}
	for _, a := range g.Pod {
		rule(fromPod, ipFamily(a.Is6()), nftexpr.AddrIn(netip.PrefixFrom(a, a.BitLen()), true),
			[]expr.Any{&expr.Verdict{Kind: expr.VerdictGoto, Chain: fromPodAddr.Name}})
	}
	rule(fromPod, []expr.Any{drop})

	// First, as the set below remembers addresses, not connections: the
	// node itself may have probed the pod.
	for _, proto := range []byte{unix.IPPROTO_UDP, unix.IPPROTO_TCP} {
		rule(fromPodAddr, nftexpr.L4(proto), nftexpr.Dport(53), []expr.Any{drop})
	}
	if bridged {
		output := base(nftables.ChainHookOutput)
		for _, is6 := range []bool{false, true} {
			set := &nftables.Set{Table: t, Name: "inbound4", KeyType: nftables.TypeIPAddr, HasTimeout: true, Dynamic: true, Timeout: inboundTimeout, Size: 65536}
			if is6 {
				set.Name, set.KeyType = "inbound6", nftables.TypeIP6Addr
			}
			if err := c.AddSet(set, nil); err != nil {
				return err
			}
			remember := &expr.Dynset{SrcRegKey: 1, SetName: set.Name, SetID: set.ID, Operation: unix.NFT_DYNSET_OP_UPDATE, Timeout: inboundTimeout}
			for _, ch := range []*nftables.Chain{forward, output} {
				rule(ch, on(expr.MetaKeyOIFNAME), ipFamily(is6), []expr.Any{nftexpr.LoadAddr(is6, true), remember})
			}
			rule(fromPodAddr, ipFamily(is6), []expr.Any{nftexpr.LoadAddr(is6, false), &expr.Lookup{SourceRegister: 1, SetName: set.Name, SetID: set.ID}, accept})
		}
	} else {
		rule(fromPodAddr, nftexpr.Established(), []expr.Any{accept})
	}
	for _, k := range g.Keep {
		rule(fromPodAddr, ipFamily(k.Addr().Is6()), nftexpr.AddrIn(k, false), []expr.Any{accept})
	}
	rule(fromPodAddr, []expr.Any{drop})
	if err := c.Flush(); err != nil {
		return fmt.Errorf("guarding %s on the host: %w", g.HostIf, err)
	}
	return nil
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

func hookName(h *nftables.ChainHook) string {
	switch h {
	case nftables.ChainHookForward:
		return "forward"
	case nftables.ChainHookInput:
		return "input"
	}
	return "output"
}

// guardFamilies are the families a guard's table may be of.
var guardFamilies = []nftables.TableFamily{nftables.TableFamilyINet, nftables.TableFamilyBridge}

// RemoveHostGuard deletes the table; a missing one is fine.
func RemoveHostGuard(table string) {
	c, err := nftables.New()
	if err != nil {
		return
	}
	for _, f := range guardFamilies {
		c.DelTable(&nftables.Table{Family: f, Name: table})
		c.Flush() // one at a time: deleting a missing table fails its batch
	}
}

// HasHostGuard reports whether the guard table exists.
func HasHostGuard(table string) (bool, error) {
	c, err := nftables.New()
	if err != nil {
		return false, err
	}
	for _, f := range guardFamilies {
		if t, err := c.ListTableOfFamily(table, f); err == nil && t != nil {
			return true, nil
		}
	}
	return false, nil
}

// HostGuards lists the guard tables on the host (for GC).
func HostGuards() ([]string, error) {
	c, err := nftables.New()
	if err != nil {
		return nil, err
	}
	var tables []*nftables.Table
	for _, f := range guardFamilies {
		ts, err := c.ListTablesOfFamily(f)
		if err != nil {
			return nil, err
		}
		tables = append(tables, ts...)
	}
	var out []string
	for _, t := range tables {
		// Exactly "childflow-" and a 12-character id: rootful tables
		// (childflow-root-*, childflow-rootguard) are not guards.
		if len(t.Name) == len("childflow-")+12 && strings.HasPrefix(t.Name, "childflow-") && !strings.HasPrefix(t.Name, "childflow-root") {
			out = append(out, t.Name)
		}
	}
	return out, nil
}
