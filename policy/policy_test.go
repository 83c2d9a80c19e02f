package policy

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"
)

func TestCanonical(t *testing.T) {
	for _, tc := range []struct{ in, want, tunnelled string }{
		{"203.0.113.10", "203.0.113.10", ""},
		{"::ffff:203.0.113.10", "203.0.113.10", ""},
		{"::cb00:710a", "203.0.113.10", ""}, // IPv4-compatible
		{"::1", "::1", ""},
		{"0.0.0.0", "127.0.0.1", ""},
		{"::", "::1", ""},
		{"::ffff:0.0.0.0", "127.0.0.1", ""},
		{"64:ff9b::cb00:710a", "64:ff9b::cb00:710a", "203.0.113.10"},
		{"64:ff9b:1::cb00:710a", "64:ff9b:1::cb00:710a", "203.0.113.10"},
		{"2002:cb00:710a::1", "2002:cb00:710a::1", "203.0.113.10"},
		{"2001:0:4136:e378:8000:63bf:34ff:8ff5", "2001:0:4136:e378:8000:63bf:34ff:8ff5", "203.0.112.10"},
		{"2001:db8::10", "2001:db8::10", ""},
		{"fe80::1%eth0", "fe80::1", ""},
	} {
		got := Canonical(netip.MustParseAddr(tc.in))
		if got.String() != tc.want {
			t.Errorf("Canonical(%s) = %s, want %s", tc.in, got, tc.want)
		}
		tun, ok := Tunnelled(got)
		if (tc.tunnelled != "") != ok || ok && tun.String() != tc.tunnelled {
			t.Errorf("Tunnelled(%s) = %s %v, want %q", got, tun, ok, tc.tunnelled)
		}
	}
}

func pfx(ss ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, s := range ss {
		p, err := ParseCIDR("test", s)
		if err != nil {
			panic(err)
		}
		out = append(out, p)
	}
	return out
}

