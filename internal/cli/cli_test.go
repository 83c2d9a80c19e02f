package cli

import (
	"bytes"
	"context"
	"os"
	"slices"
	"strings"
	"testing"

	"github.com/childflow/childflow/policy/profile"
)

// TestSubcommandArguments: a word a subcommand does not take is a usage
// error naming it, not silently dropped; report takes its flow log as
// an argument and renders as --report does.
func TestSubcommandArguments(t *testing.T) {
	flows := "../../test/testdata/report/flows.jsonl"
	want, err := os.ReadFile("../../test/testdata/report/report.text")
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		args   []string
		code   int
		stderr string
		stdout string
	}{
		{[]string{"cleanup", "--state-dir", t.TempDir(), "extra"}, 2, `childflow cleanup takes no arguments, got ["extra"]`, ""},
		{[]string{"doctor", "json"}, 2, `childflow doctor takes no arguments, got ["json"]`, ""},
		{[]string{"doctor", "--format", "yaml"}, 2, `invalid --format "yaml"`, ""},
		{[]string{"doctor", "--doctor-format", "yaml"}, 2, `invalid --doctor-format "yaml"`, ""},
		{[]string{"sandboxes", "--format", "yaml"}, 2, `invalid --format "yaml"`, ""},
		{[]string{"daemon", "start"}, 2, `childflow daemon takes no arguments, got ["start"]`, ""},
		{[]string{"sandboxes", "all"}, 2, `childflow sandboxes takes no arguments, got ["all"]`, ""},
		{[]string{"cni-install", "now"}, 2, `childflow cni-install takes no arguments, got ["now"]`, ""},
		{[]string{"version", "--short"}, 2, `childflow version takes no arguments, got ["--short"]`, ""},
		{[]string{"report"}, 2, `childflow report takes 1 argument(s), got []`, ""},
		{[]string{"report", flows, flows}, 2, "childflow report takes 1 argument(s)", ""},
		{[]string{"report", "--format", "pdf", flows}, 2, `invalid --format "pdf"`, ""},
		{[]string{"report", "--report-format", "pdf", flows}, 2, `invalid --report-format "pdf"`, ""},
		{[]string{"report", "/nonexistent.jsonl"}, 2, `invalid report "/nonexistent.jsonl"`, ""},
		{[]string{"report", flows}, 0, "", string(want)},
		{[]string{"--report", flows}, 0, "", string(want)},
		{[]string{"report", "--format", "json", flows}, 0, "", `"flows":`},
	} {
		var stdout, stderr bytes.Buffer
		code := Run(context.Background(), append([]string{"childflow"}, c.args...), &stdout, &stderr)
		if code != c.code || !strings.Contains(stderr.String(), c.stderr) || !strings.Contains(stdout.String(), c.stdout) {
			t.Errorf("childflow %q: exit %d, stderr %q, stdout %.80q; want exit %d, stderr with %q, stdout with %.80q",
				c.args, code, stderr.String(), stdout.String(), c.code, c.stderr, c.stdout)
		}
	}
}

