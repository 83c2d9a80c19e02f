package daemon

import (
	"context"
	"io"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"github.com/vishvananda/netlink"

	"github.com/childflow/childflow/engine/api"
	"github.com/childflow/childflow/internal/netplan"
	"github.com/childflow/childflow/internal/steer"
	"github.com/childflow/childflow/internal/tunns"
	"github.com/childflow/childflow/policy/profile"
)

// start runs a daemon until the returned stop is called.
func start(t *testing.T, cfg Config) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	ready := make(chan struct{})
	done := make(chan error, 1)
	go func() { done <- Run(ctx, cfg, func() { close(ready) }) }()
	select {
	case <-ready:
	case err := <-done:
		t.Fatalf("daemon: %v", err)
	}
	return func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("daemon: %v", err)
		}
	}
}

func linkIn(t *testing.T, netns ns.NetNS, name string) bool {
	found := false
	netns.Do(func(ns.NetNS) error {
		_, err := netlink.LinkByName(name)
		found = err == nil
		return nil
	})
	return found
}

func TestAttachRestartReadoptDetach(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates a netns and a TUN")
	}
	netns, err := testutils.NewNS()
	if err != nil {
		t.Fatal(err)
	}
	defer testutils.UnmountNS(netns)
	defer netns.Close()

	dir := t.TempDir()
	cfg := Config{Socket: filepath.Join(dir, "engine.sock"), StateDir: filepath.Join(dir, "state"),
		FlowLogDir: filepath.Join(dir, "flows"), MetricsAddr: "127.0.0.1:0"}
	stop := start(t, cfg)
	client := api.Client{Socket: cfg.Socket}

	plan, _ := netplan.Choose(nil, 0)
	link, _, err := tunns.CreateIn(netns.Path(), plan, nil)
	if err != nil {
		t.Fatal(err)
	}
	ino, _ := tunns.NetnsInode(netns.Path())
	deny := "deny"
	a := &api.Attachment{ID: "t1", Netns: netns.Path(), NetnsInode: ino, Plan: plan, Settings: &profile.Profile{DefaultPolicy: &deny}}
	if err := client.Attach(a, link); err != nil {
		t.Fatal(err)
	}
	link.Close()

	bad := *a
	bad.ID = "t2"
	bad.Settings = &profile.Profile{AllowCIDRs: &profile.StringList{"10.0.0.0/99"}}
	if err := client.Attach(&bad, mustOpen(t)); err == nil || !strings.Contains(err.Error(), "setting allow_cidrs") {
		t.Fatalf("bad settings: %v", err)
	}
	self, _ := tunns.NetnsInode("/proc/self/ns/net")
	host := *a
	host.ID, host.Netns, host.NetnsInode = "t3", "/proc/self/ns/net", self
	if err := client.Attach(&host, mustOpen(t)); err == nil {
		t.Fatal("the daemon accepted its own netns as a sandbox")
	}

	list, err := client.List()
	if err != nil || len(list) != 1 || list[0].ID != "t1" || list[0].Adopted {
		t.Fatalf("list %+v, %v", list, err)
	}
	stop()
	if !linkIn(t, netns, plan.Interface) {
		t.Fatal("the TUN did not survive the daemon")
	}
	if _, err := os.Stat(filepath.Join(cfg.StateDir, "sandboxes", "t1.json")); err != nil {
		t.Fatalf("record: %v", err)
	}

	cfg.MetricsAddr = "127.0.0.1:19187"
	stop = start(t, cfg)
	defer stop()
	list, _ = client.List()
	if len(list) != 1 || !list[0].Adopted {
		t.Fatalf("after restart: %+v", list)
	}
	// Another container in the namespace joins the sandbox with the same
	// settings (those of the record, here), not with others, and its
	// detach leaves the sandbox alone.
	same := *a
	same.ID, same.Settings = "t4", &profile.Profile{DefaultPolicy: &deny}
	if st, err := client.Join(&same); err != nil || st.ID != "t1" {
		t.Fatalf("join with the same settings: %+v, %v", st, err)
	}
	other := same
	other.Settings = &profile.Profile{}
	if _, err := client.Join(&other); err == nil || !strings.Contains(err.Error(), "another policy") {
		t.Errorf("join with other settings: %v", err)
	}
	nowhere := same
	nowhere.NetnsInode = self
	if _, err := client.Join(&nowhere); err == nil || !strings.Contains(err.Error(), "no sandbox") {
		t.Errorf("join where no sandbox is: %v", err)
	}
	if err := client.Detach("t4"); err != nil {
		t.Fatal(err)
	}
	if list, _ = client.List(); len(list) != 1 || list[0].ID != "t1" {
		t.Fatalf("after the joined container's detach: %+v", list)
	}
	resp, err := http.Get("http://127.0.0.1:19187/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if ct := resp.Header.Get("Content-Type"); resp.StatusCode != 200 || ct != metricsContentType {
		t.Errorf("metrics: status %d, content type %q", resp.StatusCode, ct)
	}
	for _, want := range []string{"childflow_sandboxes 1", `childflow_flows_total{namespace="",pod="",sandbox="t1",verdict="deny"} 0`} {
		if !strings.Contains(string(body), want) {
			t.Errorf("metrics lack %q:\n%s", want, body)
		}
	}
	if err := client.Detach("t1"); err != nil {
		t.Fatal(err)
	}
	if err := client.Detach("t1"); err != nil {
		t.Fatalf("second detach: %v", err)
	}
	if linkIn(t, netns, plan.Interface) {
		t.Error("detach left the TUN")
	}
	if entries, _ := os.ReadDir(filepath.Join(cfg.StateDir, "sandboxes")); len(entries) != 0 {
		t.Errorf("detach left records: %v", entries)
	}
}

