package rootful

import (
	"fmt"
	"net"
	"net/netip"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"

	"github.com/childflow/childflow/internal/netplan"
	"github.com/childflow/childflow/policy"
)

// TablePrefix starts the name of every per-sandbox table.
const TablePrefix = "childflow-root-"

// tableSpec is what the per-sandbox table is built from.
type tableSpec struct {
	name    string
	hostIf  string
	plan    netplan.Plan
	policy  *policy.Policy
	group   uint16 // NFLOG group of the flow events
	ctMark  uint32 // set on allowed flows, for conntrack events
	tproxy  uint16 // local port of the transparent proxy, 0 for none
	tpMark  uint32 // packet mark that routes TPROXY'd packets locally
	ifMark  uint32 // packet mark that routes through --iface, 0 for none
	dnsPort uint16 // the resolver's port on the gateway addresses
	// logAllowed logs allowed flows too; without a flow log or summary
	// only denials are (--fail-on-leak counts them), sparing each new
	// connection a trip to userspace.
	logAllowed bool
}

// Set names; the 4 and 6 variants hold each family.
const (
	setMetadata   = "metadata"
	setPrivate    = "private"
	setDenyCIDR   = "deny_cidr"
	setAllowCIDR  = "allow_cidr"
	setTunAllowed = "tunnelled_allowed"
	setTunnelled  = "tunnelled"
	setDomDeny    = "domain_deny"
	setDomAllow   = "domain_allow"
)

// Log prefixes carry the verdict and reason to the flow-event reader.
const (
	logAllow = "cf a "
	logDeny  = "cf d "
)

// nft builds rules one expression list at a time.
type nft struct {
	c *nftables.Conn
	t *nftables.Table
}

func (n nft) rule(ch *nftables.Chain, e ...expr.Any) {
	n.c.AddRule(&nftables.Rule{Table: n.t, Chain: ch, Exprs: e})
}

