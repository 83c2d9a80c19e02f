package rootful

import (
	"net/netip"
	"slices"
)

// span is an inclusive address range.
type span struct{ from, to netip.Addr }

// spans turns prefixes of one family into sorted, merged ranges: an
// nftables interval set refuses overlapping elements.
func spans(prefixes []netip.Prefix, is6 bool) []span {
	var out []span
	for _, p := range prefixes {
		if p.Addr().Is6() != is6 {
			continue
		}
		p = p.Masked()
		out = append(out, span{p.Addr(), lastAddr(p)})
	}
	slices.SortFunc(out, func(a, b span) int { return a.from.Compare(b.from) })
	merged := out[:0]
	for _, s := range out {
		if n := len(merged); n > 0 {
			last := &merged[n-1]
			if next := last.to.Next(); !next.IsValid() || s.from.Compare(next) <= 0 {
				if s.to.Compare(last.to) > 0 {
					last.to = s.to
				}
				continue
			}
		}
		merged = append(merged, s)
	}
	return merged
}

func lastAddr(p netip.Prefix) netip.Addr {
	b := p.Masked().Addr().AsSlice()
	for i := p.Bits(); i < len(b)*8; i++ {
		b[i/8] |= 0x80 >> (i % 8)
	}
	a, _ := netip.AddrFromSlice(b)
	return a
}

// tunnelledForms are the IPv6 ranges that stand for an IPv4 address
// (policy.Embedded): the kernel routes them as IPv6, the policy judges
// them by the IPv4 address inside too.
var tunnelledForms = []netip.Prefix{
	netip.MustParsePrefix("::ffff:0:0/96"), // mapped
	netip.MustParsePrefix("::/96"),         // compatible (and ::, ::1)
	netip.MustParsePrefix("64:ff9b::/96"),
	netip.MustParsePrefix("64:ff9b:1::/48"),
	netip.MustParsePrefix("2002::/16"),
	netip.MustParsePrefix("2001::/32"),
}

// asTunnelled returns the IPv6 prefixes whose embedded IPv4 address lies
// in the IPv4 prefix p, one per tunnelled form a deny rule must cover.
func asTunnelled(p netip.Prefix) []netip.Prefix {
	v4 := p.Masked().Addr().As4()
	at := func(base string, offset int) netip.Prefix {
		b := netip.MustParseAddr(base).As16()
		copy(b[offset:], v4[:])
		return netip.PrefixFrom(netip.AddrFrom16(b), offset*8+p.Bits())
	}
	return []netip.Prefix{at("::ffff:0:0", 12), at("::", 12), at("64:ff9b::", 12), at("2002::", 2)}
}

// NAT64 local use and Teredo carry the IPv4 address behind bits that
// vary (and Teredo's inverted): no prefix covers those, so any IPv4
// deny rule denies these ranges whole.
var unprefixable = []netip.Prefix{netip.MustParsePrefix("64:ff9b:1::/48"), netip.MustParsePrefix("2001::/32")}

// withTunnelled adds to a deny list the IPv6 forms of its IPv4 entries.
func withTunnelled(deny []netip.Prefix) []netip.Prefix {
	out := slices.Clone(deny)
	for _, p := range deny {
		if p.Addr().Is4() {
			out = append(out, asTunnelled(p)...)
			out = append(out, unprefixable...)
		}
	}
	return out
}

// tunnelledAllowed is the part of the tunnelled IPv6 ranges that allow
// rules open: policy.Decide allows such an address only when both it
// and the IPv4 address inside are allowed.
func tunnelledAllowed(allow []netip.Prefix) []netip.Prefix {
	var out []netip.Prefix
	for _, a6 := range allow {
		if !a6.Addr().Is6() {
			continue
		}
		for _, a4 := range allow {
			if !a4.Addr().Is4() {
				continue
			}
			for _, t := range asTunnelled(a4) {
				if a6.Overlaps(t) {
					out = append(out, narrower(a6, t))
				}
			}
		}
	}
	return out
}

func narrower(a, b netip.Prefix) netip.Prefix {
	if a.Bits() > b.Bits() {
		return a
	}
	return b
}
