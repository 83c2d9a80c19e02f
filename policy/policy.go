// Package policy is the one model of what a sandbox may reach. CLI flags,
// profiles and annotations all produce a Policy; the engine only calls
// Decide and DecideName. Decide does no I/O.
package policy

import (
	"net/netip"
	"slices"
	"strings"

	"github.com/childflow/childflow/internal/netplan"
)

// Policy is validated once (Validate) and must not be changed after it is
// handed to an engine.
type Policy struct {
	Offline       bool
	BlockPrivate  bool
	BlockMetadata bool
	DefaultDeny   bool
	ProxyOnly     bool

	AllowCIDRs        []netip.Prefix
	DenyCIDRs         []netip.Prefix
	AllowDomains      []string
	AllowDomainsExact []string
	DenyDomains       []string
	DenyDomainsExact  []string

	// HostAddrs are the addresses of the host and of the engine's gateway:
	// like loopback, reachable only when an allow-cidr rule names them.
	HostAddrs []netip.Prefix
}

// Proto is the transport of a flow.
type Proto string

const (
	TCP  Proto = "tcp"
	UDP  Proto = "udp"
	ICMP Proto = "icmp"
)

// Flow is what Decide looks at.
type Flow struct {
	Proto Proto
	Dst   netip.AddrPort
	// Names are the names this sandbox resolved to Dst's address and whose
	// answers have not expired.
	Names []string
	// ViaProxy is true when the flow will be carried by the forced proxy.
	ViaProxy bool
}

// Decision explains a verdict. Reason and Control are the flow log's
// reason_code and control.
type Decision struct {
	Allow         bool
	Reason        string
	Control       string
	MatchedCIDR   netip.Prefix
	MatchedDomain string
}

// Reason codes.
const (
	ReasonOffline         = "offline"
	ReasonMetadata        = "metadata_endpoint"
	ReasonPrivate         = "private_destination"
	ReasonHost            = "host_address"
	ReasonDenyCIDR        = "deny_cidr"
	ReasonDenyDomainExact = "deny_domain_exact"
	ReasonDenyDomain      = "deny_domain"
	ReasonAllowCIDR       = "allow_cidr"
	ReasonAllowDomExact   = "allow_domain_exact"
	ReasonAllowDomain     = "allow_domain"
	ReasonDefaultAllow    = "default_allow"
	ReasonDefaultDeny     = "default_deny"
	ReasonProxyOnly       = "proxy_only"
	ReasonDNSBypass       = "dns_bypass"
	ReasonProxyLoop       = "proxy_loop"
)

// controls names the setting behind each reason code: the flow log's
// control.
var controls = map[string]string{
	ReasonOffline: "offline", ReasonMetadata: "block_metadata", ReasonPrivate: "block_private",
	ReasonHost: "host", ReasonDenyCIDR: "deny_cidrs", ReasonDenyDomainExact: "deny_domains_exact",
	ReasonDenyDomain: "deny_domains", ReasonAllowCIDR: "allow_cidrs", ReasonAllowDomExact: "allow_domains_exact",
	ReasonAllowDomain: "allow_domains", ReasonDefaultAllow: "default_policy", ReasonDefaultDeny: "default_policy",
	ReasonProxyOnly: "proxy_only", ReasonDNSBypass: "dns", ReasonProxyLoop: "proxy",
}

// ControlOf returns the control of a reason code.
func ControlOf(reason string) string { return controls[reason] }

func deny(reason string) Decision { return Decision{Reason: reason, Control: controls[reason]} }

// DenyCIDR is the decision that denies for reason, at m.
func DenyCIDR(reason string, m netip.Prefix) Decision {
	return Decision{Reason: reason, Control: controls[reason], MatchedCIDR: m}
}

// HasDomainRules says whether a rule decides by name.
func (p *Policy) HasDomainRules() bool {
	return len(p.AllowDomains)+len(p.AllowDomainsExact)+len(p.DenyDomains)+len(p.DenyDomainsExact) > 0
}

// Decide applies the rules in the documented order: offline > metadata >
// private > deny-cidr > deny-domain-exact > deny-domain > (loopback,
// broadcast, multicast and gateways, unless an allow-cidr names them) >
// allow-cidr > (the host's other addresses) > allow-domain-exact >
// allow-domain > default > proxy-only;
// DNS over TLS or QUIC (PortDoT, any protocol but ICMP) before them all.
func (p *Policy) Decide(f Flow) Decision {
	if f.Proto != ICMP && f.Dst.Port() == PortDoT {
		return DNSBypass
	}
	addrs := Embedded(f.Dst.Addr())
	d := p.decide(addrs, f.Names)
	if d.Allow && p.ProxyOnly && !f.ViaProxy {
		return deny(ReasonProxyOnly)
	}
	return d
}