// installTable creates the sandbox's whole table in one transaction:
//
//	table inet childflow-root-ID {
//	  sets: metadata, private, deny_cidr, allow_cidr, tunnelled(_allowed)
//	        (intervals); domain_deny, domain_allow (timeouts, fed by the resolver)
//	  chain dns     nat prerouting:  DNS from the sandbox to any address -> the resolver
//	  chain nat     nat postrouting: masquerade what the sandbox sends out
//	  chain mangle  filter prerouting mangle: TPROXY, --iface marks
//	  chain forward filter forward:  replies in; new flows out -> policy; nothing new in
//	  chain input   filter input:    replies, ND, DNS to the resolver, TPROXY; else policy
//	  chain policy, after_cidr:      policy.Decide's order, each verdict logged
//	}
func installTable(s tableSpec) error {
	c, err := nftables.New()
	if err != nil {
		return err
	}
	n := nft{c: c, t: c.AddTable(&nftables.Table{Family: nftables.TableFamilyINet, Name: s.name})}
	p := s.policy

	sets := map[string]*nftables.Set{}
	addSet := func(name string, is6 bool, elems []netip.Prefix, timeout bool) error {
		typ, suffix := nftables.TypeIPAddr, "4"
		if is6 {
			typ, suffix = nftables.TypeIP6Addr, "6"
		}
		set := &nftables.Set{Table: n.t, Name: name + suffix, KeyType: typ, Interval: !timeout, HasTimeout: timeout}
		var el []nftables.SetElement
		for _, sp := range spans(elems, is6) {
			el = append(el, nftables.SetElement{Key: sp.from.AsSlice()})
			if end := sp.to.Next(); end.IsValid() {
				el = append(el, nftables.SetElement{Key: end.AsSlice(), IntervalEnd: true})
			}
		}
		if err := c.AddSet(set, el); err != nil {
			return fmt.Errorf("set %s: %w", set.Name, err)
		}
		sets[name+suffix] = set
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

	fromSandbox := cmpIf(expr.MetaKeyIIFNAME, s.hostIf, true)
	toSandbox := cmpIf(expr.MetaKeyOIFNAME, s.hostIf, true)
	accept := &expr.Verdict{Kind: expr.VerdictAccept}
	drop := &expr.Verdict{Kind: expr.VerdictDrop}

	// DNS to anywhere is answered by childflow's resolver: no other
	// resolver is reachable, so domain rules see every answer.
	dns := c.AddChain(&nftables.Chain{Name: "dns", Table: n.t, Type: nftables.ChainTypeNAT, Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityNATDest})
	for _, gw := range []netip.Addr{s.plan.Gateway4, s.plan.Gateway6} {
		for _, proto := range []byte{unix.IPPROTO_UDP, unix.IPPROTO_TCP} {
			n.rule(dns, cat(fromSandbox, family(gw.Is6()), l4(proto), dport(53),
				[]expr.Any{
					&expr.Immediate{Register: 1, Data: gw.AsSlice()},
					&expr.Immediate{Register: 2, Data: binaryutil.BigEndian.PutUint16(s.dnsPort)},
					&expr.NAT{Type: expr.NATTypeDestNAT, Family: nfproto(gw.Is6()), RegAddrMin: 1, RegProtoMin: 2, Specified: true},
				})...)
		}
	}
	nat := c.AddChain(&nftables.Chain{Name: "nat", Table: n.t, Type: nftables.ChainTypeNAT, Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource})
	n.rule(nat, cat(fromSandbox, cmpIf(expr.MetaKeyOIFNAME, s.hostIf, false), []expr.Any{&expr.Masq{}})...)

	if s.tproxy != 0 || s.ifMark != 0 {
		mangle := c.AddChain(&nftables.Chain{Name: "mangle", Table: n.t, Type: nftables.ChainTypeFilter, Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityMangle})
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
				n.rule(mangle, cat(fromSandbox, family(is6), l4(unix.IPPROTO_TCP), notDaddr(gw), notDNS, []expr.Any{
					&expr.Immediate{Register: 1, Data: binaryutil.BigEndian.PutUint16(s.tproxy)},
					&expr.TProxy{Family: byte(nfproto(is6)), TableFamily: byte(nftables.TableFamilyINet), RegPort: 1},
					&expr.Immediate{Register: 1, Data: binaryutil.NativeEndian.PutUint32(s.tpMark)},
					&expr.Meta{Key: expr.MetaKeyMARK, Register: 1, SourceRegister: true},
					accept,
				})...)
			}
		}
		if s.ifMark != 0 {
			n.rule(mangle, cat(fromSandbox, []expr.Any{
				&expr.Immediate{Register: 1, Data: binaryutil.NativeEndian.PutUint32(s.ifMark)},
				&expr.Meta{Key: expr.MetaKeyMARK, Register: 1, SourceRegister: true},
			})...)
		}
	}

	// Before the host's own filters (priority filter - 10): a drop here
	// is final whatever another table accepts.
	prio := nftables.ChainPriorityRef(-10)
	forward := c.AddChain(&nftables.Chain{Name: "forward", Table: n.t, Type: nftables.ChainTypeFilter, Hooknum: nftables.ChainHookForward, Priority: prio})
	input := c.AddChain(&nftables.Chain{Name: "input", Table: n.t, Type: nftables.ChainTypeFilter, Hooknum: nftables.ChainHookInput, Priority: prio})
	pol := c.AddChain(&nftables.Chain{Name: "policy", Table: n.t})
	after := c.AddChain(&nftables.Chain{Name: "after_cidr", Table: n.t})
	refuse := c.AddChain(&nftables.Chain{Name: "refuse", Table: n.t})
	jumpPolicy := &expr.Verdict{Kind: expr.VerdictJump, Chain: pol.Name}
	// A denied flow is refused, not left to time out: TCP gets a reset,
	// the rest an ICMP administratively-prohibited.
	n.rule(refuse, cat(l4(unix.IPPROTO_TCP), []expr.Any{&expr.Reject{Type: unix.NFT_REJECT_TCP_RST}})...)
	n.rule(refuse, &expr.Reject{Type: unix.NFT_REJECT_ICMPX_UNREACH, Code: unix.NFT_REJECT_ICMPX_ADMIN_PROHIBITED})
	refused := &expr.Verdict{Kind: expr.VerdictGoto, Chain: refuse.Name}

	n.rule(forward, cat(toSandbox, established(), []expr.Any{accept})...)
	n.rule(forward, cat(toSandbox, []expr.Any{drop})...) // nothing new reaches the sandbox
	n.rule(forward, cat(fromSandbox, established(), []expr.Any{accept})...)
	n.rule(forward, cat(fromSandbox, []expr.Any{jumpPolicy})...)

	n.rule(input, cat(fromSandbox, established(), []expr.Any{accept})...)
	n.rule(input, cat(fromSandbox, neighbourDiscovery(), []expr.Any{accept})...)
	for _, gw := range []netip.Addr{s.plan.Gateway4, s.plan.Gateway6} {
		for _, proto := range []byte{unix.IPPROTO_UDP, unix.IPPROTO_TCP} {
			n.rule(input, cat(fromSandbox, daddr(gw), l4(proto), dport(s.dnsPort), []expr.Any{accept})...)
		}
	}
	if s.tproxy != 0 {
		n.rule(input, cat(fromSandbox, markIs(s.tpMark), []expr.Any{accept})...)
	}
	n.rule(input, cat(fromSandbox, []expr.Any{jumpPolicy})...)

	// The policy, in policy.Decide's order. Every verdict is logged to
	// the flow-event reader with its reason.
	allow := func(reason string) []expr.Any {
		if p.ProxyOnly {
			// Only the proxy may carry traffic; it never passes here.
			return logged(s.group, logDeny+policy.ReasonProxyOnly, refused)
		}
		mark := []expr.Any{
			&expr.Immediate{Register: 1, Data: binaryutil.NativeEndian.PutUint32(s.ctMark)},
			&expr.Ct{Key: expr.CtKeyMARK, Register: 1, SourceRegister: true},
		}
		if !s.logAllowed {
			return append(mark, accept)
		}
		return append(mark, logged(s.group, logAllow+reason, accept)...)
	}
	deny := func(reason string) []expr.Any { return logged(s.group, logDeny+reason, refused) }
	inSet := func(name string, is6 bool) []expr.Any {
		suffix := "4"
		if is6 {
			suffix = "6"
		}
		set := sets[name+suffix]
		return cat(family(is6), []expr.Any{
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: daddrOffset(is6), Len: addrLen(is6)},
			&expr.Lookup{SourceRegister: 1, SetName: set.Name, SetID: set.ID},
		})
	}
	if p.Offline {
		n.rule(pol, deny(policy.ReasonOffline)...)
	}
	// No resolver but childflow's: DNS over TLS or QUIC is refused.
	for _, proto := range []byte{unix.IPPROTO_TCP, unix.IPPROTO_UDP} {
		n.rule(pol, cat(l4(proto), dport(853), deny("dns_bypass"))...)
	}
	for _, step := range []struct{ set, reason string }{
		{setMetadata, policy.ReasonMetadata}, {setPrivate, policy.ReasonPrivate},
		{setDenyCIDR, policy.ReasonDenyCIDR}, {setDomDeny, policy.ReasonDenyDomain},
	} {
		for _, is6 := range []bool{false, true} {
			n.rule(pol, cat(inSet(step.set, is6), deny(step.reason))...)
		}
	}
	n.rule(pol, cat(inSet(setTunAllowed, true), allow(policy.ReasonAllowCIDR))...)
	n.rule(pol, cat(inSet(setTunnelled, true), []expr.Any{&expr.Verdict{Kind: expr.VerdictGoto, Chain: after.Name}})...)
	for _, is6 := range []bool{false, true} {
		n.rule(pol, cat(inSet(setAllowCIDR, is6), allow(policy.ReasonAllowCIDR))...)
	}
	n.rule(pol, &expr.Verdict{Kind: expr.VerdictGoto, Chain: after.Name})

	// The host is reachable only through an allow-cidr rule.
	n.rule(after, cat([]expr.Any{
		&expr.Fib{Register: 1, FlagDADDR: true, ResultADDRTYPE: true},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(unix.RTN_LOCAL)},
	}, deny(policy.ReasonHost))...)
	for _, h := range hostRanges {
		n.rule(after, cat(daddrIn(h), deny(policy.ReasonHost))...)
	}
	for _, is6 := range []bool{false, true} {
		n.rule(after, cat(inSet(setDomAllow, is6), allow(policy.ReasonAllowDomain))...)
	}
	if p.DefaultDeny {
		n.rule(after, deny(policy.ReasonDefaultDeny)...)
	} else {
		n.rule(after, allow(policy.ReasonDefaultAllow)...)
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("creating nftables table %s: %w", s.name, err)
	}
	return nil
}

