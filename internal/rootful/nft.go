package rootful

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

	"github.com/childflow/childflow/engine"
	"github.com/childflow/childflow/internal/netplan"
	"github.com/childflow/childflow/internal/nftexpr"
	"github.com/childflow/childflow/policy"
)

// TablePrefix starts the name of every per-sandbox table.
const TablePrefix = "childflow-root-"

// tableSpec is what the per-sandbox table is built from.
type tableSpec struct {
	name   string
	hostIf string
	plan   netplan.Plan
	policy *policy.Policy
	group  uint16 // NFLOG group of the flow events
	mark   uint32 // the slot's mark: on each packet the policy lets out, and each connection
	tproxy uint16 // local port of the transparent proxy, 0 for none
	tpMark uint32 // packet mark that routes TPROXY'd packets locally
	ifMark uint32 // packet mark that routes through --iface, 0 for none
	iface  string // --iface
	// logAllowed logs allowed flows too; without a flow log or summary
	// only denials are (--fail-on-leak counts them), sparing each new
	// connection a trip to userspace.
	logAllowed bool
}

// routeMark is the mark routing wants on the sandbox's flows: the
// slot's, or --iface's, which routes by that interface and is the slot's
// too to the backstop.
func (s tableSpec) routeMark() uint32 {
	if s.ifMark != 0 {
		return s.ifMark
	}
	return s.mark
}

// Set names; the 4 and 6 variants hold each family.
const (
	setMetadata   = "metadata"
	setPrivate    = "private"
	setDenyCIDR   = "deny_cidr"
	setAllowCIDR  = "allow_cidr"
	setAllowHost  = "allow_host"    // the allow-cidrs that name the host (policy.NamesHost)
	setPools      = "gateway_pools" // the ranges sandboxes' gateways come from (netplan.Pools)
	setTunAllowed = "tunnelled_allowed"
	setTunnelled  = "tunnelled"
	setDomDeny    = "domain_deny"
	setDomAllow   = "domain_allow"
)

// Log prefixes carry the verdict and reason to the flow-event reader,
// or say that the flow limit refused a flow.
const (
	logAllow = "cf a "
	logDeny  = "cf d "
	logLimit = "cf l"
)

// maxFlows bounds the flows (TCP connections, UDP and other flows) a
// sandbox holds beyond the host, as the engine bounds its own:
// conntrack's table is the host's, and a sandbox holding flows open
// would fill it for everyone (12000 UDP flows from one sandbox, each
// answered once, stayed there 30 s).
const maxFlows = engine.DefaultMaxFlows

// nft builds rules one expression list at a time.
type nft struct {
	c *nftables.Conn
	t *nftables.Table
}

func (n nft) rule(ch *nftables.Chain, e ...expr.Any) {
	n.c.AddRule(&nftables.Rule{Table: n.t, Chain: ch, Exprs: e})
}

// setElementsPerMessage keeps each message's list of set elements within
// the 64 KiB a netlink attribute's length can say: the nftables library
// lets a longer one's length wrap, and the kernel then reads part of the
// list without an error (an IPv6 --deny-cidr list of 1500 ranges put
// 952 of its 3000 elements in the set).
const setElementsPerMessage = 512