func (p *Policy) decide(addrs []netip.Addr, names []string) Decision {
	if p.Offline {
		return deny(ReasonOffline)
	}
	if p.BlockMetadata {
		if m, ok := firstMatch(MetadataAddrs, addrs); ok {
			return DenyCIDR(ReasonMetadata, m)
		}
	}
	if p.BlockPrivate {
		if m, ok := firstMatch(PrivateRanges, addrs); ok {
			return DenyCIDR(ReasonPrivate, m)
		}
	}
	if m, ok := firstMatch(p.DenyCIDRs, addrs); ok {
		return DenyCIDR(ReasonDenyCIDR, m)
	}
	for _, n := range names {
		if matchExact(p.DenyDomainsExact, n) != "" {
			d := deny(ReasonDenyDomainExact)
			d.MatchedDomain = n
			return d
		}
	}
	for _, n := range names {
		if m := matchSuffix(p.DenyDomains, n); m != "" {
			d := deny(ReasonDenyDomain)
			d.MatchedDomain = m
			return d
		}
	}
	// Loopback, broadcast, multicast and a sandbox's gateway (which leads
	// to the host's loopback, or to every service the host has) only
	// through an allow-cidr that names them, not a wide range that merely
	// contains them: 10.0.0.0/8 holds the rootless gateway 10.87.0.1.
	m, ok := firstMatch(HostRanges, addrs)
	if !ok {
		if m, ok = firstMatch(p.HostAddrs, addrs); ok {
			_, ok = firstMatch(netplan.Pools, addrs)
		}
	}
	if ok {
		if a, ok := allMatch(p.HostAllowCIDRs(), addrs); ok {
			return Decision{Allow: true, Reason: ReasonAllowCIDR, Control: controls[ReasonAllowCIDR], MatchedCIDR: a}
		}
		return DenyCIDR(ReasonHost, m)
	}
	// Allow rules must hold for every address the destination stands for,
	// so a mapped or tunnelled form cannot borrow another's allowance.
	if m, ok := allMatch(p.AllowCIDRs, addrs); ok {
		return Decision{Allow: true, Reason: ReasonAllowCIDR, Control: controls[ReasonAllowCIDR], MatchedCIDR: m}
	}
	// The host's other addresses, on networks an allow-cidr can admit,
	// as the host's services there face those networks anyway; a domain
	// rule must not open them (DNS rebinding).
	if m, ok := firstMatch(p.HostAddrs, addrs); ok {
		return DenyCIDR(ReasonHost, m)
	}
	for _, n := range names {
		if matchExact(p.AllowDomainsExact, n) != "" {
			return Decision{Allow: true, Reason: ReasonAllowDomExact, Control: controls[ReasonAllowDomExact], MatchedDomain: n}
		}
	}
	for _, n := range names {
		if m := matchSuffix(p.AllowDomains, n); m != "" {
			return Decision{Allow: true, Reason: ReasonAllowDomain, Control: controls[ReasonAllowDomain], MatchedDomain: m}
		}
	}
	if p.DefaultDeny {
		return deny(ReasonDefaultDeny)
	}
	return Decision{Allow: true, Reason: ReasonDefaultAllow, Control: controls[ReasonDefaultAllow]}
}

// NamesHost says whether an allow-cidr names the host rather than merely
// containing its addresses: a single address, a range within one of
// HostRanges (127.0.0.0/8, multicast) or within the ranges sandboxes'
// gateways are taken from (10.88.0.0/16 for any rootful gateway).
func NamesHost(p netip.Prefix) bool {
	if p.IsSingleIP() {
		return true
	}
	for _, r := range [][]netip.Prefix{HostRanges, netplan.Pools} {
		for _, h := range r {
			if h.Bits() <= p.Bits() && h.Contains(p.Addr()) {
				return true
			}
		}
	}
	return false
}

// HostAllowCIDRs are the allow-cidrs that name the host (NamesHost).
func (p *Policy) HostAllowCIDRs() []netip.Prefix {
	return slices.DeleteFunc(slices.Clone(p.AllowCIDRs), func(c netip.Prefix) bool { return !NamesHost(c) })
}

