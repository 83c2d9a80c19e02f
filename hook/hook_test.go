package hook

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
)

func TestHook(t *testing.T) {
	for _, tc := range []struct {
		name, stage, state string
		code               int
		stderr             string
	}{
		{"unannotated is untouched", "createRuntime", `{"ociVersion":"1.0.2","id":"c1","status":"creating","pid":1,"bundle":"/nonexistent"}`, 0, ""},
		{"other annotations only", "createRuntime", `{"id":"c1","pid":1,"annotations":{"io.kubernetes.cri.sandbox-id":"x"}}`, 0, ""},
		{"enabled false", "poststop", `{"id":"c1","annotations":{"childflow.dev/enabled":"false"}}`, 0, ""},
		{"bad annotation fails closed", "createRuntime", `{"id":"c1","pid":1,"annotations":{"childflow.dev/deny-cidrs":"nope"}}`, 2, `container c1: invalid annotation childflow.dev/deny-cidrs "nope"`},
		{"bad id", "createRuntime", `{"id":"../../etc","pid":1,"annotations":{"childflow.dev/offline":"true"}}`, 2, "invalid sandbox id"},
		{"no state", "createRuntime", `garbage`, 1, "reading the container state"},
		{"unknown stage", "prestop", `{"id":"c1","annotations":{"childflow.dev/offline":"true"}}`, 2, `unknown hook stage "prestop"`},
		{"unknown stage, unannotated", "createruntime", `{"id":"c1","pid":1}`, 2, `unknown hook stage "createruntime"`},
		{"a stage with nothing to do", "poststart", `{"id":"c1","annotations":{"childflow.dev/offline":"true"}}`, 0, ""},
	} {
		var stderr bytes.Buffer
		code := Run(context.Background(), []string{"childflow-hook", "--socket", "/nonexistent.sock", tc.stage}, strings.NewReader(tc.state), &stderr)
		if code != tc.code || !strings.Contains(stderr.String(), tc.stderr) {
			t.Errorf("%s: exit %d, stderr %q; want %d and %q", tc.name, code, stderr.String(), tc.code, tc.stderr)
		}
	}
}

// TestHookHelp: --help says how the hook is called and what it does.
func TestHookHelp(t *testing.T) {
	var stderr bytes.Buffer
	code := Run(context.Background(), []string{"childflow-hook", "--help"}, strings.NewReader(""), &stderr)
	if code != 0 || !strings.HasPrefix(stderr.String(), "Usage: childflow-hook [OPTIONS] createRuntime|prestart|poststop\n") ||
		!strings.Contains(stderr.String(), "--socket string") {
		t.Errorf("exit %d, output %q", code, stderr.String())
	}
}

// The hosts file the hook hands on is what the container sees at
// /etc/hosts, and nothing the hook, as root, could be pointed at instead.
func TestContainerHostsFile(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		os.MkdirAll(filepath.Dir(p), 0o755)
		if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	mounted := write("hosts", "203.0.113.10 mounted.test\n")
	write("rootfs/etc/hosts", "203.0.113.10 image.test\n")
	secret := write("host-secret", "203.0.113.66 secret.test\n")
	os.MkdirAll(filepath.Join(dir, "escape/etc"), 0o755)
	os.Symlink(secret, filepath.Join(dir, "escape/etc/hosts"))
	fifo := filepath.Join(dir, "fifo")
	if err := unix.Mkfifo(fifo, 0o644); err != nil {
		t.Fatal(err)
	}
	bind := func(src string) []specs.Mount {
		return []specs.Mount{{Destination: "/etc/hosts", Type: "bind", Source: src, Options: []string{"rbind", "ro"}}}
	}
	for _, c := range []struct {
		name   string
		root   string
		mounts []specs.Mount
		want   string
	}{
		{"bind mount", "rootfs", bind(mounted), "mounted.test"},
		{"the last mount wins", "rootfs", append(bind(secret), bind(mounted)...), "mounted.test"},
		{"the image's", "rootfs", nil, "image.test"},
		{"a symlink stays in the rootfs", "escape", nil, ""},
		{"a device", "rootfs", bind("/dev/zero"), ""},
		{"a fifo", "rootfs", bind(fifo), ""},
		{"not a bind mount", "rootfs", []specs.Mount{{Destination: "/etc/hosts", Type: "tmpfs", Source: "tmpfs"}}, ""},
	} {
		t.Run(c.name, func(t *testing.T) {
			cfg := &bundleConfig{path: dir, Root: specs.Root{Path: c.root}, Mounts: c.mounts}
			done := make(chan string, 1)
			go func() { done <- cfg.hosts() }()
			select {
			case got := <-done:
				if !strings.Contains(got, c.want) || c.want == "" && got != "" {
					t.Fatalf("hosts %q, want one naming %q", got, c.want)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("reading the hosts file hangs")
			}
		})
	}
}