// installTable creates the sandbox's whole table:
//
//	table inet childflow-root-ID {
//	  sets: metadata, private, deny_cidr, allow_cidr, tunnelled(_allowed)
//	        (intervals); domain_deny, domain_allow (timeouts, fed by the resolver)
//	  chain dns     nat prerouting:  DNS from the sandbox to any address -> the resolver
//	  chain nat     nat postrouting: masquerade what the sandbox sends out
//	  chain mangle  filter prerouting mangle: the slot's conntrack mark, TPROXY
//	  chain decide  filter prerouting dstnat+10: flows out -> policy, the routing mark if allowed
//	  chain forward filter forward:  replies in; nothing new in
//	  chain input   filter input:    replies, ND, DNS to the resolver, TPROXY; else policy
//	  chain policy, host, after_cidr: policy.Decide's order, each verdict logged
//	}
//
// The sets, with their elements, come first, in a transaction of their
// own; the chains, whose rules look them up, in a second. Created and
// filled in the same transaction as the rules, an interval set was
// sometimes empty for a packet the new rules already saw (a table put
// back while the sandbox sent to a denied host: 3 of 60 runs let a
// datagram through, by the default allow); a deny rule whose set is not
// there yet would allow. domain is what the domain sets hold from the
// start.
func installTable(s tableSpec, domain []domainElement) (err error) {
	c, err := nftables.New(nftables.WithSockOptions(largeBuffers))
	if err != nil {
		return err
	}
	n := nft{c: c, t: c.AddTable(&nftables.Table{Family: nftables.TableFamilyINet, Name: s.name})}
	p := s.policy

	sets := map[string]*nftables.Set{}
	filled := map[*nftables.Set]int{} // elements put in each set
	addSet := func(name string, is6 bool, elems []netip.Prefix, timeout bool) error {
		name, typ := familySet(name, is6)
		set := &nftables.Set{Table: n.t, Name: name, KeyType: typ, Interval: !timeout, HasTimeout: timeout}
		if timeout {
			// Fed by what the sandbox resolves, for TTLs its resolver
			// chooses: bounded as the engine's names cache is.
			set.Size = domainSetSize
		}
		var el []nftables.SetElement
		for _, sp := range spans(elems, is6) {
			el = append(el, nftables.SetElement{Key: sp.from.AsSlice()})
			if end := sp.to.Next(); end.IsValid() {
				el = append(el, nftables.SetElement{Key: end.AsSlice(), IntervalEnd: true})
			}
		}
		if err := c.AddSet(set, nil); err != nil {
			return fmt.Errorf("set %s: %w", set.Name, err)
		}
		if err := addElements(c, set, el); err != nil {
			return err
		}
		sets[name] = set
		filled[set] = len(el)
		return nil
	}
	var metadata, private []netip.Prefix
	if p.BlockMetadata {
		metadata = withTunnelled(policy.MetadataAddrs)
	}
	if p.BlockPrivate {
		private = withTunnelled(policy.PrivateRanges)
	}
	for _, is6 := range []bool{false, true} {
		for name, elems := range map[string][]netip.Prefix{
			setMetadata: metadata, setPrivate: private, setDenyCIDR: withTunnelled(p.DenyCIDRs),
			setAllowCIDR: p.AllowCIDRs, setTunAllowed: tunnelledAllowed(p.AllowCIDRs), setTunnelled: tunnelledForms,
			setAllowHost: p.HostAllowCIDRs(), setPools: netplan.Pools,
		} {
			if err := addSet(name, is6, elems, false); err != nil {
				return err
			}
		}
		for _, name := range []string{setDomDeny, setDomAllow} {
			if err := addSet(name, is6, nil, true); err != nil {
				return err
			}
		}
	}
	bySet := map[string][]nftables.SetElement{}
	for _, e := range domain {
		name, _ := e.family()
		bySet[name] = append(bySet[name], e.element())
	}
	for name, el := range bySet {
		if err := addElements(c, sets[name], el); err != nil {
			return err
		}
	}
	if err := nftexpr.Flush(c); err != nil {
		return fmt.Errorf("creating nftables table %s: %w", s.name, err)
	}
	// Without its chains the table would pass for whole: it goes, and
	// comes back whole when next put back.
	defer func() {
		if err != nil {
			deleteTables(s.name)
		}
	}()
	// A set missing elements would leave part of a deny rule out
	// without an error: read each back.
	for set, want := range filled {
		if want == 0 {
			continue
		}
		got, err := c.GetSetElements(set)
		if err != nil {
			return fmt.Errorf("reading nftables set %s: %w", set.Name, err)
		}
		if len(got) != want {
			return fmt.Errorf("nftables set %s holds %d of its %d elements", set.Name, len(got), want)
		}
	}

	fromSandbox := nftexpr.IfName(expr.MetaKeyIIFNAME, s.hostIf, true)
	toSandbox := nftexpr.IfName(expr.MetaKeyOIFNAME, s.hostIf, true)
	accept := &expr.Verdict{Kind: expr.VerdictAccept}
	drop := &expr.Verdict{Kind: expr.VerdictDrop}

	// DNS to anywhere is answered by childflow's resolver: no other
	// resolver is reachable, so domain rules see every answer.
	dns := c.AddChain(&nftables.Chain{Name: "dns", Table: n.t, Type: nftables.ChainTypeNAT, Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityNATDest})
	for _, gw := range s.plan.Gateways() {
		for _, proto := range []byte{unix.IPPROTO_UDP, unix.IPPROTO_TCP} {
			n.rule(dns, nftexpr.Cat(fromSandbox, nftexpr.DNSTo(gw, proto))...)
		}
	}
	nat := c.AddChain(&nftables.Chain{Name: "nat", Table: n.t, Type: nftables.ChainTypeNAT, Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource})
	n.rule(nat, nftexpr.Cat(fromSandbox, nftexpr.IfName(expr.MetaKeyOIFNAME, s.hostIf, false), []expr.Any{&expr.Masq{}})...)

	// The slot's mark on every new connection: only those pass as
	// established, not one opened while the table was gone.
	mangle := c.AddChain(&nftables.Chain{Name: "mangle", Table: n.t, Type: nftables.ChainTypeFilter, Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityMangle})
	n.rule(mangle, nftexpr.Cat(fromSandbox, nftexpr.CtStateNew(), nftexpr.SetCtMark(s.mark))...)
	// The replies on them carry the routing mark too. A host that
	// filters by reverse path (rp_filter; 2 on Debian and Ubuntu) checks
	// a reply's source with a lookup as from the sandbox's link, which
	// the routing backstop refuses unless it is marked: with the mark,
	// which that lookup reads with src_valid_mark (see forwarding.go),
	// the reply passes. Under --iface, its table has the way back to the
	// sandbox, and the check then expects the reply on that interface.
	n.rule(mangle, nftexpr.Cat(nftexpr.IfName(expr.MetaKeyIIFNAME, s.hostIf, false), nftexpr.Established(),
		nftexpr.CtMarkIs(s.mark), nftexpr.SetMark(s.routeMark()))...)
	// A connection conntrack expects (a helper's, where the host assigns
	// one: ftp's reads PASV and PORT) gets the mark of the one that
	// announced it, and passed as the sandbox's own to whatever that
	// named, past the policy (a PASV answer naming port 853 opened DNS
	// over TLS), or reached the sandbox from outside. It starts
	// undecided: the policy decides what the sandbox sends on it, and an
	// allowed packet makes it the slot's; from outside it stays out.
	n.rule(mangle, nftexpr.Cat(nftexpr.CtExpected(), nftexpr.CtState(expr.CtStateBitRELATED), nftexpr.CtMarkIs(s.mark),
		nftexpr.SetCtMark(undecidedMark(s.mark)))...)
	if s.tproxy != 0 {
		// New TCP connections go to the proxy client; the policy is
		// then decided there, for the proxied flow.
		for _, is6 := range []bool{false, true} {
			gw := s.plan.Gateway4
			if is6 {
				gw = s.plan.Gateway6
			}
			// DNS over TCP is the resolver's (the nat chain redirects it).
			notDNS := []expr.Any{
				&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
				&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: binaryutil.BigEndian.PutUint16(53)},
			}
			intercepted := nftexpr.Cat(fromSandbox, nftexpr.Family(is6), nftexpr.L4(unix.IPPROTO_TCP), nftexpr.NotDaddr(gw), notDNS)
			n.rule(mangle, nftexpr.Cat(intercepted, []expr.Any{
				&expr.Immediate{Register: 1, Data: binaryutil.BigEndian.PutUint16(s.tproxy)},
				&expr.TProxy{Family: byte(nftexpr.NFProto(is6)), TableFamily: byte(nftables.TableFamilyINet), RegPort: 1},
			}, nftexpr.SetMark(s.tpMark), []expr.Any{accept})...)
			// Where TPROXY finds no socket (childflow's listener is
			// gone: at the end of a run, or destroyed) it lets the
			// packet go on, to the policy and, allowed, around the
			// proxy to its destination: refused here.
			n.rule(mangle, nftexpr.Cat(intercepted, []expr.Any{&expr.Reject{Type: unix.NFT_REJECT_TCP_RST}})...)
		}
	}

	// Before the host's own filters (priority filter - 10): a drop here
	// is final whatever another table accepts.
	prio := nftables.ChainPriorityRef(-10)
	forward := c.AddChain(&nftables.Chain{Name: "forward", Table: n.t, Type: nftables.ChainTypeFilter, Hooknum: nftables.ChainHookForward, Priority: prio})
	input := c.AddChain(&nftables.Chain{Name: "input", Table: n.t, Type: nftables.ChainTypeFilter, Hooknum: nftables.ChainHookInput, Priority: prio})
	// What the sandbox sends beyond the host is decided before routing,
	// after the DNS redirect, and gets the slot's mark, which the routing
	// backstop wants (routing.go), only with an allowing verdict, in the
	// same pass: a `flush ruleset` that lands between a packet's
	// prerouting and forward hooks then lets through only what the
	// policy allowed. A mark set apart from the verdict let a denied
	// packet on past a forward filter that was gone (1 of 60 runs of
	// TestRootFailsClosedWhenItsTableGoes). What routing delivers to the
	// host itself is decided where it arrives (input), as before: the
	// backstop cannot hold it (keepTable), and a packet routing would
	// drop (a group the host has not joined) is no violation.
	decide := c.AddChain(&nftables.Chain{Name: "decide", Table: n.t, Type: nftables.ChainTypeFilter, Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityRef(*nftables.ChainPriorityNATDest + 10)})
	pol := c.AddChain(&nftables.Chain{Name: "policy", Table: n.t})
	host := c.AddChain(&nftables.Chain{Name: "host", Table: n.t})
	after := c.AddChain(&nftables.Chain{Name: "after_cidr", Table: n.t})
	refuse := c.AddChain(&nftables.Chain{Name: "refuse", Table: n.t})
	jumpPolicy := &expr.Verdict{Kind: expr.VerdictJump, Chain: pol.Name}
	// A denied flow is refused, not left to time out: TCP gets a reset,
	// the rest an ICMP administratively-prohibited.
	n.rule(refuse, nftexpr.Cat(nftexpr.L4(unix.IPPROTO_TCP), []expr.Any{&expr.Reject{Type: unix.NFT_REJECT_TCP_RST}})...)
	n.rule(refuse, &expr.Reject{Type: unix.NFT_REJECT_ICMPX_UNREACH, Code: unix.NFT_REJECT_ICMPX_ADMIN_PROHIBITED})
	refused := &expr.Verdict{Kind: expr.VerdictGoto, Chain: refuse.Name}

	if s.ifMark != 0 {
		// --iface promises no other interface: were its routing rule or
		// routes removed (networkd removes rules and routes it did not
		// make), the main table would send the packets elsewhere.
		n.rule(forward, nftexpr.Cat(fromSandbox, nftexpr.IfName(expr.MetaKeyOIFNAME, s.iface, false), []expr.Any{drop})...)
	}
	known := nftexpr.Cat(nftexpr.Established(), nftexpr.CtMarkIs(s.mark))
	n.rule(forward, nftexpr.Cat(toSandbox, known, []expr.Any{accept})...)
	n.rule(forward, nftexpr.Cat(toSandbox, []expr.Any{drop})...) // nothing new reaches the sandbox

	// Nor from the host: the sandbox's answers to a flow the host opened
	// would pass as established, and its policy never see them (an
	// --offline sandbox served a host process's connection).
	output := c.AddChain(&nftables.Chain{Name: "output", Table: n.t, Type: nftables.ChainTypeFilter, Hooknum: nftables.ChainHookOutput, Priority: prio})
	// What the host sends the sandbox on its connections: the refusal of
	// an undecided one too (the mark's low bits).
	n.rule(output, nftexpr.Cat(toSandbox, nftexpr.Established(), nftexpr.CtMarkMasked(s.mark, slotMask), []expr.Any{accept})...)
	n.rule(output, nftexpr.Cat(toSandbox, nftexpr.NeighbourDiscovery(), []expr.Any{accept})...)
	n.rule(output, nftexpr.Cat(toSandbox, []expr.Any{drop})...)

	n.rule(input, nftexpr.Cat(fromSandbox, known, []expr.Any{accept})...)
	n.rule(input, nftexpr.Cat(fromSandbox, nftexpr.NeighbourDiscovery(), []expr.Any{accept})...)
	for _, gw := range s.plan.Gateways() {
		for _, proto := range []byte{unix.IPPROTO_UDP, unix.IPPROTO_TCP} {
			n.rule(input, nftexpr.Cat(fromSandbox, nftexpr.Daddr(gw), nftexpr.L4(proto), nftexpr.Dport(53), []expr.Any{accept})...)
		}
	}
	if s.tproxy != 0 {
		n.rule(input, nftexpr.Cat(fromSandbox, nftexpr.MarkIs(s.tpMark), []expr.Any{accept})...)
	}
	n.rule(input, nftexpr.Cat(fromSandbox, []expr.Any{jumpPolicy})...)

	// The host's own addresses, its networks' broadcast addresses, which
	// it hears too, and the anycast addresses a forwarding host answers
	// on (IPv6's subnet-router anycast, prefix::, on each of its links).
	hostTypes := []uint32{unix.RTN_LOCAL, unix.RTN_BROADCAST, unix.RTN_ANYCAST}
	hostAddr := func(typ uint32) []expr.Any {
		return []expr.Any{
			&expr.Fib{Register: 1, FlagDADDR: true, ResultADDRTYPE: true},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(typ)},
		}
	}

	routed := nftexpr.SetMark(s.routeMark())
	pass := nftexpr.Cat(routed, []expr.Any{accept})
	// What the policy allows is the slot's: an undecided connection too.
	allowed := nftexpr.Cat(routed, nftexpr.SetCtMark(s.mark))
	if s.tproxy != 0 {
		// Marked for the proxy client, which decides.
		n.rule(decide, nftexpr.Cat(fromSandbox, nftexpr.MarkIs(s.tpMark), []expr.Any{accept})...)
	}
	// Established flows first: most packets, no lookup. Then what
	// routing delivers to the host, for input.
	n.rule(decide, nftexpr.Cat(fromSandbox, known, pass)...)
	for _, typ := range append(hostTypes, unix.RTN_MULTICAST) {
		n.rule(decide, nftexpr.Cat(fromSandbox, hostAddr(typ), []expr.Any{accept})...)
	}
	// What conntrack counts as closed (TCP's TIME_WAIT, CLOSE) is not
	// counted, nor what the policy refuses (its entry is never confirmed).
	// Counted too: its log message can be lost in a burst (limitReached).
	n.rule(decide, nftexpr.Cat(fromSandbox, []expr.Any{&expr.Connlimit{Count: maxFlows, Flags: expr.NFT_CONNLIMIT_F_INV}, &expr.Counter{}},
		nftexpr.Logged(s.group, logLimit, refused))...)
	n.rule(decide, nftexpr.Cat(fromSandbox, []expr.Any{jumpPolicy})...)

	// The policy, in policy.Decide's order. Every verdict is logged to
	// the flow-event reader with its reason.
	allow := func(reason string) []expr.Any {
		if p.ProxyOnly {
			// Only the proxy may carry traffic; it never passes here.
			return nftexpr.Logged(s.group, logDeny+policy.ReasonProxyOnly, refused)
		}
		if !s.logAllowed {
			return nftexpr.Cat(allowed, []expr.Any{accept})
		}
		return nftexpr.Cat(allowed, nftexpr.Logged(s.group, logAllow+reason, accept))
	}
	deny := func(reason string) []expr.Any { return nftexpr.Logged(s.group, logDeny+reason, refused) }
	inSet := func(name string, is6 bool) []expr.Any {
		name, _ = familySet(name, is6)
		set := sets[name]
		return nftexpr.Cat(nftexpr.Family(is6), []expr.Any{
			nftexpr.LoadAddr(is6, false),
			&expr.Lookup{SourceRegister: 1, SetName: set.Name, SetID: set.ID},
		})
	}
	if p.Offline {
		n.rule(pol, deny(policy.ReasonOffline)...)
	}
	// No resolver but childflow's: DNS over TLS or QUIC is refused.
	for _, proto := range []byte{unix.IPPROTO_TCP, unix.IPPROTO_UDP} {
		n.rule(pol, nftexpr.Cat(nftexpr.L4(proto), nftexpr.Dport(policy.PortDoT), deny(policy.ReasonDNSBypass))...)
	}
	for _, step := range []struct{ set, reason string }{
		{setMetadata, policy.ReasonMetadata}, {setPrivate, policy.ReasonPrivate},
		{setDenyCIDR, policy.ReasonDenyCIDR}, {setDomDeny, policy.ReasonDenyDomain},
	} {
		for _, is6 := range []bool{false, true} {
			n.rule(pol, nftexpr.Cat(inSet(step.set, is6), deny(step.reason))...)
		}
	}
	n.rule(pol, &expr.Verdict{Kind: expr.VerdictJump, Chain: host.Name})
	n.rule(pol, nftexpr.Cat(inSet(setTunAllowed, true), allow(policy.ReasonAllowCIDR))...)
	n.rule(pol, nftexpr.Cat(inSet(setTunnelled, true), []expr.Any{&expr.Verdict{Kind: expr.VerdictGoto, Chain: after.Name}})...)
	for _, is6 := range []bool{false, true} {
		n.rule(pol, nftexpr.Cat(inSet(setAllowCIDR, is6), allow(policy.ReasonAllowCIDR))...)
	}
	n.rule(pol, &expr.Verdict{Kind: expr.VerdictGoto, Chain: after.Name})

	// Before the allow-cidrs, as in policy.Decide: loopback, broadcast,
	// multicast and the gateways only through an allow-cidr that names
	// them, not a wide range that merely contains them.
	for _, is6 := range []bool{false, true} {
		n.rule(host, nftexpr.Cat(inSet(setAllowHost, is6), allow(policy.ReasonAllowCIDR))...)
	}
	for _, h := range policy.HostRanges {
		n.rule(host, nftexpr.Cat(nftexpr.DaddrIn(h), deny(policy.ReasonHost))...)
	}
	for _, is6 := range []bool{false, true} {
		for _, typ := range hostTypes {
			n.rule(host, nftexpr.Cat(inSet(setPools, is6), hostAddr(typ), deny(policy.ReasonHost))...)
		}
	}
	// After them, the host's other addresses.
	for _, typ := range hostTypes {
		n.rule(after, nftexpr.Cat(hostAddr(typ), deny(policy.ReasonHost))...)
	}
	for _, is6 := range []bool{false, true} {
		n.rule(after, nftexpr.Cat(inSet(setDomAllow, is6), allow(policy.ReasonAllowDomain))...)
	}
	if p.DefaultDeny {
		n.rule(after, deny(policy.ReasonDefaultDeny)...)
	} else {
		n.rule(after, allow(policy.ReasonDefaultAllow)...)
	}
	if err := nftexpr.Flush(c); err != nil {
		return fmt.Errorf("creating the chains of nftables table %s: %w", s.name, err)
	}
	return nil
}