// deleteTable removes a table; one already gone is not an error.
func deleteTable(name string) error {
	c, err := nftables.New()
	if err != nil {
		return err
	}
	c.DelTable(&nftables.Table{Family: nftables.TableFamilyINet, Name: name})
	if err := c.Flush(); err != nil && !strings.Contains(err.Error(), "no such file") {
		return fmt.Errorf("deleting nftables table %s: %w", name, err)
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

func cat(parts ...[]expr.Any) []expr.Any {
	var out []expr.Any
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

func logged(group uint16, prefix string, v *expr.Verdict) []expr.Any {
	return []expr.Any{
		&expr.Log{Key: 1<<unix.NFTA_LOG_GROUP | 1<<unix.NFTA_LOG_PREFIX, Group: group, Data: []byte(prefix)},
		v,
	}
}

// cmpIf matches (eq) or excludes (!eq) one interface by name; a name
// ending in '*' matches as a prefix.
func cmpIf(key expr.MetaKey, name string, eq bool) []expr.Any {
	op := expr.CmpOpEq
	if !eq {
		op = expr.CmpOpNeq
	}
	data := []byte(name)
	if strings.HasSuffix(name, "*") {
		data = data[:len(data)-1]
	} else {
		data = ifname(name)
	}
	return []expr.Any{&expr.Meta{Key: key, Register: 1}, &expr.Cmp{Op: op, Register: 1, Data: data}}
}

func ifname(n string) []byte {
	b := make([]byte, unix.IFNAMSIZ)
	copy(b, n)
	return b
}

func nfproto(is6 bool) uint32 {
	if is6 {
		return unix.NFPROTO_IPV6
	}
	return unix.NFPROTO_IPV4
}

func family(is6 bool) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{byte(nfproto(is6))}},
	}
}