// TestHelp: --help, -h and `childflow help` print the command's synopsis
// and options on stdout and exit 0; `childflow -- help` still runs a
// command of that name.
func TestHelp(t *testing.T) {
	for _, c := range []struct {
		args []string
		want []string
	}{
		{[]string{"--help"}, []string{"Usage: childflow [exec] [OPTIONS] [--] COMMAND [ARG...]", "  cleanup ", "  --allow-cidr strings", "Exit status:"}},
		{[]string{"-h"}, []string{"Usage: childflow [exec]"}},
		{[]string{"help"}, []string{"Usage: childflow [exec]", "--fail-on-leak"}},
		{[]string{"exec", "--help"}, []string{"Usage: childflow [exec]"}},
		{[]string{"help", "exec"}, []string{"Usage: childflow [exec]"}},
		{[]string{"report", "--help"}, []string{"Usage: childflow report [--format text|markdown|json|html] FLOWLOG\n", "Options:\n", "--report-format"}},
		{[]string{"help", "report"}, []string{"Usage: childflow report ", "--report-format"}},
		{[]string{"cleanup", "-h"}, []string{"Usage: childflow cleanup [OPTIONS]\n", "--root-state-dir"}},
		{[]string{"help", "daemon"}, []string{"Usage: childflow daemon [OPTIONS]\n", "--flow-log-dir"}},
		{[]string{"doctor", "--help"}, []string{"Usage: childflow doctor [--format text|json]\n", "--format"}},
		{[]string{"sandboxes", "--help"}, []string{"Usage: childflow sandboxes", "--socket"}},
		{[]string{"cni-install", "--help"}, []string{"Usage: childflow cni-install", "--uninstall"}},
		{[]string{"help", "version"}, []string{"Usage: childflow version\n\nPrint childflow's version.\n"}},
	} {
		var stdout, stderr bytes.Buffer
		code := Run(context.Background(), append([]string{"childflow"}, c.args...), &stdout, &stderr)
		for _, w := range c.want {
			if !strings.Contains(stdout.String(), w) {
				t.Errorf("childflow %q: stdout has no %q:\n%s", c.args, w, stdout.String())
			}
		}
		if code != 0 || stderr.Len() > 0 {
			t.Errorf("childflow %q: exit %d, stderr %q; want 0 and nothing", c.args, code, stderr.String())
		}
	}
	var stdout, stderr bytes.Buffer
	if code := Run(context.Background(), []string{"childflow", "help", "nope"}, &stdout, &stderr); code != 2 ||
		stderr.String() != "childflow: childflow help takes one of childflow's commands, got [\"nope\"]\n" {
		t.Errorf("childflow help nope: exit %d, stderr %q", code, stderr.String())
	}
	// After "--" (or the first word that is no command) "help" is the
	// command to run.
	for _, args := range [][]string{{"--dump-profile", "--", "help"}, {"--dump-profile", "--summary", "help"}} {
		stdout.Reset()
		if code := Run(context.Background(), append([]string{"childflow"}, args...), &stdout, &stderr); code != 0 ||
			!strings.Contains(stdout.String(), "command = ['help']\n") {
			t.Errorf("childflow %q: exit %d, stdout %q", args, code, stdout.String())
		}
	}
}

// TestFlagsReplaceTheProfile: a flag given replaces the profile's value,
// a list flag its whole list, and an empty one clears it (README).
func TestFlagsReplaceTheProfile(t *testing.T) {
	prof := t.TempDir() + "/p.toml"
	if err := os.WriteFile(prof, []byte(`proxy = "http://127.0.0.1:3128"
deny_cidrs = ["203.0.113.20/32", "203.0.113.21/32"]
allow_domains = ["example.test"]
flow_log = "/tmp/flows.jsonl"
`), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		flags []string
		want  []string // lines of the effective profile
	}{
		{nil, []string{`proxy = 'http://127.0.0.1:3128'`, `deny_cidrs = ['203.0.113.20/32', '203.0.113.21/32']`, `flow_log = '/tmp/flows.jsonl'`}},
		{[]string{"--deny-cidr", "203.0.113.22"}, []string{`deny_cidrs = ['203.0.113.22']`, `allow_domains = ['example.test']`}},
		{[]string{"--deny-cidr", "", "--proxy", "", "--flow-log", ""}, []string{`deny_cidrs = []`, `proxy = ''`, `flow_log = ''`, `allow_domains = ['example.test']`}},
	} {
		var stdout, stderr bytes.Buffer
		args := append([]string{"childflow", "--profile", prof}, c.flags...)
		if code := Run(context.Background(), append(args, "--dump-profile"), &stdout, &stderr); code != 0 {
			t.Fatalf("%q: exit %d: %s", c.flags, code, stderr.String())
		}
		lines := strings.Split(stdout.String(), "\n")
		for i := range lines {
			lines[i] = strings.TrimSpace(lines[i])
		}
		for _, w := range c.want {
			if !slices.Contains(lines, w) {
				t.Errorf("%q: no line %q in the effective profile:\n%s", c.flags, w, stdout.String())
			}
		}
	}
}