// familySet is the name and key type of the half of a set that holds
// one family's addresses.
func familySet(name string, is6 bool) (string, nftables.SetDatatype) {
	if is6 {
		return name + "6", nftables.TypeIP6Addr
	}
	return name + "4", nftables.TypeIPAddr
}

// addElements adds el to set, a message's worth at a time.
func addElements(c *nftables.Conn, set *nftables.Set, el []nftables.SetElement) error {
	for rest := el; len(rest) > 0; {
		batch := rest[:min(len(rest), setElementsPerMessage)]
		if err := c.SetAddElements(set, batch); err != nil {
			return fmt.Errorf("set %s: %w", set.Name, err)
		}
		rest = rest[len(batch):]
	}
	return nil
}

// largeBuffers let the table's transaction of sets, which grows with
// the policy's CIDR lists (each IPv4 range also in its tunnelled IPv6
// forms), be sent whole and its acknowledgements read: the default
// buffers refused 700 ranges.
func largeBuffers(c *netlink.Conn) error {
	return nftexpr.ForceBuffers(c, 64<<20, unix.SO_SNDBUFFORCE, unix.SO_RCVBUFFORCE)
}

func forceReadBuffer(c *netlink.Conn, size int) error {
	return nftexpr.ForceBuffers(c, size, unix.SO_RCVBUFFORCE)
}