func TestDecide(t *testing.T) {
	for _, tc := range []struct {
		name    string
		p       Policy
		dst     string
		names   []string
		proto   Proto
		via     bool
		allow   bool
		reason  string
		matched string
	}{
		{name: "default allow", dst: "203.0.113.10:80", allow: true, reason: ReasonDefaultAllow},
		{name: "default deny", p: Policy{DefaultDeny: true}, dst: "203.0.113.10:80", reason: ReasonDefaultDeny},
		{name: "offline beats allow-cidr", p: Policy{Offline: true, AllowCIDRs: pfx("0.0.0.0/0")}, dst: "203.0.113.10:80", reason: ReasonOffline},
		{name: "metadata beats allow-cidr", p: Policy{BlockMetadata: true, AllowCIDRs: pfx("169.254.0.0/16")}, dst: "169.254.169.254:80", reason: ReasonMetadata, matched: "169.254.169.254/32"},
		{name: "metadata ipv6", p: Policy{BlockMetadata: true}, dst: "[fd00:ec2::254]:80", reason: ReasonMetadata},
		{name: "metadata mapped", p: Policy{BlockMetadata: true}, dst: "[::ffff:169.254.169.254]:80", reason: ReasonMetadata},
		{name: "metadata Tencent", p: Policy{BlockMetadata: true}, dst: "169.254.0.23:80", reason: ReasonMetadata},
		{name: "metadata Scaleway", p: Policy{BlockMetadata: true}, dst: "169.254.42.42:80", reason: ReasonMetadata},
		{name: "metadata nat64", p: Policy{BlockMetadata: true}, dst: "[64:ff9b::a9fe:a9fe]:80", reason: ReasonMetadata},
		{name: "metadata 6to4", p: Policy{BlockMetadata: true}, dst: "[2002:a9fe:a9fe::1]:80", reason: ReasonMetadata},
		{name: "private rfc1918", p: Policy{BlockPrivate: true}, dst: "192.168.1.1:80", reason: ReasonPrivate, matched: "192.168.0.0/16"},
		{name: "private cgnat", p: Policy{BlockPrivate: true}, dst: "100.64.1.1:80", reason: ReasonPrivate},
		{name: "private ula", p: Policy{BlockPrivate: true}, dst: "[fd12::1]:80", reason: ReasonPrivate},
		{name: "private site-local", p: Policy{BlockPrivate: true}, dst: "[fec0::1]:80", reason: ReasonPrivate},
		{name: "private link-local", p: Policy{BlockPrivate: true}, dst: "[fe80::1]:80", reason: ReasonPrivate},
		{name: "private beats allow-cidr", p: Policy{BlockPrivate: true, AllowCIDRs: pfx("10.0.0.0/8")}, dst: "10.1.1.1:80", reason: ReasonPrivate},
		{name: "private public ok", p: Policy{BlockPrivate: true}, dst: "203.0.113.10:80", allow: true, reason: ReasonDefaultAllow},
		{name: "deny-cidr", p: Policy{DenyCIDRs: pfx("203.0.113.20/32")}, dst: "203.0.113.20:80", reason: ReasonDenyCIDR, matched: "203.0.113.20/32"},
		{name: "deny-cidr mapped", p: Policy{DenyCIDRs: pfx("203.0.113.20/32")}, dst: "[::ffff:203.0.113.20]:80", reason: ReasonDenyCIDR},
		{name: "deny-cidr compat", p: Policy{DenyCIDRs: pfx("203.0.113.20/32")}, dst: "[::cb00:7114]:80", reason: ReasonDenyCIDR},
		{name: "deny-cidr nat64", p: Policy{DenyCIDRs: pfx("203.0.113.20/32")}, dst: "[64:ff9b::cb00:7114]:80", reason: ReasonDenyCIDR},
		{name: "deny-cidr 6to4", p: Policy{DenyCIDRs: pfx("203.0.113.20/32")}, dst: "[2002:cb00:7114::]:80", reason: ReasonDenyCIDR},
		{name: "deny-cidr beats allow-cidr", p: Policy{DenyCIDRs: pfx("203.0.113.20/32"), AllowCIDRs: pfx("203.0.113.0/24")}, dst: "203.0.113.20:80", reason: ReasonDenyCIDR},
		{name: "deny-cidr beats allow-domain", p: Policy{DenyCIDRs: pfx("203.0.113.20/32"), AllowDomains: []string{"x.test"}}, dst: "203.0.113.20:80", names: []string{"x.test"}, reason: ReasonDenyCIDR},
		{name: "deny-cidr v6", p: Policy{DenyCIDRs: pfx("2001:db8::/32")}, dst: "[2001:db8::20]:80", reason: ReasonDenyCIDR},
		{name: "deny-domain-exact", p: Policy{DenyDomainsExact: []string{"denied.test"}}, dst: "203.0.113.20:80", names: []string{"denied.test"}, reason: ReasonDenyDomainExact, matched: "denied.test"},
		{name: "deny-domain-exact not sub", p: Policy{DenyDomainsExact: []string{"denied.test"}}, dst: "203.0.113.20:80", names: []string{"a.denied.test"}, allow: true, reason: ReasonDefaultAllow},
		{name: "deny-domain sub", p: Policy{DenyDomains: []string{"denied.test"}}, dst: "203.0.113.20:80", names: []string{"a.b.denied.test"}, reason: ReasonDenyDomain, matched: "denied.test"},
		{name: "deny-domain not lookalike", p: Policy{DenyDomains: []string{"example.com"}}, dst: "203.0.113.20:80", names: []string{"badexample.com"}, allow: true, reason: ReasonDefaultAllow},
		{name: "deny-domain beats allow-cidr", p: Policy{DenyDomains: []string{"denied.test"}, AllowCIDRs: pfx("203.0.113.0/24")}, dst: "203.0.113.20:80", names: []string{"denied.test"}, reason: ReasonDenyDomain},
		{name: "allow-cidr under deny", p: Policy{DefaultDeny: true, AllowCIDRs: pfx("203.0.113.0/24")}, dst: "203.0.113.10:80", allow: true, reason: ReasonAllowCIDR, matched: "203.0.113.0/24"},
		{name: "allow-cidr mapped", p: Policy{DefaultDeny: true, AllowCIDRs: pfx("203.0.113.10/32")}, dst: "[::ffff:203.0.113.10]:80", allow: true, reason: ReasonAllowCIDR},
		{name: "allow-cidr v4 does not open nat64", p: Policy{DefaultDeny: true, AllowCIDRs: pfx("203.0.113.10/32")}, dst: "[64:ff9b::cb00:710a]:80", reason: ReasonDefaultDeny},
		{name: "allow-domain-exact", p: Policy{DefaultDeny: true, AllowDomainsExact: []string{"allowed.test"}}, dst: "203.0.113.10:80", names: []string{"allowed.test"}, allow: true, reason: ReasonAllowDomExact},
		{name: "allow-domain-exact not sub", p: Policy{DefaultDeny: true, AllowDomainsExact: []string{"allowed.test"}}, dst: "203.0.113.10:80", names: []string{"sub.allowed.test"}, reason: ReasonDefaultDeny},
		{name: "allow-domain sub", p: Policy{DefaultDeny: true, AllowDomains: []string{"allowed.test"}}, dst: "203.0.113.10:80", names: []string{"sub.allowed.test"}, allow: true, reason: ReasonAllowDomain, matched: "allowed.test"},
		{name: "allow-domain not lookalike", p: Policy{DefaultDeny: true, AllowDomains: []string{"allowed.test"}}, dst: "203.0.113.20:80", names: []string{"badallowed.test"}, reason: ReasonDefaultDeny},
		{name: "allow-domain needs a name", p: Policy{DefaultDeny: true, AllowDomains: []string{"allowed.test"}}, dst: "203.0.113.10:80", reason: ReasonDefaultDeny},
		{name: "loopback denied by default", dst: "127.0.0.1:22", reason: ReasonHost},
		{name: "unspecified is loopback", dst: "0.0.0.0:22", reason: ReasonHost},
		{name: "mapped loopback", dst: "[::ffff:127.0.0.1]:22", reason: ReasonHost},
		{name: "v6 loopback", dst: "[::1]:22", reason: ReasonHost},
		{name: "loopback by allow-cidr", p: Policy{AllowCIDRs: pfx("127.0.0.1/32")}, dst: "127.0.0.1:22", allow: true, reason: ReasonAllowCIDR},
		{name: "limited broadcast", dst: "255.255.255.255:9", reason: ReasonHost, matched: "255.255.255.255/32"},
		{name: "mapped broadcast", dst: "[::ffff:255.255.255.255]:9", reason: ReasonHost},
		{name: "multicast", dst: "239.1.2.3:9", reason: ReasonHost, matched: "224.0.0.0/4"},
		{name: "v6 multicast", dst: "[ff05::1:3]:9", reason: ReasonHost, matched: "ff00::/8"},
		{name: "broadcast by a domain", p: Policy{DefaultDeny: true, AllowDomains: []string{"x.test"}}, dst: "255.255.255.255:9", names: []string{"x.test"}, reason: ReasonHost},
		{name: "rebinding: domain cannot open loopback", p: Policy{AllowDomains: []string{"evil.test"}}, dst: "127.0.0.1:22", names: []string{"evil.test"}, reason: ReasonHost},
		{name: "host address", p: Policy{HostAddrs: pfx("192.0.2.5/32")}, dst: "192.0.2.5:22", reason: ReasonHost},
		{name: "host address by allow-cidr", p: Policy{HostAddrs: pfx("192.0.2.5/32"), AllowCIDRs: pfx("192.0.2.5/32")}, dst: "192.0.2.5:22", allow: true, reason: ReasonAllowCIDR},
		{name: "a wide allow-cidr opens the host's address on its network", p: Policy{HostAddrs: pfx("192.0.2.5/32"), AllowCIDRs: pfx("192.0.2.0/24")}, dst: "192.0.2.5:22", allow: true, reason: ReasonAllowCIDR},
		{name: "but not the gateway", p: Policy{DefaultDeny: true, HostAddrs: pfx("10.87.0.1/32"), AllowCIDRs: pfx("10.0.0.0/8")}, dst: "10.87.0.1:80", reason: ReasonHost},
		{name: "which still opens the rest", p: Policy{DefaultDeny: true, HostAddrs: pfx("10.87.0.1/32"), AllowCIDRs: pfx("10.0.0.0/8")}, dst: "10.1.2.3:80", allow: true, reason: ReasonAllowCIDR},
		{name: "nor loopback", p: Policy{AllowCIDRs: pfx("0.0.0.0/0")}, dst: "127.0.0.1:22", reason: ReasonHost},
		{name: "a loopback range opens loopback", p: Policy{AllowCIDRs: pfx("127.0.0.0/8")}, dst: "127.0.0.1:22", allow: true, reason: ReasonAllowCIDR},
		{name: "the rootful pool opens its gateways", p: Policy{HostAddrs: pfx("10.88.3.1/32"), AllowCIDRs: pfx("0.0.0.0/0", "10.88.0.0/16")}, dst: "10.88.3.1:53", allow: true, reason: ReasonAllowCIDR, matched: "10.88.0.0/16"},
		{name: "proxy-only direct", p: Policy{ProxyOnly: true}, dst: "203.0.113.10:80", reason: ReasonProxyOnly},
		{name: "proxy-only udp", p: Policy{ProxyOnly: true}, proto: UDP, dst: "203.0.113.10:7", reason: ReasonProxyOnly},
		{name: "proxy-only via proxy", p: Policy{ProxyOnly: true}, via: true, dst: "203.0.113.10:80", allow: true, reason: ReasonDefaultAllow},
		{name: "proxy-only after default deny", p: Policy{ProxyOnly: true, DefaultDeny: true}, via: true, dst: "203.0.113.10:80", reason: ReasonDefaultDeny},
	} {
		t.Run(tc.name, func(t *testing.T) {
			proto := tc.proto
			if proto == "" {
				proto = TCP
			}
			d := tc.p.Decide(Flow{Proto: proto, Dst: netip.MustParseAddrPort(tc.dst), Names: tc.names, ViaProxy: tc.via})
			if d.Allow != tc.allow || d.Reason != tc.reason {
				t.Fatalf("Decide(%s) = %+v, want allow=%v reason=%s", tc.dst, d, tc.allow, tc.reason)
			}
			if tc.matched != "" {
				got := d.MatchedDomain
				if d.MatchedCIDR.IsValid() {
					got = d.MatchedCIDR.String()
				}
				if got != tc.matched {
					t.Fatalf("matched %q, want %q", got, tc.matched)
				}
			}
			if !d.Allow && d.Control == "" {
				t.Fatalf("denial without control: %+v", d)
			}
		})
	}
}

