package shim

import (
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/childflow/childflow/policy/annotations"
)

func TestCommand(t *testing.T) {
	for _, tc := range []struct {
		args        []string
		cmd, bundle string
	}{
		{[]string{"--root", "/run/docker/runtime-runc/moby", "--log", "x.log", "--log-format", "json", "create", "--bundle", "/b", "--pid-file", "p", "id"}, "create", "/b"},
		{[]string{"--systemd-cgroup", "run", "-b", "/c", "id"}, "run", "/c"},
		{[]string{"create", "--bundle=/d", "id"}, "create", "/d"},
		{[]string{"create", "id"}, "create", "."},
		{[]string{"--root", "/r", "start", "id"}, "start", "."},
		{[]string{"--version"}, "", ""},
		// runc reads -flag as --flag; crun takes -bDIR and newer ones --log-level.
		{[]string{"-root", "/r", "-log", "l", "create", "-bundle", "/e", "id"}, "create", "/e"},
		{[]string{"--root=/r", "-log-format=json", "--debug", "run", "-bundle=/f", "id"}, "run", "/f"},
		{[]string{"--log-level", "warning", "--cgroup-manager", "systemd", "create", "-b/g", "id"}, "create", "/g"},
		{[]string{"--rootless", "true", "restore", "--image-path", "/i", "--bundle", "/h", "id"}, "restore", "/h"},
		{[]string{"create", "--", "--bundle", "/i"}, "create", "."},
	} {
		cmd, bundle, err := command(tc.args)
		if err != nil || cmd != tc.cmd || bundle != tc.bundle {
			t.Errorf("command(%q) = %q, %q, %v; want %q, %q", tc.args, cmd, bundle, err, tc.cmd, tc.bundle)
		}
	}
	// A global flag with a value it does not know would make the value
	// the command, and a create behind it would pass unprepared.
	for _, args := range [][]string{
		{"--log-verbosity", "3", "create", "--bundle", "/b", "id"},
		{"--ro", "/r", "create", "id"}, // crun's abbreviation of --root
	} {
		if cmd, _, err := command(args); err == nil || !strings.Contains(err.Error(), "no runc or crun command") {
			t.Errorf("command(%q) = %q, %v; want an error", args, cmd, err)
		}
	}
}

func TestRestoreOfASandboxedContainerIsRefused(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "config.json")
	os.WriteFile(path, []byte(`{"annotations":{"io.example/a":"b"}}`), 0o600)
	if err := refuseRestore(path, Options{}); err != nil {
		t.Errorf("a container without childflow annotations: %v", err)
	}
	if err := refuseRestore(path, Options{Policy: "default_policy: deny\n"}); err == nil {
		t.Error("restored under the runtime's default policy")
	}
	os.WriteFile(path, []byte(`{"annotations":{"childflow.dev/default-policy":"deny"}}`), 0o600)
	if err := refuseRestore(path, Options{}); err == nil || !strings.Contains(err.Error(), "checkpoint") {
		t.Errorf("an annotated container: %v", err)
	}
}

func TestParseOptionsStripsOurFlags(t *testing.T) {
	opts, rest, err := parseOptions([]string{"--childflow-runtime=crun", "--childflow-socket", "/s", "--root", "/r", "create", "--bundle", "/b", "x"})
	if err != nil {
		t.Fatal(err)
	}
	if opts.Runtime != "crun" || opts.Socket != "/s" || !reflect.DeepEqual(rest, []string{"--root", "/r", "create", "--bundle", "/b", "x"}) {
		t.Fatalf("opts %+v rest %q", opts, rest)
	}
	if _, _, err := parseOptions([]string{"--childflow-polcy=x"}); err == nil || !strings.Contains(err.Error(), "--childflow-polcy") {
		t.Fatalf("unknown flag: %v", err)
	}
	bad := filepath.Join(t.TempDir(), "p.yaml")
	os.WriteFile(bad, []byte("flow_lgo: x\n"), 0o644)
	if _, _, err := parseOptions([]string{"--childflow-policy", bad}); err == nil || !strings.Contains(err.Error(), "flow_lgo") {
		t.Fatalf("bad policy file: %v", err)
	}
	for doc, want := range map[string]string{"flow_log: /etc/x\n": `key "flow_log" cannot be set`, "proxy: http://127.0.0.1:3128\n": "node's loopback"} {
		os.WriteFile(bad, []byte(doc), 0o644)
		if _, _, err := parseOptions([]string{"--childflow-policy", bad}); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("policy file %q: %v, want an error saying %s", doc, err, want)
		}
	}
}

func TestPrepareIsIdempotentAndKeepsUnknownFields(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "config.json")
	orig := `{"ociVersion":"1.0.2","process":{"args":["sh"]},"x-vendor":{"keep":true},
"hooks":{"poststop":[{"path":"/other"}]},"annotations":{"io.example/a":"b"}}`
	os.WriteFile(path, []byte(orig), 0o600)
	opts := Options{Hook: "/usr/local/bin/childflow-hook", Socket: "/s", Policy: "default_policy: deny\n"}
	for i := 0; i < 2; i++ {
		if err := Prepare(path, opts); err != nil {
			t.Fatal(err)
		}
	}
	var spec map[string]any
	b, _ := os.ReadFile(path)
	json.Unmarshal(b, &spec)
	if spec["x-vendor"] == nil {
		t.Error("unknown field dropped")
	}
	hooks := spec["hooks"].(map[string]any)
	if n := len(hooks["createRuntime"].([]any)); n != 1 {
		t.Errorf("%d createRuntime hooks after two runs", n)
	}
	post := hooks["poststop"].([]any)
	if len(post) != 2 || post[0].(map[string]any)["path"] != "/other" {
		t.Errorf("poststop hooks %v", post)
	}
	args := hooks["createRuntime"].([]any)[0].(map[string]any)["args"]
	if !reflect.DeepEqual(args, []any{"childflow-hook", "--socket", "/s", "createRuntime"}) {
		t.Errorf("hook args %v", args)
	}
	ann := spec["annotations"].(map[string]any)
	if ann["childflow.dev/policy"] != "default_policy: deny\n" || ann["io.example/a"] != "b" {
		t.Errorf("annotations %v", ann)
	}
	if st, _ := os.Stat(path); st.Mode().Perm() != 0o600 {
		t.Errorf("mode %v", st.Mode())
	}

	// A container with its own childflow annotation keeps it.
	os.WriteFile(path, []byte(`{"annotations":{"childflow.dev/offline":"true"}}`), 0o600)
	Prepare(path, opts)
	b, _ = os.ReadFile(path)
	if strings.Contains(string(b), "childflow.dev/policy") {
		t.Errorf("default policy overrode the container's own: %s", b)
	}

	// Opting out of the runtime's default is no way out: the container
	// does not start (the hook refuses the two together).
	os.WriteFile(path, []byte(`{"annotations":{"childflow.dev/enabled":"false"}}`), 0o600)
	Prepare(path, opts)
	b, _ = os.ReadFile(path)
	json.Unmarshal(b, &spec)
	if _, _, err := annotations.Parse(stringMap(spec["annotations"].(map[string]any))); err == nil {
		t.Errorf("enabled: false beside the default policy parses: %s", b)
	}
}