// limitReached reports whether table's flow limit refused a packet: its
// rule's counter, read at the sandbox's end, says so where the log
// message did not arrive (the kernel drops those a burst of verdicts
// leaves no room for).
func limitReached(table string) bool {
	c, err := nftables.New()
	if err != nil {
		return false
	}
	t := &nftables.Table{Family: nftables.TableFamilyINet, Name: table}
	rules, err := c.GetRules(t, &nftables.Chain{Name: "decide", Table: t})
	if err != nil {
		return false
	}
	for _, r := range rules {
		var counted uint64
		limit := false
		for _, e := range r.Exprs {
			switch e := e.(type) {
			case *expr.Counter:
				counted = e.Packets
			case *expr.Log:
				limit = limit || string(e.Data) == logLimit
			}
		}
		if limit {
			return counted > 0
		}
	}
	return false
}

// deleteTables removes tables in one transaction; one already gone is
// not an error. Only those there are asked for: a transaction that
// deletes anything, or fails to, takes 8-24 ms here, the listing 0.2 ms.
func deleteTables(names ...string) error {
	c, err := nftables.New()
	if err != nil {
		return err
	}
	there, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		return fmt.Errorf("deleting nftables tables %s: %w", strings.Join(names, ", "), err)
	}
	var present []string
	for _, t := range there {
		if slices.Contains(names, t.Name) {
			c.DelTable(t)
			present = append(present, t.Name)
		}
	}
	if len(present) == 0 {
		return nil
	}
	if err := nftexpr.Flush(c); err != nil && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("deleting nftables tables %s: %w", strings.Join(present, ", "), err)
	}
	return nil
}

// tables lists the host's tables whose name starts with prefix.
func tables(prefix string) ([]string, error) {
	c, err := nftables.New()
	if err != nil {
		return nil, err
	}
	ts, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, t := range ts {
		if strings.HasPrefix(t.Name, prefix) {
			out = append(out, t.Name)
		}
	}
	return out, nil
}
