package policy

import (
	"fmt"
	"net/netip"
	"strings"
)

// UsageError is bad input from the user: the CLI exits 2 on it.
type UsageError struct{ Msg string }

func (e *UsageError) Error() string { return e.Msg }

// Usagef builds a UsageError.
func Usagef(format string, args ...any) error {
	return &UsageError{Msg: fmt.Sprintf(format, args...)}
}

// ParseCIDR accepts a prefix or a bare address (a /32 or /128), IPv4 or
// IPv6. field names the flag or key in the error.
func ParseCIDR(field, s string) (netip.Prefix, error) {
	s = strings.TrimSpace(s)
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return p, Usagef("invalid %s %q: not a CIDR prefix", field, s)
		}
		if p.Addr().Is4In6() {
			// Match the canonical IPv4 form the engine decides on.
			if p.Bits() < 96 {
				return p, Usagef("invalid %s %q: an IPv4-mapped prefix must be at least /96", field, s)
			}
			p = netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-96)
		}
		return p.Masked(), nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Prefix{}, Usagef("invalid %s %q: not an IP address or CIDR prefix", field, s)
	}
	a = a.Unmap()
	return netip.PrefixFrom(a, a.BitLen()), nil
}

// ParseCIDRs parses each of values with ParseCIDR.
func ParseCIDRs(field string, values []string) ([]netip.Prefix, error) {
	out := make([]netip.Prefix, 0, len(values))
	for _, v := range values {
		p, err := ParseCIDR(field, v)
		if err != nil {
			return nil, err
		}
		out = append(out, p)
	}
	return out, nil
}

// ParseDomain validates a domain rule and returns it normalised.
func ParseDomain(field, s string) (string, error) {
	d := NormalizeName(strings.TrimSpace(s))
	if d == "" || len(d) > 253 {
		return "", Usagef("invalid %s %q: not a domain name", field, s)
	}
	for _, label := range strings.Split(d, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return "", Usagef("invalid %s %q: not a domain name", field, s)
		}
		for _, c := range label {
			if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-' || c == '_') {
				return "", Usagef("invalid %s %q: not a domain name (character %q)", field, s, c)
			}
		}
	}
	return d, nil
}

// ParseDomains parses each of values with ParseDomain.
func ParseDomains(field string, values []string) ([]string, error) {
	out := make([]string, 0, len(values))
	for _, v := range values {
		d, err := ParseDomain(field, v)
		if err != nil {
			return nil, err
		}
		out = append(out, d)
	}
	return out, nil
}

// ParseDefault parses allow|deny into DefaultDeny.
func ParseDefault(field, s string) (bool, error) {
	switch strings.ToLower(strings.TrimSpace(s)) {
	case "allow", "":
		return false, nil
	case "deny":
		return true, nil
	}
	return false, Usagef("invalid %s %q: must be allow or deny", field, s)
}

// ParseResolvers parses DNS server addresses: IP or IP:port, IPv6 in
// brackets when a port is given. A multicast or broadcast address is no
// resolver: the answer would come from another address, and the query
// would go to every host on a link.
func ParseResolvers(field string, values []string) ([]netip.AddrPort, error) {
	var out []netip.AddrPort
	for _, v := range values {
		v = strings.TrimSpace(v)
		ap, err := netip.ParseAddrPort(v)
		if a, aerr := netip.ParseAddr(v); aerr == nil {
			ap, err = netip.AddrPortFrom(a, 53), nil // no port given: DNS's
		}
		if err != nil || ap.Port() == 0 {
			return nil, Usagef("invalid %s %q: not an IP address or IP:port", field, v)
		}
		if a := ap.Addr().Unmap(); a.IsMulticast() || a == netip.AddrFrom4([4]byte{255, 255, 255, 255}) {
			return nil, Usagef("invalid %s %q: a multicast or broadcast address is no resolver", field, v)
		}
		out = append(out, netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port()))
	}
	return out, nil
}

// ParseRuleCIDRs parses allow and deny rules, which are read as
// destinations are (Embedded): a rule naming an IPv6 form that carries
// an IPv4 address (IPv4-compatible, NAT64, 6to4, Teredo) names that IPv4
// address too. Denying the NAT64 address a DNS64 resolver gave then
// denies the host by its IPv4 address as well (through a CLAT it is the
// same host), and allowing it lets its NAT64 flows through, as allow
// rules must hold for every form. A rule as wide as the tunnel itself
// (64:ff9b::/96, 2002::/16) names the tunnel, not all of IPv4.
func ParseRuleCIDRs(field string, values []string) ([]netip.Prefix, error) {
	out, err := ParseCIDRs(field, values)
	if err != nil {
		return nil, err
	}
	for _, p := range out[:len(out):len(out)] {
		if v4, ok := embeddedPrefix(p); ok {
			out = append(out, v4)
		}
	}
	return out, nil
}

// embeddedPrefix returns the IPv4 addresses p's addresses carry, where p
// lies within one tunnelled range and fixes some of the IPv4 inside.
func embeddedPrefix(p netip.Prefix) (netip.Prefix, bool) {
	within := func(r netip.Prefix) bool { return r.Bits() <= p.Bits() && r.Contains(p.Addr()) }
	start := 96 // where the IPv4 address begins in the IPv6 one
	switch {
	case within(sixToFour):
		start = 16
	case within(nat64), within(nat64Local), within(teredo), within(compatible):
	default:
		return netip.Prefix{}, false
	}
	// The prefix's first address carries the IPv4 prefix's (Teredo's
	// inverted host bits are masked off again); :: and ::1 carry none.
	addrs := Embedded(p.Addr())
	v4, bits := addrs[len(addrs)-1], min(p.Bits()-start, 32)
	if !v4.Is4() || bits <= 0 {
		return netip.Prefix{}, false
	}
	return netip.PrefixFrom(v4, bits).Masked(), true
}
