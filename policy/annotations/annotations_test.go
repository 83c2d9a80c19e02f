package annotations

import (
	"net/netip"
	"strings"
	"testing"
)

func TestPresent(t *testing.T) {
	for _, tc := range []struct {
		ann  map[string]string
		want bool
	}{
		{nil, false},
		{map[string]string{"io.kubernetes.cri.sandbox-id": "x"}, false},
		{map[string]string{Enabled: "true"}, true},
		{map[string]string{Enabled: "false"}, false},
		{map[string]string{Enabled: "nope"}, true},
		{map[string]string{Prefix + "default-policy": "deny"}, true},
		// Slips of the prefix count, so that Parse refuses them.
		{map[string]string{"Childflow.dev/default-policy": "deny"}, true},
		{map[string]string{"childflow.io/default-policy": "deny"}, true},
		{map[string]string{"childflow/enabled": "false"}, true},
		{map[string]string{"example.com/childflow": "x", "childflowish": "x"}, false},
	} {
		if got := Present(tc.ann); got != tc.want {
			t.Errorf("Present(%v) = %v, want %v", tc.ann, got, tc.want)
		}
	}
}

func TestParse(t *testing.T) {
	p, name, err := Parse(map[string]string{
		Policy:                           "default_policy: allow\nallow_cidrs: [192.0.2.0/24]\nblock_private: true\n",
		Prefix + "default-policy":        "deny",
		Prefix + "allow-cidrs":           "203.0.113.10/32, 2001:db8::/32",
		Prefix + "deny-domains-exact":    "denied.test",
		Prefix + "block-metadata":        "true",
		"unrelated.example.com/anything": "x",
	})
	if err != nil {
		t.Fatal(err)
	}
	pol, err := p.Policy(name)
	if err != nil {
		t.Fatal(err)
	}
	if !pol.DefaultDeny || !pol.BlockPrivate || !pol.BlockMetadata || len(pol.DenyDomainsExact) != 1 {
		t.Fatalf("policy %+v", pol)
	}
	want := []netip.Prefix{netip.MustParsePrefix("203.0.113.10/32"), netip.MustParsePrefix("2001:db8::/32")}
	if len(pol.AllowCIDRs) != 2 || pol.AllowCIDRs[0] != want[0] || pol.AllowCIDRs[1] != want[1] {
		t.Fatalf("allow cidrs %v: the per-key annotation must replace the document's list", pol.AllowCIDRs)
	}
}

func TestErrorsNameTheAnnotation(t *testing.T) {
	for _, tc := range []struct {
		ann  map[string]string
		want string
	}{
		{map[string]string{Prefix + "default-polcy": "deny"}, "unknown annotation childflow.dev/default-polcy"},
		{map[string]string{"Childflow.dev/default-policy": "deny"}, "unknown annotation Childflow.dev/default-policy"},
		{map[string]string{"childflow.io/policy": "default_policy: deny"}, "unknown annotation childflow.io/policy"},
		{map[string]string{"childflow.dev.enabled": "true"}, "unknown annotation childflow.dev.enabled"},
		{map[string]string{Prefix + "flow-log": "/etc/passwd"}, "unknown annotation childflow.dev/flow-log"},
		{map[string]string{Policy: "flow_log: /etc/shadow"}, `annotation childflow.dev/policy: key "flow_log" cannot be set`},
		{map[string]string{Policy: "default_policy: [x"}, "childflow.dev/policy"},
		{map[string]string{Prefix + "offline": "yes please"}, `invalid annotation childflow.dev/offline "yes please"`},
		{map[string]string{Prefix + "allow-cidrs": "203.0.113.0/33"}, `invalid annotation childflow.dev/allow-cidrs "203.0.113.0/33"`},
		{map[string]string{Policy: "allow_domains: [\"bad domain\"]"}, `invalid annotation childflow.dev/policy key allow_domains "bad domain"`},
		{map[string]string{Prefix + "default-policy": "maybe"}, `invalid annotation childflow.dev/default-policy "maybe"`},
		{map[string]string{Prefix + "proxy-only": "true"}, "annotation childflow.dev/proxy-only needs annotation childflow.dev/proxy"},
		{map[string]string{Enabled: "false", Prefix + "offline": "true"}, "childflow.dev/enabled is \"false\""},
	} {
		p, name, err := Parse(tc.ann)
		if err == nil {
			_, err = p.Policy(name)
		}
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%v: error %v, want it to contain %q", tc.ann, err, tc.want)
		}
	}
}
