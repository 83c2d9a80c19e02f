package api

import (
	"fmt"
	"net/netip"
	"strings"

	"github.com/childflow/childflow/engine/proxy/uri"
	"github.com/childflow/childflow/policy"
	"github.com/childflow/childflow/policy/profile"
)

// Resolved is a profile turned into what an engine runs with.
type Resolved struct {
	Policy *policy.Policy
	DNS    []netip.AddrPort // empty: the host's resolvers
	Proxy  *uri.URI         // nil: direct
	// ProxyInsecure skips verifying an https proxy's certificate chain.
	ProxyInsecure bool
}

// Resolve validates p. name says which flag or annotation set each key,
// so errors point at it. Producers call it before handing a profile on,
// so bad input is reported where it was written.
func Resolve(p *profile.Profile, name profile.Namer) (r Resolved, err error) {
	if r.Policy, err = p.Policy(name); err != nil {
		return r, err
	}
	if r.DNS, err = p.Resolvers(name); err != nil {
		return r, err
	}
	str := profile.Get[string]
	r.ProxyInsecure = profile.Get(p.ProxyInsecure)
	if str(p.Proxy) != "" {
		u, err := uri.Parse(name, str(p.Proxy), str(p.ProxyUser), str(p.ProxyPassword))
		r.Proxy = &u
		return r, err
	}
	if str(p.ProxyUser) != "" || str(p.ProxyPassword) != "" || r.ProxyInsecure {
		return r, policy.Usagef("%s, %s and %s need %s", name("proxy_user"), name("proxy_password"), name("proxy_insecure"), name("proxy"))
	}
	return r, nil
}

// ResolveContainer is Resolve for a container's settings, which come from
// its annotations: whoever created the container wrote them, and may not
// point the node's engine at the node itself. The node's loopback, where
// services trust local callers, is no resolver, proxy or allow-cidr of a
// container's, and neither are broadcast and multicast, which would leave
// from the node's own interfaces to every host on its links, nor (as
// resolver or proxy) the metadata services that answer with the node's
// identity, which its flows never reach either. (The engine refuses the
// loopback and broadcast again where a name resolves to them.)
func ResolveContainer(p *profile.Profile, name profile.Namer) (Resolved, error) {
	r, err := Resolve(p, name)
	if err != nil {
		return r, err
	}
	for _, c := range r.Policy.AllowCIDRs {
		if policy.NamesHost(c) && overlapsAny(c, policy.HostRanges) {
			return r, policy.Usagef("invalid %s %q: a container cannot be given the node's loopback, broadcast or multicast addresses", name("allow_cidrs"), c)
		}
	}
	for _, d := range r.DNS {
		if what := nodeOnly(d.Addr()); what != "" {
			return r, policy.Usagef("invalid %s %q: a container's resolver cannot be %s", name("dns"), d, what)
		}
	}
	if r.Proxy != nil {
		what := ""
		if a, err := netip.ParseAddr(strings.Trim(r.Proxy.Host, "[]")); err == nil {
			what = nodeOnly(a)
		} else if isLoopbackName(r.Proxy.Host) {
			what = "on the node's loopback"
		}
		if what != "" {
			return r, policy.Usagef("invalid %s %q: a container's proxy cannot be %s", name("proxy"), r.Proxy.Addr, what)
		}
	}
	return r, nil
}

// nodeOnly says what a, in any of its forms, is that only the node may
// talk to, or "".
func nodeOnly(a netip.Addr) string {
	forms := policy.Embedded(a)
	for _, x := range forms {
		if x.IsLoopback() || x.IsUnspecified() {
			return "on the node's loopback"
		}
	}
	for _, x := range forms {
		for _, r := range policy.HostRanges {
			if r.Contains(x) {
				return "a broadcast or multicast address"
			}
		}
	}
	if m, ok := policy.IdentityEndpoint(a); ok {
		return fmt.Sprintf("the metadata service at %s, which answers with the node's identity", m.Addr())
	}
	return ""
}

func overlapsAny(p netip.Prefix, ranges []netip.Prefix) bool {
	for _, r := range ranges {
		if r.Overlaps(p) {
			return true
		}
	}
	return false
}

// isLoopbackName says whether a proxy's host name is one every resolver
// gives the loopback (RFC 6761).
func isLoopbackName(host string) bool {
	host = strings.ToLower(strings.TrimSuffix(host, "."))
	return host == "localhost" || strings.HasSuffix(host, ".localhost")
}