func TestDecideName(t *testing.T) {
	for _, tc := range []struct {
		name  string
		p     Policy
		q     string
		allow bool
	}{
		{"default", Policy{}, "web.test", true},
		{"offline", Policy{Offline: true}, "web.test", false},
		{"deny exact", Policy{DenyDomainsExact: []string{"denied.test"}}, "Denied.Test.", false},
		{"deny exact spares sub", Policy{DenyDomainsExact: []string{"denied.test"}}, "a.denied.test", true},
		{"deny suffix", Policy{DenyDomains: []string{"denied.test"}}, "x.denied.test", false},
		{"deny beats allow", Policy{DenyDomains: []string{"test"}, AllowDomains: []string{"web.test"}}, "web.test", false},
		{"default deny hides unlisted", Policy{DefaultDeny: true, AllowDomains: []string{"allowed.test"}}, "exfil.attacker.test", false},
		{"default deny resolves listed", Policy{DefaultDeny: true, AllowDomains: []string{"allowed.test"}}, "sub.allowed.test", true},
		{"default deny with only cidrs hides names too", Policy{DefaultDeny: true, AllowCIDRs: pfx("203.0.113.0/24")}, "web.test", false},
		{"default deny with nothing", Policy{DefaultDeny: true}, "web.test", false},
		{"an escaped dot is no label boundary", Policy{DefaultDeny: true, AllowDomains: []string{"allowed.test"}}, `secret.x\.allowed.test`, false},
		{"an escaped backslash before a dot is", Policy{DefaultDeny: true, AllowDomains: []string{"allowed.test"}}, `x\\.allowed.test`, true},
		{"three backslashes escape the dot", Policy{DefaultDeny: true, AllowDomains: []string{"allowed.test"}}, `x\\\.allowed.test`, false},
	} {
		if d := tc.p.DecideName(tc.q); d.Allow != tc.allow {
			t.Errorf("%s: DecideName(%s) = %+v, want allow=%v", tc.name, tc.q, d, tc.allow)
		}
	}
}

