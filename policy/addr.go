package policy

import (
	"net/netip"
)

// Canonical returns the address a packet really goes to: IPv4-mapped and
// IPv4-compatible IPv6 become IPv4, and the unspecified address becomes
// loopback, because that is where the host's kernel would deliver it.
func Canonical(a netip.Addr) netip.Addr {
	a = a.WithZone("")
	if a.Is4In6() {
		a = a.Unmap()
	}
	if a.Is6() {
		b := a.As16()
		if isZero(b[:12]) && !isZero(b[12:]) && !(isZero(b[12:15]) && b[15] == 1) {
			a = v4(b[12:16]) // IPv4-compatible ::a.b.c.d (but not ::1)
		}
	}
	if a.IsUnspecified() {
		if a.Is4() {
			return netip.AddrFrom4([4]byte{127, 0, 0, 1})
		}
		return netip.IPv6Loopback()
	}
	return a
}

// Tunnelled returns the IPv4 address carried inside a NAT64, 6to4 or Teredo
// IPv6 address.
func Tunnelled(a netip.Addr) (netip.Addr, bool) {
	if !a.Is6() {
		return netip.Addr{}, false
	}
	b := a.As16()
	switch {
	case nat64.Contains(a) || nat64Local.Contains(a):
		return v4(b[12:16]), true
	case sixToFour.Contains(a):
		return v4(b[2:6]), true
	case teredo.Contains(a):
		// The client address is stored inverted in the last 32 bits.
		return netip.AddrFrom4([4]byte{^b[12], ^b[13], ^b[14], ^b[15]}), true
	}
	return netip.Addr{}, false
}

// Embedded returns every address a destination stands for: its canonical
// form and, for tunnelled IPv6, the IPv4 inside. Deny rules match any of
// them; allow rules must match all.
func Embedded(a netip.Addr) []netip.Addr {
	c := Canonical(a)
	if t, ok := Tunnelled(c); ok {
		return []netip.Addr{c, t}
	}
	return []netip.Addr{c}
}

var (
	nat64      = netip.MustParsePrefix("64:ff9b::/96")
	nat64Local = netip.MustParsePrefix("64:ff9b:1::/48")
	sixToFour  = netip.MustParsePrefix("2002::/16")
	teredo     = netip.MustParsePrefix("2001::/32")
	compatible = netip.MustParsePrefix("::/96")
)

func isZero(b []byte) bool {
	for _, x := range b {
		if x != 0 {
			return false
		}
	}
	return true
}

func v4(b []byte) netip.Addr { return netip.AddrFrom4([4]byte{b[0], b[1], b[2], b[3]}) }

func mustPrefixes(ss ...string) []netip.Prefix {
	out := make([]netip.Prefix, len(ss))
	for i, s := range ss {
		out[i] = netip.MustParsePrefix(s)
	}
	return out
}

// PrivateRanges is what --block-private blocks.
var PrivateRanges = mustPrefixes(
	"0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
	"172.16.0.0/12", "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15",
	"::1/128", "::/128", "fc00::/7", "fe80::/10", "fec0::/10",
)

// MetadataAddrs is what --block-metadata blocks: cloud instance metadata,
// by address.
var MetadataAddrs = mustPrefixes(
	"169.254.169.254/32", // AWS, GCP, Azure, OpenStack, DigitalOcean, ...
	"169.254.169.253/32", // AWS VPC DNS
	"169.254.170.2/32",   // AWS ECS task metadata
	"169.254.170.23/32",  // AWS EKS pod identity
	"168.63.129.16/32",   // Azure wire server
	"100.100.100.200/32", // Alibaba Cloud
	"192.0.0.192/32",     // Oracle Cloud
	"169.254.0.23/32",    // Tencent Cloud (metadata.tencentyun.com)
	"169.254.42.42/32",   // Scaleway
	"fd00:ec2::254/128",  // AWS IPv6
	"fd00:ec2::23/128",   // AWS EKS pod identity IPv6
	"fd20:ce::254/128",   // GCP IPv6
)

// IdentityAddrs are the metadata services among MetadataAddrs that
// answer with the identity of the machine asking (its instance role, its
// service account), knowing it by nothing but where the request comes
// from; the others (ECS and EKS Pod Identity agents, VPC DNS) want a
// token or give no credentials.
var IdentityAddrs = mustPrefixes(
	"169.254.169.254/32", "168.63.129.16/32", "100.100.100.200/32", "192.0.0.192/32",
	"169.254.0.23/32", "fd00:ec2::254/128", "fd20:ce::254/128",
)

// IdentityEndpoint says whether a flow to a reaches one of
// IdentityAddrs, in any form.
func IdentityEndpoint(a netip.Addr) (netip.Prefix, bool) {
	return firstMatch(IdentityAddrs, Embedded(a))
}

// HostRanges are never reachable from a sandbox unless an allow-cidr rule
// names them: the host's loopback and the unspecified addresses, which
// the host's kernel delivers to loopback, and broadcast and multicast,
// which it delivers to its own listeners too. (Link-local metadata
// services are --block-metadata's; the broadcast address of each of the
// host's networks is among its HostAddrs.)
var HostRanges = mustPrefixes("127.0.0.0/8", "::1/128", "0.0.0.0/32", "::/128",
	"255.255.255.255/32", "224.0.0.0/4", "ff00::/8")

func firstMatch(prefixes []netip.Prefix, addrs []netip.Addr) (netip.Prefix, bool) {
	for _, p := range prefixes {
		for _, a := range addrs {
			if p.Contains(a) {
				return p, true
			}
		}
	}
	return netip.Prefix{}, false
}
