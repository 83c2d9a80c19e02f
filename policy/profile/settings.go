package profile

import (
	"net/netip"
	"slices"
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

// Canonical is p as a policy reads it, for comparing two profiles: a rule
// written in another form (203.0.113.10 and 203.0.113.10/32, a domain in
// capitals or with its final dot) is the same rule, the rule lists are
// sets, a resolver without its port is on port 53 (the resolvers' order
// counts), and an unset switch is off. A value that does not parse is
// kept as written: it cannot equal a valid one. p is left as it is.
func (p *Profile) Canonical() *Profile {
	if p == nil {
		return nil
	}
	c := *p
	set := func(list **StringList, form func(string) (string, error)) {
		if *list == nil {
			return
		}
		var out StringList
		for _, s := range **list {
			if f, err := form(s); err == nil {
				s = f
			}
			out = append(out, s)
		}
		slices.Sort(out)
		if out = slices.Compact(out); len(out) == 0 {
			*list = nil // no rules
			return
		}
		*list = &out
	}
	cidr := func(s string) (string, error) {
		prefix, err := policy.ParseCIDR("", s)
		return prefix.String(), err
	}
	domain := func(s string) (string, error) { return policy.ParseDomain("", s) }
	set(&c.AllowCIDRs, cidr)
	set(&c.DenyCIDRs, cidr)
	for _, l := range []**StringList{&c.AllowDomains, &c.AllowDomainsExact, &c.DenyDomains, &c.DenyDomainsExact} {
		set(l, domain)
	}
	if c.DNS != nil {
		dns := slices.Clone(*c.DNS)
		for i, s := range dns {
			if r, err := policy.ParseResolvers("", []string{s}); err == nil {
				dns[i] = r[0].String()
			}
		}
		c.DNS = &dns
	}
	if c.DefaultPolicy != nil {
		if deny, err := policy.ParseDefault("", *c.DefaultPolicy); err == nil {
			c.DefaultPolicy = nil
			if deny {
				c.DefaultPolicy = new("deny")
			}
		}
	}
	for _, b := range []**bool{&c.ProxyInsecure, &c.Summary, &c.Offline, &c.BlockPrivate, &c.BlockMetadata, &c.ProxyOnly, &c.FailOnLeak} {
		if *b != nil && !**b {
			*b = nil
		}
	}
	return &c
}