func TestParseErrorsNameTheFieldAndValue(t *testing.T) {
	for _, tc := range []struct {
		fn  func() error
		msg string
	}{
		{func() error { _, err := ParseCIDR("--allow-cidr", "300.1.1.1/8"); return err }, `invalid --allow-cidr "300.1.1.1/8"`},
		{func() error { _, err := ParseCIDR("--deny-cidr", "example.com"); return err }, `invalid --deny-cidr "example.com"`},
		{func() error { _, err := ParseDomain("--allow-domain", "exa mple.com"); return err }, `invalid --allow-domain "exa mple.com"`},
		{func() error { _, err := ParseDomain("--deny-domain", "-bad.com"); return err }, `invalid --deny-domain "-bad.com"`},
		{func() error { _, err := ParseDefault("--default-policy", "maybe"); return err }, `invalid --default-policy "maybe"`},
		{func() error { _, err := ParseResolvers("--dns", []string{"203.0.113.53", "300.1.1.1"}); return err }, `invalid --dns "300.1.1.1"`},
		{func() error { _, err := ParseResolvers("--dns", []string{"203.0.113.53:0"}); return err }, `invalid --dns "203.0.113.53:0"`},
		{func() error { _, err := ParseResolvers("--dns", []string{"224.0.0.251:5353"}); return err }, `invalid --dns "224.0.0.251:5353": a multicast or broadcast address`},
		{func() error { _, err := ParseResolvers("--dns", []string{"[ff02::fb]:5353"}); return err }, `invalid --dns "[ff02::fb]:5353"`},
		{func() error { _, err := ParseResolvers("--dns", []string{"::ffff:255.255.255.255"}); return err }, `invalid --dns "::ffff:255.255.255.255"`},
	} {
		err := tc.fn()
		if err == nil || !strings.Contains(err.Error(), tc.msg) {
			t.Errorf("error %v, want it to contain %s", err, tc.msg)
		}
		if _, ok := err.(*UsageError); !ok {
			t.Errorf("error %T is not a UsageError", err)
		}
	}
	if p, err := ParseCIDR("x", "::ffff:203.0.113.0/120"); err != nil || p.String() != "203.0.113.0/24" {
		t.Errorf("mapped prefix = %v %v", p, err)
	}
	if p, err := ParseCIDR("x", "2001:db8::1"); err != nil || p.String() != "2001:db8::1/128" {
		t.Errorf("bare v6 = %v %v", p, err)
	}
	r, err := ParseResolvers("--dns", []string{"203.0.113.53", " [2001:db8::53]:5353 ", "::ffff:203.0.113.54", "fe80::1%eth0"})
	if err != nil || fmt.Sprint(r) != "[203.0.113.53:53 [2001:db8::53]:5353 203.0.113.54:53 [fe80::1%eth0]:53]" {
		t.Errorf("resolvers = %v %v", r, err)
	}
}

