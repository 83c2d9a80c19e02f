package annotations_test

import (
	"strings"
	"testing"

	"github.com/childflow/childflow/engine/api"
	"github.com/childflow/childflow/policy/annotations"
)

// FuzzAnnotations reads what whoever creates a pod may write: a policy
// document and one annotation of the prefix, any key, any value. The
// CNI plugin, the hook and the node daemon all read them; none may
// panic, and what reads without an error must resolve; every error names
// the annotation (make fuzz).
func FuzzAnnotations(f *testing.F) {
	f.Add("default_policy: deny\nallow_cidrs: [203.0.113.10/32]\nallow_domains: [example.com]\n", "allow-cidrs", "2001:db8::/32")
	f.Add(`{"dns": ["203.0.113.53"], "proxy": "socks5h://203.0.113.30:1080", "proxy_user": "u"}`, "proxy-password", "p")
	f.Add("", "deny-domains", "*.evil.test,evil.test")
	f.Add("offline: true\n", "enabled", "true")
	f.Add("proxy: http://[::1]:3128\n", "block-metadata", "yes")
	f.Add("allow_cidrs: [::ffff:127.0.0.1/128]\n", "dns", "127.0.0.53:53")
	f.Add("extends: /etc/shadow\n", "flow-log", "/tmp/x")
	f.Fuzz(func(t *testing.T, doc, key, value string) {
		ann := map[string]string{annotations.Prefix + key: value}
		if doc != "" {
			ann[annotations.Policy] = doc
		}
		p, name, err := annotations.Parse(ann)
		if err != nil {
			if !strings.Contains(err.Error(), annotations.Prefix) {
				t.Fatalf("an error that names no annotation: %v", err)
			}
			return
		}
		if _, err := api.ResolveContainer(p, name); err != nil && !strings.Contains(err.Error(), annotations.Prefix) {
			t.Fatalf("an error that names no annotation: %v", err)
		}
	})
}
