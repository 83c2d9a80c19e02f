package rootful

import (
	"net/netip"
	"slices"
	"testing"
)

func prefixes(ss ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, s := range ss {
		out = append(out, netip.MustParsePrefix(s))
	}
	return out
}

func TestSpansMergeOverlapsAndNeighbours(t *testing.T) {
	got := spans(prefixes("10.0.0.0/8", "10.1.0.0/16", "11.0.0.0/8", "192.168.0.0/16", "255.255.255.255/32", "::1/128"), false)
	want := []span{
		{netip.MustParseAddr("10.0.0.0"), netip.MustParseAddr("11.255.255.255")},
		{netip.MustParseAddr("192.168.0.0"), netip.MustParseAddr("192.168.255.255")},
		{netip.MustParseAddr("255.255.255.255"), netip.MustParseAddr("255.255.255.255")},
	}
	if !slices.Equal(got, want) {
		t.Fatalf("spans %v, want %v", got, want)
	}
}

func TestTunnelledFormsOfADenyRule(t *testing.T) {
	deny := withTunnelled(prefixes("203.0.113.20/32"))
	for _, a := range []string{"203.0.113.20", "::ffff:203.0.113.20", "::203.0.113.20", "64:ff9b::cb00:7114", "2002:cb00:7114::1", "64:ff9b:1::1", "2001::1"} {
		addr := netip.MustParseAddr(a)
		if !slices.ContainsFunc(deny, func(p netip.Prefix) bool { return p.Contains(addr) }) {
			t.Errorf("%s escapes the deny rule", a)
		}
	}
	for _, a := range []string{"203.0.113.10", "::ffff:203.0.113.10", "64:ff9b::cb00:710a", "2002:cb00:710a::1", "2001:db8::20"} {
		addr := netip.MustParseAddr(a)
		if slices.ContainsFunc(deny, func(p netip.Prefix) bool { return p.Contains(addr) }) {
			t.Errorf("%s is denied by a rule for 203.0.113.20", a)
		}
	}
	// Allowed tunnelled: both the IPv6 form and the IPv4 inside.
	allowed := tunnelledAllowed(prefixes("64:ff9b::/96", "203.0.113.10/32"))
	if len(allowed) != 1 || allowed[0].String() != "64:ff9b::cb00:710a/128" {
		t.Fatalf("tunnelled allowed %v", allowed)
	}
}
