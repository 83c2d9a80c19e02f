package cli

import (
	"strings"

	"github.com/spf13/pflag"

	"github.com/childflow/childflow/policy"
	"github.com/childflow/childflow/policy/profile"
)

// execOptions are upstream childflow 0.8.1's flags.
type execOptions struct {
	profile, capture, capturePoint, report, reportFormat       string
	doctorFormat, hostsFile, proxy, proxyUser, proxyPassword   string
	summaryFormat, flowLog, defaultPolicy, iface               string
	dumpProfile, root, doctor, proxyInsecure, summary, offline bool
	blockPrivate, blockMetadata, proxyOnly, failOnLeak         bool
	dns, allowCIDR, denyCIDR                                   []string
	allowDomain, allowDomainExact, denyDomain, denyDomainExact []string
	mtu                                                        int
	// set reports whether the command line or the profile gave a flag.
	set         func(name string) bool
	fromProfile map[string]bool
	loaded      *profile.Profile // the profile that gave them, for errors
}

func newExecFlags(o *execOptions) *pflag.FlagSet {
	fs := pflag.NewFlagSet("childflow", pflag.ContinueOnError)
	// Everything after the command's name belongs to the command.
	fs.SetInterspersed(false)
	fs.StringVar(&o.profile, "profile", "", "load settings from a TOML profile")
	fs.BoolVar(&o.dumpProfile, "dump-profile", false, "print the effective profile and exit")
	fs.StringVarP(&o.capture, "capture", "c", "", "write a pcapng capture to FILE")
	fs.StringVarP(&o.capturePoint, "capture-point", "C", "child", "capture view: child|egress|wire-egress|both")
	fs.BoolVar(&o.root, "root", false, "use the rootful backend (veth + nftables)")
	fs.BoolVar(&o.doctor, "doctor", false, "check this host's requirements and exit")
	fs.StringVar(&o.doctorFormat, "doctor-format", "text", "doctor output: text|json")
	fs.StringVar(&o.report, "report", "", "render a report of a saved flow log FILE and exit")
	fs.StringVar(&o.reportFormat, "report-format", "text", "report format: text|markdown|json|html")
	fs.StringSliceVarP(&o.dns, "dns", "d", nil, "upstream DNS server ADDR[:PORT] (repeatable); default: the host's resolv.conf")
	fs.StringVar(&o.hostsFile, "hosts-file", "", "use FILE as /etc/hosts inside the sandbox")
	fs.StringVarP(&o.proxy, "proxy", "p", "", "force TCP through an upstream proxy URI")
	fs.StringVarP(&o.proxyUser, "proxy-user", "U", "", "proxy user name")
	fs.StringVarP(&o.proxyPassword, "proxy-password", "P", "", "proxy password")
	fs.BoolVar(&o.proxyInsecure, "proxy-insecure", false, "do not verify the HTTPS proxy's certificate chain")
	fs.BoolVar(&o.summary, "summary", false, "print a summary on stderr after the run")
	fs.StringVar(&o.summaryFormat, "summary-format", "text", "summary format: text|json")
	fs.StringVar(&o.flowLog, "flow-log", "", "write the JSON Lines flow log to FILE")
	fs.BoolVar(&o.offline, "offline", false, "no network at all, DNS included")
	fs.BoolVar(&o.blockPrivate, "block-private", false, "block private, loopback, link-local, CGNAT and ULA destinations")
	fs.BoolVar(&o.blockMetadata, "block-metadata", false, "block cloud metadata endpoints")
	fs.StringVar(&o.defaultPolicy, "default-policy", "allow", "what happens when no rule matches: allow|deny")
	fs.StringSliceVar(&o.allowCIDR, "allow-cidr", nil, "allow destinations in CIDR (repeatable)")
	fs.StringSliceVar(&o.denyCIDR, "deny-cidr", nil, "deny destinations in CIDR (repeatable)")
	fs.StringSliceVar(&o.allowDomain, "allow-domain", nil, "allow DOMAIN and its subdomains (repeatable)")
	fs.StringSliceVar(&o.allowDomainExact, "allow-domain-exact", nil, "allow exactly DOMAIN (repeatable)")
	fs.StringSliceVar(&o.denyDomain, "deny-domain", nil, "deny DOMAIN and its subdomains (repeatable)")
	fs.StringSliceVar(&o.denyDomainExact, "deny-domain-exact", nil, "deny exactly DOMAIN (repeatable)")
	fs.BoolVar(&o.proxyOnly, "proxy-only", false, "allow only traffic that goes through the proxy")
	fs.BoolVar(&o.failOnLeak, "fail-on-leak", false, "exit 3 when a flow was blocked but the command exited 0")
	fs.StringVarP(&o.iface, "iface", "i", "", "send the sandbox's traffic out through IFACE (--root)")
	fs.IntVar(&o.mtu, "mtu", 65520, "MTU of the sandbox's cf0 (1280-65520)")
	o.fromProfile = map[string]bool{}
	o.set = func(name string) bool { return fs.Changed(name) || o.fromProfile[name] }
	return fs
}

// checkChoice says value is one of choices; name is what set it
// (execOptions.name).
func checkChoice(name, value string, choices ...string) error {
	for _, c := range choices {
		if value == c {
			return nil
		}
	}
	return policy.Usagef("invalid %s %q: must be one of %s", name, value, strings.Join(choices, ", "))
}
