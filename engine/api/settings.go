package api

import (
	"net/netip"

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