// DecideName says whether the engine's resolver may resolve name. Denied
// names get an empty answer and are never sent upstream (no exfiltration
// through the resolver). Under a default-deny policy only names an allow
// rule covers are resolved.
func (p *Policy) DecideName(name string) Decision {
	name = NormalizeName(name)
	if p.Offline {
		return deny(ReasonOffline)
	}
	if matchExact(p.DenyDomainsExact, name) != "" {
		return Decision{Reason: ReasonDenyDomainExact, Control: controls[ReasonDenyDomainExact], MatchedDomain: name}
	}
	if m := matchSuffix(p.DenyDomains, name); m != "" {
		return Decision{Reason: ReasonDenyDomain, Control: controls[ReasonDenyDomain], MatchedDomain: m}
	}
	if matchExact(p.AllowDomainsExact, name) != "" {
		return Decision{Allow: true, Reason: ReasonAllowDomExact, Control: controls[ReasonAllowDomExact], MatchedDomain: name}
	}
	if m := matchSuffix(p.AllowDomains, name); m != "" {
		return Decision{Allow: true, Reason: ReasonAllowDomain, Control: controls[ReasonAllowDomain], MatchedDomain: m}
	}
	// Under default deny a name no rule allows is not asked upstream, even
	// where allow-cidr opens addresses: the query itself would carry data
	// out (secret.attacker.example). Names for those addresses come from
	// --hosts-file or an allow-domain rule.
	if p.DefaultDeny {
		return deny(ReasonDefaultDeny)
	}
	return Decision{Allow: true, Reason: ReasonDefaultAllow, Control: controls[ReasonDefaultAllow]}
}

// NameHoldsAnywhere reports whether a forced proxy may be told name, the
// name the sandbox resolved to a flow's address, for a flow allowed for
// reason. A proxy told a name resolves it itself and may get another
// address than the sandbox did (DNS rebinding, or a resolver of its
// own): that must make no difference. So the name itself must be
// allowed, it or the default policy (not an allow-cidr) must have
// allowed the flow, and no rule may deny by address: deny-cidr,
// block-private, block-metadata, and, for a proxy on this host (onHost),
// the host's own addresses and loopback, which every sandbox is denied.
// Otherwise the proxy is told the address the policy decided on.
func (p *Policy) NameHoldsAnywhere(name, reason string, onHost bool) bool {
	switch reason {
	case ReasonAllowDomain, ReasonAllowDomExact, ReasonDefaultAllow:
	default:
		return false
	}
	return name != "" && p.DecideName(name).Allow && !onHost &&
		len(p.DenyCIDRs) == 0 && !p.BlockPrivate && !p.BlockMetadata
}

// NormalizeName lower-cases a DNS name and strips the trailing dot.
func NormalizeName(n string) string {
	return strings.TrimSuffix(strings.ToLower(n), ".")
}

func matchExact(list []string, name string) string {
	for _, d := range list {
		if d == name {
			return d
		}
	}
	return ""
}

// matchSuffix matches name against domain rules: the domain itself and its
// subdomains, never badexample.com for example.com, nor x\.example.com: a
// label may hold a dot, written escaped, and that name is a sibling of
// example.com under com, whose servers would be asked for it.
func matchSuffix(list []string, name string) string {
	for _, d := range list {
		if name == d || strings.HasSuffix(name, "."+d) && !escaped(name, len(name)-len(d)-1) {
			return d
		}
	}
	return ""
}

// escaped says whether the character at i in a name in presentation form
// is escaped: preceded by an odd number of backslashes.
func escaped(name string, i int) bool {
	n := 0
	for i--; i >= 0 && name[i] == '\\'; i-- {
		n++
	}
	return n%2 == 1
}

func allMatch(prefixes []netip.Prefix, addrs []netip.Addr) (netip.Prefix, bool) {
	var first netip.Prefix
	for _, a := range addrs {
		m, ok := firstMatch(prefixes, []netip.Addr{a})
		if !ok {
			return netip.Prefix{}, false
		}
		if !first.IsValid() {
			first = m
		}
	}
	return first, first.IsValid()
}

// PortDoT is DNS over TLS and over QUIC: always refused, so that no
// resolver but childflow's answers the sandbox and domain rules see
// every answer.
const PortDoT = 853

// DNSBypass is the decision for a flow to PortDoT.
var DNSBypass = Decision{Reason: ReasonDNSBypass, Control: controls[ReasonDNSBypass]}

// ProxyLoop is the decision for a flow to the forced proxy itself, which
// would carry a tunnel of the sandbox's own to anywhere.
var ProxyLoop = Decision{Reason: ReasonProxyLoop, Control: controls[ReasonProxyLoop]}