func TestRecordOfAGoneNetnsIsDropped(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	dir := t.TempDir()
	cfg := Config{Socket: filepath.Join(dir, "engine.sock"), StateDir: filepath.Join(dir, "state")}
	os.MkdirAll(filepath.Join(cfg.StateDir, "sandboxes"), 0o700)
	d := &Daemon{cfg: cfg}
	if err := d.writeRecord(api.Attachment{ID: "gone", Netns: "/proc/999999999/ns/net", NetnsInode: 1}); err != nil {
		t.Fatal(err)
	}
	stop := start(t, cfg)
	defer stop()
	time.Sleep(10 * time.Millisecond)
	if entries, _ := os.ReadDir(filepath.Join(cfg.StateDir, "sandboxes")); len(entries) != 0 {
		t.Errorf("records left: %v", entries)
	}
}

func mustOpen(t *testing.T) *os.File {
	f, err := os.Open("/dev/null")
	if err != nil {
		t.Fatal(err)
	}
	return f
}

func TestCleanup(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	netns, err := testutils.NewNS()
	if err != nil {
		t.Fatal(err)
	}
	defer testutils.UnmountNS(netns)
	defer netns.Close()
	dir := t.TempDir()
	cfg := Config{Socket: filepath.Join(dir, "engine.sock"), StateDir: filepath.Join(dir, "state")}
	os.MkdirAll(filepath.Join(cfg.StateDir, "sandboxes"), 0o700)
	os.MkdirAll(filepath.Join(cfg.StateDir, api.TombstoneDir), 0o700)
	os.WriteFile(filepath.Join(cfg.StateDir, api.TombstoneDir, "x"), nil, 0o600)
	d := &Daemon{cfg: cfg}
	ino, _ := tunns.NetnsInode(netns.Path())
	d.writeRecord(api.Attachment{ID: "live", Netns: netns.Path(), NetnsInode: ino})
	d.writeRecord(api.Attachment{ID: "dead", Netns: "/proc/999999999/ns/net", NetnsInode: 1})

	r, err := Cleanup(cfg.StateDir)
	if err != nil || len(r.Removed) != 1 || r.Removed[0] != "dead" || len(r.Live) != 1 || r.Tombstones != 1 {
		t.Fatalf("cleanup %+v, %v", r, err)
	}
	if _, err := os.Stat(filepath.Join(cfg.StateDir, "sandboxes", "live.json")); err != nil {
		t.Error("the live sandbox's record was removed")
	}
	// Not while a daemon runs on the directory.
	lock, _ := lockFile(filepath.Join(cfg.StateDir, "daemon.lock"))
	defer lock.Close()
	if _, err := Cleanup(cfg.StateDir); err == nil {
		t.Error("cleanup ran under a live daemon")
	}
}

// The daemon removes a socket an earlier one left, never another file at
// the socket's path.
func TestSocketPathThatIsNoSocketIsLeftAlone(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	dir := t.TempDir()
	cfg := Config{Socket: filepath.Join(dir, "passwd"), StateDir: filepath.Join(dir, "state")}
	os.WriteFile(cfg.Socket, []byte("root:x:0:0::/root:/bin/sh\n"), 0o644)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := Run(ctx, cfg, func() { t.Error("the daemon served") }); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Errorf("Run: %v, want an error saying the path is not a socket", err)
	}
	if b, _ := os.ReadFile(cfg.Socket); string(b) != "root:x:0:0::/root:/bin/sh\n" {
		t.Errorf("the file at the socket's path now holds %q", b)
	}
}