// TestProfileMistakesNameTheKey: a bad value the profile gave is named by
// its key, and by the file of its extends chain that gave it, not by a
// flag the user never typed; the same value given as a flag is named by
// the flag. Each is one line and exit 2, before anything is set up.
func TestProfileMistakesNameTheKey(t *testing.T) {
	dir := t.TempDir()
	base := dir + "/base.toml"
	for _, c := range []struct {
		profile, base string
		flags         []string
		want          string
	}{
		{`deny_domains = ["bad..name"]`, "", nil, `invalid profile key deny_domains "bad..name": not a domain name`},
		// What a profile it extends gave is named with that profile.
		{`extends = "base.toml"`, `deny_domains = ["bad..name"]`, nil, `invalid profile ` + base + ` key deny_domains "bad..name": not a domain name`},
		{`extends = "base.toml"`, `backend = "rooty"`, nil, `invalid profile ` + base + ` key backend "rooty"`},
		{`extends = "base.toml"`, `iface = "eth0"`, nil, `invalid profile ` + base + ` key iface "eth0": needs --root`},
		{"extends = \"base.toml\"\nproxy_only = true", `proxy = "gopher://127.0.0.1:70"`, nil, `invalid profile ` + base + ` key proxy "gopher://127.0.0.1:70"`},
		{"extends = \"base.toml\"\ndeny_domains = [\"bad..name\"]", `deny_domains = ["example.test"]`, nil, `invalid profile key deny_domains "bad..name"`},
		{`allow_cidrs = ["203.0.113.0/33"]`, "", nil, `invalid profile key allow_cidrs "203.0.113.0/33"`},
		{`dns = ["resolver"]`, "", nil, `invalid profile key dns "resolver"`},
		{`default_policy = "maybe"`, "", nil, `invalid profile key default_policy "maybe"`},
		{`proxy = "gopher://127.0.0.1:70"`, "", nil, `invalid profile key proxy "gopher://127.0.0.1:70"`},
		{`proxy_only = true`, "", nil, `profile key proxy_only needs --proxy`},
		{`proxy_user = "u"`, "", nil, `profile key proxy_user, --proxy-password and --proxy-insecure need --proxy`},
		{`hosts_file = "/nonexistent"`, "", nil, `invalid profile key hosts_file "/nonexistent"`},
		{`summary_format = "xml"`, "", nil, `invalid profile key summary_format "xml"`},
		{`capture_point = "wire"`, "", nil, `invalid profile key capture_point "wire"`},
		{`flow_log = "` + dir + `"`, "", nil, `profile key flow_log: ` + dir + ` is a directory`},
		{`capture = "` + dir + `"`, "", nil, `profile key capture: ` + dir + ` is a directory`},
		{`iface = "eth0"`, "", nil, `invalid profile key iface "eth0": needs --root`},
		{`extends = "missing.toml"`, "", nil, `p.toml: invalid extends "` + dir + `/missing.toml"`},
		// The flag wins over the profile, and is named.
		{`deny_domains = ["example.test"]`, "", []string{"--deny-domain", "bad..name"}, `invalid --deny-domain "bad..name"`},
		{`summary_format = "json"`, "", []string{"--summary-format", "xml"}, `invalid --summary-format "xml"`},
	} {
		prof := dir + "/p.toml"
		if err := os.WriteFile(prof, []byte(c.profile+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(base, []byte(c.base+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		var stdout, stderr bytes.Buffer
		args := append(append([]string{"childflow", "--profile", prof}, c.flags...), "--", "true")
		code := Run(context.Background(), args, &stdout, &stderr)
		if code != 2 || !strings.Contains(stderr.String(), c.want) || strings.Count(stderr.String(), "\n") != 1 {
			t.Errorf("profile %s, flags %q: exit %d, stderr %q; want exit 2 and one line with %q", c.profile, c.flags, code, stderr.String(), c.want)
		}
	}
}

// TestProfileKeyIsFlagNamesInverse: every flag a profile can set maps to
// its key and back.
func TestProfileKeyIsFlagNamesInverse(t *testing.T) {
	var o execOptions
	p := &profile.Profile{}
	fields := profile.Fields(p)
	for _, b := range o.bindings(p) {
		key := profileKey(b.flag)
		if _, ok := fields[key]; !ok {
			t.Errorf("flag --%s: profile key %q does not exist", b.flag, key)
		}
		if back := profile.FlagName(key); back != "--"+b.flag {
			t.Errorf("flag --%s: key %q names %s", b.flag, key, back)
		}
	}
}
