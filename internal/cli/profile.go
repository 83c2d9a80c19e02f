package cli

import (
	"strings"

	"github.com/childflow/childflow/policy"
	"github.com/childflow/childflow/policy/profile"
)

// binding ties one profile field to its flag and option; exactly one of
// the three kinds is set.
type binding struct {
	flag       string
	str        **string
	strOpt     *string
	boolean    **bool
	boolOpt    *bool
	list       **profile.StringList
	listOption *[]string
}

func (o *execOptions) bindings(p *profile.Profile) []binding {
	s := func(flag string, f **string, opt *string) binding { return binding{flag: flag, str: f, strOpt: opt} }
	b := func(flag string, f **bool, opt *bool) binding { return binding{flag: flag, boolean: f, boolOpt: opt} }
	l := func(flag string, f **profile.StringList, opt *[]string) binding {
		return binding{flag: flag, list: f, listOption: opt}
	}
	return []binding{
		s("capture", &p.Capture, &o.capture),
		s("capture-point", &p.CapturePoint, &o.capturePoint),
		s("hosts-file", &p.HostsFile, &o.hostsFile),
		s("proxy", &p.Proxy, &o.proxy),
		s("proxy-user", &p.ProxyUser, &o.proxyUser),
		s("proxy-password", &p.ProxyPassword, &o.proxyPassword),
		s("summary-format", &p.SummaryFormat, &o.summaryFormat),
		s("flow-log", &p.FlowLog, &o.flowLog),
		s("default-policy", &p.DefaultPolicy, &o.defaultPolicy),
		s("iface", &p.Iface, &o.iface),
		b("proxy-insecure", &p.ProxyInsecure, &o.proxyInsecure),
		b("summary", &p.Summary, &o.summary),
		b("offline", &p.Offline, &o.offline),
		b("block-private", &p.BlockPrivate, &o.blockPrivate),
		b("block-metadata", &p.BlockMetadata, &o.blockMetadata),
		b("proxy-only", &p.ProxyOnly, &o.proxyOnly),
		b("fail-on-leak", &p.FailOnLeak, &o.failOnLeak),
		l("dns", &p.DNS, &o.dns),
		l("allow-cidr", &p.AllowCIDRs, &o.allowCIDR),
		l("deny-cidr", &p.DenyCIDRs, &o.denyCIDR),
		l("allow-domain", &p.AllowDomains, &o.allowDomain),
		l("allow-domain-exact", &p.AllowDomainsExact, &o.allowDomainExact),
		l("deny-domain", &p.DenyDomains, &o.denyDomain),
		l("deny-domain-exact", &p.DenyDomainsExact, &o.denyDomainExact),
	}
}

// applyProfile fills every option the command line did not set from p
// (profile < flags) and returns the profile's command.
func (o *execOptions) applyProfile(p *profile.Profile) ([]string, error) {
	o.loaded = p
	for _, b := range o.bindings(p) {
		if o.set(b.flag) {
			continue
		}
		switch {
		case b.str != nil && *b.str != nil:
			*b.strOpt = **b.str
		case b.boolean != nil && *b.boolean != nil:
			*b.boolOpt = **b.boolean
		case b.list != nil && *b.list != nil:
			*b.listOption = append([]string(nil), (**b.list)...)
		default:
			continue
		}
		o.fromProfile[b.flag] = true
	}
	if p.Backend != nil && !o.set("root") {
		switch *p.Backend {
		case "root":
			o.root = true
			o.fromProfile["root"] = true
		case "rootless", "":
		default:
			return nil, policy.Usagef("invalid %s %q: must be rootless or root", keyOf(p, "backend"), *p.Backend)
		}
	}
	if p.Command != nil {
		return *p.Command, nil
	}
	return nil, nil
}

// effective is the merged profile --dump-profile prints: every key with
// the value the run would use.
func (o *execOptions) effective(command []string) *profile.Profile {
	p := &profile.Profile{}
	for _, b := range o.bindings(p) {
		switch {
		case b.str != nil:
			v := *b.strOpt
			*b.str = &v
		case b.boolean != nil:
			v := *b.boolOpt
			*b.boolean = &v
		default:
			v := profile.StringList(append([]string{}, (*b.listOption)...))
			*b.list = &v
		}
	}
	backend := "rootless"
	if o.root {
		backend = "root"
	}
	p.Backend = &backend
	if len(command) > 0 {
		c := profile.StringList(command)
		p.Command = &c
	}
	return p
}

// name is what the user wrote to set flag, for errors: the flag, or the
// profile key when the value came from the profile, so that a profile's
// mistake is not named after a flag the user never typed.
func (o *execOptions) name(flag string) string {
	switch {
	case !o.fromProfile[flag]:
		return "--" + flag
	case flag == "root":
		return keyOf(o.loaded, "backend") + ` "root"`
	}
	return keyOf(o.loaded, profileKey(flag))
}

// keyOf names key of the profile p for errors, with the file of its
// extends chain that set it where that is another.
func keyOf(p *profile.Profile, key string) string {
	if from := p.ExtendedFrom(key); from != "" {
		return "profile " + from + " key " + key
	}
	return "profile key " + key
}

// keyName is name for a profile key (a profile.Namer).
func (o *execOptions) keyName(key string) string {
	return o.name(strings.TrimPrefix(profile.FlagName(key), "--"))
}

// profileKey is the profile key flag sets (allow-cidr: allow_cidrs), the
// inverse of profile.FlagName.
func profileKey(flag string) string {
	k := strings.ReplaceAll(flag, "-", "_")
	k = strings.Replace(k, "cidr", "cidrs", 1)
	return strings.Replace(k, "domain", "domains", 1)
}