func TestIdentityEndpoint(t *testing.T) {
	for dst, want := range map[string]bool{
		"169.254.169.254": true, "::ffff:169.254.169.254": true, "64:ff9b::a9fe:a9fe": true, "2002:a9fe:a9fe::1": true,
		"fd00:ec2::254": true, "169.254.0.23": true, "168.63.129.16": true,
		"169.254.170.23": false, "169.254.170.2": false, "169.254.169.253": false, "169.254.42.42": false, "203.0.113.10": false,
	} {
		if _, got := IdentityEndpoint(netip.MustParseAddr(dst)); got != want {
			t.Errorf("IdentityEndpoint(%s) = %v, want %v", dst, got, want)
		}
	}
	for _, p := range IdentityAddrs {
		if !slices.Contains(MetadataAddrs, p) {
			t.Errorf("%s is an identity endpoint but not among MetadataAddrs", p)
		}
	}
}

func TestNameHoldsAnywhere(t *testing.T) {
	cidr := []netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}
	for _, tc := range []struct {
		why    string
		p      Policy
		name   string
		reason string
		onHost bool
		want   bool
	}{
		{"the default allowed it", Policy{}, "web.test", ReasonDefaultAllow, false, true},
		{"its domain allowed it", Policy{DefaultDeny: true, AllowDomains: []string{"web.test"}}, "a.web.test", ReasonAllowDomain, false, true},
		{"exactly", Policy{DefaultDeny: true, AllowDomainsExact: []string{"web.test"}}, "web.test", ReasonAllowDomExact, false, true},
		{"unknown name", Policy{}, "", ReasonDefaultAllow, false, false},
		{"an allow-cidr allowed the address", Policy{AllowCIDRs: cidr}, "web.test", ReasonAllowCIDR, false, false},
		{"another name allowed the address", Policy{DefaultDeny: true, AllowDomains: []string{"web.test"}}, "rebind.test", ReasonAllowDomain, false, false},
		{"a deny-cidr", Policy{DenyCIDRs: cidr}, "web.test", ReasonDefaultAllow, false, false},
		{"block-private", Policy{BlockPrivate: true}, "web.test", ReasonDefaultAllow, false, false},
		{"block-metadata", Policy{BlockMetadata: true}, "web.test", ReasonDefaultAllow, false, false},
		{"a proxy on this host", Policy{}, "web.test", ReasonDefaultAllow, true, false},
	} {
		if got := tc.p.NameHoldsAnywhere(tc.name, tc.reason, tc.onHost); got != tc.want {
			t.Errorf("%s: NameHoldsAnywhere(%q, %s, %v) = %v, want %v", tc.why, tc.name, tc.reason, tc.onHost, got, tc.want)
		}
	}
}

