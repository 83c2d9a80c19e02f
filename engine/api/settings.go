package api

import (
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
// from the node's own interfaces. (The engine refuses the loopback again
// where a name resolves to it.)
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
		if policy.Canonical(d.Addr()).IsLoopback() {
			return r, policy.Usagef("invalid %s %q: a container's resolver cannot be on the node's loopback", name("dns"), d)
		}
	}
	if r.Proxy != nil && isLoopbackHost(r.Proxy.Host) {
		return r, policy.Usagef("invalid %s %q: a container's proxy cannot be on the node's loopback", name("proxy"), r.Proxy.Addr)
	}
	return r, nil
}

func overlapsAny(p netip.Prefix, ranges []netip.Prefix) bool {
	for _, r := range ranges {
		if r.Overlaps(p) {
			return true
		}
	}
	return false
}

// isLoopbackHost says whether a proxy's host is a loopback address or
// the names every resolver gives the loopback (RFC 6761).
func isLoopbackHost(host string) bool {
	if a, err := netip.ParseAddr(strings.Trim(host, "[]")); err == nil {
		return policy.Canonical(a).IsLoopback()
	}
	host = strings.ToLower(strings.TrimSuffix(host, "."))
	return host == "localhost" || strings.HasSuffix(host, ".localhost")
}