// The host guard the hook installed for a sandbox whose namespace went
// without a poststop (and the daemon with it) goes with its record; a
// live sandbox's stays. In a namespace of the test's own, as the node.
func TestCleanupRemovesTheGuardsOfGoneSandboxes(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	node, err := testutils.NewNS()
	if err != nil {
		t.Fatal(err)
	}
	defer testutils.UnmountNS(node)
	defer node.Close()
	state := filepath.Join(t.TempDir(), "state")
	os.MkdirAll(filepath.Join(state, "sandboxes"), 0o700)
	d := &Daemon{cfg: Config{StateDir: state}}
	ino, _ := tunns.NetnsInode(node.Path())
	d.writeRecord(api.Attachment{ID: "live", Netns: node.Path(), NetnsInode: ino})
	d.writeRecord(api.Attachment{ID: "dead", Netns: "/proc/999999999/ns/net", NetnsInode: 1})
	guards := steer.Guards{Dir: state}
	err = node.Do(func(ns.NetNS) error {
		for i, id := range []string{"live", "dead"} {
			veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "cf-" + id}, PeerName: "cf-" + id + "-pod"}
			if err := netlink.LinkAdd(veth); err != nil {
				return err
			}
			pod := netip.AddrFrom4([4]byte{10, 1, 2, byte(i + 2)})
			if err := guards.Install(steer.HostGuard{ID: id, HostIf: veth.Name, Pod: []netip.Addr{pod}}); err != nil {
				return err
			}
		}
		r, err := Cleanup(state)
		if err != nil || len(r.Removed) != 1 || r.Removed[0] != "dead" {
			t.Errorf("cleanup %+v, %v", r, err)
		}
		for id, want := range map[string]bool{"live": true, "dead": false} {
			has, err := guards.Has(id)
			if err != nil || has != want || guards.Recorded(id) != want {
				t.Errorf("guard of %s: in nftables %v, recorded %v, want %v (%v)", id, has, guards.Recorded(id), want, err)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestSameSettingsReadsRuleListsAsSets: a container joins a sandbox
// whose policy lists the same rules in another order, or one twice; the
// order of resolvers is a setting of its own.
func TestSameSettingsComparesPolicies(t *testing.T) {
	list := func(items ...string) *profile.StringList { l := profile.StringList(items); return &l }
	deny, allow, off := "deny", "allow", false
	for _, c := range []struct {
		name string
		a, b profile.Profile
		same bool
	}{
		{"rules in another order", profile.Profile{DefaultPolicy: &deny, AllowCIDRs: list("203.0.113.10/32", "2001:db8::/32"), AllowDomains: list("b.test", "a.test")},
			profile.Profile{DefaultPolicy: &deny, AllowCIDRs: list("2001:db8::/32", "203.0.113.10/32"), AllowDomains: list("a.test", "b.test")}, true},
		{"a rule twice", profile.Profile{DenyDomainsExact: list("a.test", "a.test")}, profile.Profile{DenyDomainsExact: list("a.test")}, true},
		{"other rules", profile.Profile{AllowCIDRs: list("203.0.113.10/32")}, profile.Profile{AllowCIDRs: list("203.0.113.20/32")}, false},
		{"a rule more", profile.Profile{AllowDomains: list("a.test")}, profile.Profile{AllowDomains: list("a.test", "b.test")}, false},
		{"resolvers in another order", profile.Profile{DNS: list("203.0.113.53", "203.0.113.54")}, profile.Profile{DNS: list("203.0.113.54", "203.0.113.53")}, false},
		{"another default", profile.Profile{DefaultPolicy: &deny}, profile.Profile{}, false},
		{"rules in other forms", profile.Profile{DefaultPolicy: &deny, AllowCIDRs: list("203.0.113.10", "2001:DB8::1/32", "::ffff:203.0.113.0/120"), DenyDomains: list("A.Test.")},
			profile.Profile{DefaultPolicy: new("Deny"), AllowCIDRs: list("203.0.113.10/32", "2001:db8::/32", "203.0.113.0/24"), DenyDomains: list("a.test")}, true},
		{"a resolver without its port", profile.Profile{DNS: list("203.0.113.53", "[2001:db8::53]:53")}, profile.Profile{DNS: list("203.0.113.53:53", "2001:db8::53")}, true},
		{"the default written out", profile.Profile{DefaultPolicy: &allow, Offline: &off, AllowCIDRs: list()}, profile.Profile{}, true},
		{"another port", profile.Profile{DNS: list("203.0.113.53")}, profile.Profile{DNS: list("203.0.113.53:5353")}, false},
		{"another prefix length", profile.Profile{AllowCIDRs: list("203.0.113.10")}, profile.Profile{AllowCIDRs: list("203.0.113.0/24")}, false},
	} {
		if got := sameSettings(&c.a, &c.b); got != c.same {
			t.Errorf("%s: same %v, want %v", c.name, got, c.same)
		}
	}
	rules := list("b.test", "a.test")
	p := profile.Profile{AllowDomains: rules}
	sameSettings(&p, &p)
	if (*rules)[0] != "b.test" {
		t.Error("comparing sorted the settings themselves")
	}
}