// A rule in an IPv6 form that carries an IPv4 address is read as a
// destination is: it names that IPv4 address too, unless it is as wide
// as the tunnel.
func TestRulesInTunnelledFormsNameTheIPv4Inside(t *testing.T) {
	rules := func(field string, v ...string) []netip.Prefix {
		t.Helper()
		out, err := ParseRuleCIDRs(field, v)
		if err != nil {
			t.Fatal(err)
		}
		return out
	}
	for _, tc := range []struct {
		rule, derived string
	}{
		{"64:ff9b::cb00:7114/128", "203.0.113.20/32"},
		{"64:ff9b::cb00:7100/120", "203.0.113.0/24"},
		{"64:ff9b:1::cb00:7114/128", "203.0.113.20/32"},
		{"::203.0.113.20", "203.0.113.20/32"},
		{"2002:cb00:7114::/48", "203.0.113.20/32"},
		{"2002:cb00:7114:1::/64", "203.0.113.20/32"},
		{"2002:cb00::/32", "203.0.0.0/16"},
		{"2001:0:4136:e378:8000:63bf:34ff:8beb/128", "203.0.116.20/32"}, // Teredo: the client, inverted
		{"64:ff9b::/96", ""},
		{"2002::/16", ""},
		{"2001::/32", ""},
		{"::1", ""},
		{"::/128", ""},
		{"2001:db8::20", ""},
	} {
		got := rules("--deny-cidr", tc.rule)
		want := []netip.Prefix{mustPrefix(t, tc.rule)}
		if tc.derived != "" {
			want = append(want, netip.MustParsePrefix(tc.derived))
		}
		if !slices.Equal(got, want) {
			t.Errorf("rule %s: %v, want %v", tc.rule, got, want)
		}
	}

	deny := Policy{DenyCIDRs: rules("--deny-cidr", "64:ff9b::cb00:7114/128")}
	for _, dst := range []string{"203.0.113.20:80", "[::ffff:203.0.113.20]:80", "[64:ff9b::cb00:7114]:80"} {
		if d := deny.Decide(Flow{Proto: TCP, Dst: netip.MustParseAddrPort(dst)}); d.Allow {
			t.Errorf("deny of the NAT64 form let %s through", dst)
		}
	}
	allow := Policy{DefaultDeny: true, AllowCIDRs: rules("--allow-cidr", "64:ff9b::cb00:710a/128", "2002::/16")}
	for dst, want := range map[string]bool{"[64:ff9b::cb00:710a]:80": true, "203.0.113.10:80": true, "203.0.113.20:80": false, "[2002:cb00:7114::1]:80": false} {
		if d := allow.Decide(Flow{Proto: TCP, Dst: netip.MustParseAddrPort(dst)}); d.Allow != want {
			t.Errorf("allow of a NAT64 address and of 2002::/16: %s allowed %v, want %v", dst, d.Allow, want)
		}
	}
}