func daddrOffset(is6 bool) uint32 {
	if is6 {
		return 24
	}
	return 16
}

func addrLen(is6 bool) uint32 {
	if is6 {
		return 16
	}
	return 4
}

func l4(proto byte) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}},
	}
}

func dport(port uint16) []expr.Any {
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.BigEndian.PutUint16(port)},
	}
}

func daddr(a netip.Addr) []expr.Any {
	return daddrIn(netip.PrefixFrom(a, a.BitLen()))
}

func notDaddr(a netip.Addr) []expr.Any {
	is6 := a.Is6()
	return cat(family(is6), []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: daddrOffset(is6), Len: addrLen(is6)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: a.AsSlice()},
	})
}

// daddrIn matches packets to the prefix p.
func daddrIn(p netip.Prefix) []expr.Any {
	is6 := p.Addr().Is6()
	n := addrLen(is6)
	return cat(family(is6), []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: daddrOffset(is6), Len: n},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: n, Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen()), Xor: make([]byte, n)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: p.Masked().Addr().AsSlice()},
	})
}

func markIs(m uint32) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(m)},
	}
}

func established() []expr.Any {
	bits := binaryutil.NativeEndian.PutUint32(expr.CtStateBitESTABLISHED | expr.CtStateBitRELATED)
	return []expr.Any{
		&expr.Ct{Key: expr.CtKeySTATE, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: bits, Xor: make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: make([]byte, 4)},
	}
}

func neighbourDiscovery() []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_ICMPV6}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: 1},
		&expr.Range{Op: expr.CmpOpEq, Register: 1, FromData: []byte{133}, ToData: []byte{136}},
	}
}
