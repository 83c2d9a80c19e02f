package profile

import (
	"net/netip"
	"strings"

	"github.com/childflow/childflow/policy"
)

// Get is the value of an optional key, the zero value when unset.
func Get[T any](v *T) T {
	var zero T
	if v == nil {
		return zero
	}
	return *v
}

// Namer maps a profile key (allow_cidrs) to what the user wrote to set it
// (--allow-cidr, childflow.dev/allow-cidrs), so errors name it.
type Namer func(key string) string

// FlagName is the Namer of the command line.
func FlagName(key string) string {
	f := strings.ReplaceAll(key, "_", "-")
	f = strings.Replace(f, "cidrs", "cidr", 1)
	f = strings.Replace(f, "domains", "domain", 1)
	return "--" + f
}

// Policy builds and validates the policy the profile describes.
func (p *Profile) Policy(name Namer) (*policy.Policy, error) {
	if Get(p.ProxyOnly) && Get(p.Proxy) == "" {
		return nil, policy.Usagef("%s needs %s", name("proxy_only"), name("proxy"))
	}
	out := &policy.Policy{Offline: Get(p.Offline), BlockPrivate: Get(p.BlockPrivate), BlockMetadata: Get(p.BlockMetadata), ProxyOnly: Get(p.ProxyOnly)}
	var err error
	if out.DefaultDeny, err = policy.ParseDefault(name("default_policy"), Get(p.DefaultPolicy)); err != nil {
		return nil, err
	}
	if out.AllowCIDRs, err = policy.ParseRuleCIDRs(name("allow_cidrs"), Get(p.AllowCIDRs)); err != nil {
		return nil, err
	}
	if out.DenyCIDRs, err = policy.ParseRuleCIDRs(name("deny_cidrs"), Get(p.DenyCIDRs)); err != nil {
		return nil, err
	}
	for _, d := range []struct {
		key string
		in  *StringList
		out *[]string
	}{
		{"allow_domains", p.AllowDomains, &out.AllowDomains},
		{"allow_domains_exact", p.AllowDomainsExact, &out.AllowDomainsExact},
		{"deny_domains", p.DenyDomains, &out.DenyDomains},
		{"deny_domains_exact", p.DenyDomainsExact, &out.DenyDomainsExact},
	} {
		if *d.out, err = policy.ParseDomains(name(d.key), Get(d.in)); err != nil {
			return nil, err
		}
	}
	return out, nil
}

// Resolvers are the upstream DNS servers the profile names (none: the
// host's).
func (p *Profile) Resolvers(name Namer) ([]netip.AddrPort, error) {
	if p.DNS == nil {
		return nil, nil
	}
	return policy.ParseResolvers(name("dns"), *p.DNS)
}