func mustPrefix(t *testing.T, s string) netip.Prefix {
	t.Helper()
	p, err := ParseCIDR("x", s)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// Every address within a rule's prefix carries an IPv4 address within
// the prefix derived from it (random prefixes in each tunnelled range).
func TestDerivedPrefixHoldsWhatItsAddressesCarry(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, base := range []netip.Prefix{nat64, nat64Local, sixToFour, teredo, compatible} {
		for range 2000 {
			var b [16]byte
			for i := range b {
				b[i] = byte(rng.Uint32())
			}
			bits := base.Bits() + rng.IntN(129-base.Bits())
			// The base's bits, then random ones.
			a := base.Addr().As16()
			for i := base.Bits(); i < 128; i++ {
				a[i/8] = a[i/8]&^(0x80>>(i%8)) | b[i/8]&(0x80>>(i%8))
			}
			p := netip.PrefixFrom(netip.AddrFrom16(a), bits).Masked()
			v4, ok := embeddedPrefix(p)
			if !ok {
				continue
			}
			if v4.Bits() == 0 {
				t.Fatalf("%v: derived %v, all of IPv4", p, v4)
			}
			// A random address within p.
			in := p.Addr().As16()
			for i := bits; i < 128; i++ {
				in[i/8] = in[i/8]&^(0x80>>(i%8)) | byte(rng.Uint32())&(0x80>>(i%8))
			}
			addrs := Embedded(netip.AddrFrom16(in))
			if carried := addrs[len(addrs)-1]; !carried.Is4() || !v4.Contains(carried) {
				t.Fatalf("%v: derived %v, but %v carries %v", p, v4, netip.AddrFrom16(in), carried)
			}
		}
	}
}
