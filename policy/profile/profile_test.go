package profile

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/childflow/childflow/policy"
)

func write(t *testing.T, dir, name, body string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	os.MkdirAll(filepath.Dir(p), 0o755)
	if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestFormatsAgree(t *testing.T) {
	for _, tc := range []struct{ name, body string }{
		{"p.toml", "default_policy = \"deny\"\nallow_cidrs = [\"203.0.113.0/24\"]\ndns = \"203.0.113.53\"\noffline = true\n"},
		{"p.yaml", "default_policy: deny\nallow_cidrs: [203.0.113.0/24]\ndns: 203.0.113.53\noffline: true\n"},
		{"p.json", `{"default_policy":"deny","allow_cidrs":["203.0.113.0/24"],"dns":["203.0.113.53"],"offline":true}`},
	} {
		p, err := Parse(tc.name, []byte(tc.body), "")
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if *p.DefaultPolicy != "deny" || (*p.AllowCIDRs)[0] != "203.0.113.0/24" || (*p.DNS)[0] != "203.0.113.53" || !*p.Offline || p.BlockPrivate != nil {
			t.Fatalf("%s parsed to %+v", tc.name, p)
		}
	}
}

func TestBadInputNamesTheKey(t *testing.T) {
	for _, tc := range []struct{ body, want string }{
		{"allow_cidr = [\"1.2.3.4/32\"]\n", `unknown key "allow_cidr"`},
		{"offline = \"yes\"\n", `key "offline": invalid value "yes"`},
		{"allow_domains = 5\n", `key "allow_domains": invalid value 5`},
		{"this is not toml", "profile p.toml"},
	} {
		_, err := Parse("p.toml", []byte(tc.body), "")
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%q: error %v, want %s", tc.body, err, tc.want)
		}
		if _, ok := err.(*policy.UsageError); !ok {
			t.Errorf("%q: %T is not a usage error", tc.body, err)
		}
	}
}

func TestExtendsChainRelativePathsAndOverride(t *testing.T) {
	dir := t.TempDir()
	write(t, dir, "base/base.toml", "default_policy = \"deny\"\nallow_domains = [\"a.test\", \"b.test\"]\nhosts_file = \"hosts\"\nflow_log = \"/abs/flows.jsonl\"\n")
	write(t, dir, "mid/mid.toml", "extends = \"../base/base.toml\"\nblock_private = true\n")
	leaf := write(t, dir, "leaf.toml", "extends = \"mid/mid.toml\"\nallow_domains = [\"c.test\"]\n")
	p, err := Load(leaf)
	if err != nil {
		t.Fatal(err)
	}
	if got := *p.AllowDomains; len(got) != 1 || got[0] != "c.test" {
		t.Errorf("allow_domains %v: lists must be replaced, not appended", got)
	}
	if *p.DefaultPolicy != "deny" || !*p.BlockPrivate {
		t.Errorf("inherited keys lost: %+v", p)
	}
	if *p.HostsFile != filepath.Join(dir, "base", "hosts") || *p.FlowLog != "/abs/flows.jsonl" {
		t.Errorf("paths %s %s: must resolve against the file that sets them", *p.HostsFile, *p.FlowLog)
	}
	// Each key is traced to the file that set it, for errors.
	for key, want := range map[string]string{
		"default_policy": filepath.Join(dir, "base", "base.toml"),
		"block_private":  filepath.Join(dir, "mid", "mid.toml"),
		"allow_domains":  "", // the leaf's own
		"proxy":          "", // set by none
	} {
		if got := p.ExtendedFrom(key); got != want {
			t.Errorf("ExtendedFrom(%q) = %q, want %q", key, got, want)
		}
	}
}

func TestExtendsCycleIsRejectedWithTheChain(t *testing.T) {
	dir := t.TempDir()
	a := write(t, dir, "a.toml", "extends = \"b.toml\"\n")
	write(t, dir, "b.toml", "extends = \"a.toml\"\n")
	_, err := Load(a)
	if err == nil || !strings.Contains(err.Error(), "cycle") || !strings.Contains(err.Error(), "a.toml -> ") || !strings.Contains(err.Error(), "b.toml -> ") {
		t.Fatalf("cycle error %v", err)
	}
	if _, err := Load(filepath.Join(dir, "missing.toml")); err == nil || !strings.Contains(err.Error(), "--profile") {
		t.Fatalf("missing profile error %v", err)
	}
}

func TestDumpRedactsThePassword(t *testing.T) {
	pw, user := "hunter2", "alice"
	out, err := (&Profile{ProxyPassword: &pw, ProxyUser: &user}).TOML()
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(out, pw) || !strings.Contains(out, Redacted) || !strings.Contains(out, "alice") {
		t.Fatalf("dump:\n%s", out)
	}
	back, err := Parse("dump.toml", []byte(out), "")
	if err != nil || *back.ProxyUser != "alice" {
		t.Fatalf("dump does not parse back: %v", err)
	}
}
