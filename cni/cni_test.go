package cni

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/containernetworking/plugins/pkg/testutils"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/childflow/childflow/engine/api"
	"github.com/childflow/childflow/engine/daemon"
	"github.com/childflow/childflow/internal/attach"
	"github.com/childflow/childflow/internal/steer"
	"github.com/childflow/childflow/internal/tunns"
	"github.com/childflow/childflow/policy/annotations"
)

// node runs an in-process daemon for one test.
func node(t *testing.T) (socket, state string) {
	t.Helper()
	dir := t.TempDir()
	socket, state = filepath.Join(dir, "engine.sock"), filepath.Join(dir, "state")
	ctx, cancel := context.WithCancel(context.Background())
	ready, done := make(chan struct{}), make(chan error, 1)
	go func() {
		done <- daemon.Run(ctx, daemon.Config{Socket: socket, StateDir: state}, func() { close(ready) })
	}()
	select {
	case <-ready:
	case err := <-done:
		t.Fatal(err)
	}
	t.Cleanup(func() { cancel(); <-done })
	return socket, state
}

func conf(version, socket, state string, ann map[string]string, extra string) []byte {
	annJSON, _ := json.Marshal(ann)
	prev := `"prevResult": {"cniVersion": "` + version + `", "interfaces": [{"name": "eth0"}], "ips": [{"address": "10.99.0.5/24"` +
		map[bool]string{true: `, "version": "4"`, false: ""}[strings.HasPrefix(version, "0.3")] + `}]},`
	return []byte(fmt.Sprintf(`{"cniVersion": %q, "name": "test", "type": "childflow-cni", %s "socket": %q, "stateDir": %q,
		"runtimeConfig": {"io.kubernetes.cri.pod-annotations": %s} %s}`, version, prev, socket, state, annJSON, extra))
}

func hasLink(netns ns.NetNS, name string) bool {
	found := false
	netns.Do(func(ns.NetNS) error { _, err := netlink.LinkByName(name); found = err == nil; return nil })
	return found
}

var annotated = map[string]string{"childflow.dev/default-policy": "deny", "io.kubernetes.pod.name": "web"}

func TestAddCheckDelEveryVersion(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: netns and TUN")
	}
	socket, state := node(t)
	for _, v := range []string{"0.3.1", "0.4.0", "1.0.0", "1.1.0"} {
		t.Run(v, func(t *testing.T) {
			netns, err := testutils.NewNS()
			if err != nil {
				t.Fatal(err)
			}
			defer testutils.UnmountNS(netns)
			defer netns.Close()
			id := "pod" + strings.ReplaceAll(v, ".", "")
			args := &skel.CmdArgs{ContainerID: id, Netns: netns.Path(), IfName: "eth0",
				Args: "K8S_POD_NAMESPACE=team;K8S_POD_NAME=web", StdinData: conf(v, socket, state, annotated, "")}
			res, out, err := testutils.CmdAddWithArgs(args, func() error { return cmdAdd(args) })
			if err != nil {
				t.Fatalf("ADD: %v", err)
			}
			if res == nil || !strings.Contains(string(out), "10.99.0.5") {
				t.Errorf("ADD must return the previous result: %s", out)
			}
			if !hasLink(netns, "cf0") {
				t.Fatal("no cf0 after ADD")
			}
			st, err := api.Client{Socket: socket}.Status(id)
			if err != nil || st.Source != Source || st.Labels["pod_name"] != "web" || st.Labels["pod_namespace"] != "team" {
				t.Fatalf("daemon status %+v, %v", st, err)
			}
			if v != "0.3.1" {
				if err := testutils.CmdCheckWithArgs(args, func() error { return cmdCheck(args) }); err != nil {
					t.Errorf("CHECK: %v", err)
				}
			}
			for i := 0; i < 2; i++ {
				if err := testutils.CmdDelWithArgs(args, func() error { return cmdDel(args) }); err != nil {
					t.Fatalf("DEL #%d: %v", i+1, err)
				}
			}
			if hasLink(netns, "cf0") {
				t.Error("cf0 left after DEL")
			}
			if v != "0.3.1" {
				if err := testutils.CmdCheckWithArgs(args, func() error { return cmdCheck(args) }); err == nil {
					t.Error("CHECK passed after DEL")
				}
			}
		})
	}
}

func TestUnannotatedPassesThrough(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	netns, err := testutils.NewNS()
	if err != nil {
		t.Fatal(err)
	}
	defer testutils.UnmountNS(netns)
	defer netns.Close()
	// No daemon at all: a pod without annotations must not need one.
	args := &skel.CmdArgs{ContainerID: "plain", Netns: netns.Path(), IfName: "eth0",
		StdinData: conf("1.0.0", "/nonexistent.sock", t.TempDir(), map[string]string{"other": "x"}, "")}
	_, out, err := testutils.CmdAddWithArgs(args, func() error { return cmdAdd(args) })
	if err != nil || !strings.Contains(string(out), "10.99.0.5") || hasLink(netns, "cf0") {
		t.Fatalf("ADD of an unannotated pod: %v, %s", err, out)
	}
}

func TestBadAnnotationFailsAdd(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	socket, state := node(t)
	netns, err := testutils.NewNS()
	if err != nil {
		t.Fatal(err)
	}
	defer testutils.UnmountNS(netns)
	defer netns.Close()
	args := &skel.CmdArgs{ContainerID: "bad", Netns: netns.Path(), IfName: "eth0",
		StdinData: conf("1.0.0", socket, state, map[string]string{"childflow.dev/allow-domains": "exa!mple.com"}, "")}
	_, _, err = testutils.CmdAddWithArgs(args, func() error { return cmdAdd(args) })
	if err == nil || !strings.Contains(err.Error(), `childflow.dev/allow-domains "exa!mple.com"`) {
		t.Fatalf("ADD: %v", err)
	}
	if hasLink(netns, "cf0") {
		t.Error("a failed ADD left cf0")
	}
	args.StdinData = conf("1.0.0", socket, state, annotated, `, "clusterCIDRs": ["10.96.0.0/99"]`)
	if _, _, err = testutils.CmdAddWithArgs(args, func() error { return cmdAdd(args) }); err == nil || !strings.Contains(err.Error(), "clusterCIDRs") {
		t.Fatalf("bad clusterCIDRs: %v", err)
	}
}

func TestDelWithoutDaemonLeavesATombstone(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	state := t.TempDir()
	args := &skel.CmdArgs{ContainerID: "gone", Netns: "/var/run/netns/does-not-exist", IfName: "eth0",
		StdinData: conf("1.0.0", filepath.Join(state, "none.sock"), state, annotated, "")}
	if err := testutils.CmdDelWithArgs(args, func() error { return cmdDel(args) }); err != nil {
		t.Fatalf("DEL with nothing left: %v", err)
	}
	if _, err := os.Stat(filepath.Join(state, api.TombstoneDir, "gone")); err != nil {
		t.Errorf("no tombstone: %v", err)
	}
}

func TestGCAndStatus(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	socket, state := node(t)
	var keepID string
	var namespaces []ns.NetNS
	for _, id := range []string{"keep", "stale"} {
		netns, err := testutils.NewNS()
		if err != nil {
			t.Fatal(err)
		}
		namespaces = append(namespaces, netns)
		args := &skel.CmdArgs{ContainerID: id, Netns: netns.Path(), IfName: "eth0", StdinData: conf("1.1.0", socket, state, annotated, "")}
		if _, _, err := testutils.CmdAddWithArgs(args, func() error { return cmdAdd(args) }); err != nil {
			t.Fatal(err)
		}
		keepID = "keep"
	}
	// A container the OCI hook sandboxed and guarded on this node is no
	// CNI attachment: GC leaves it, and its guard.
	hooked := podNetns(t)
	settings, _, _ := annotations.Parse(annotated)
	if _, err := (attach.Node{Socket: socket, StateDir: state}).Attach(attach.Sandbox{ID: "hooked", Netns: hooked.Path(), Settings: settings, Source: "oci-hook"}); err != nil {
		t.Fatal(err)
	}
	guard, err := tunns.HostGuardOf(hooked.Path(), "eth0", "hooked", nil)
	guards := steer.Guards{Dir: state}
	if err == nil {
		err = guards.Install(guard)
	}
	if err != nil {
		t.Fatal(err)
	}
	defer guards.Remove("hooked")
	gc := &skel.CmdArgs{StdinData: conf("1.1.0", socket, state, nil, `, "cni.dev/valid-attachments": [{"containerID": "`+keepID+`", "ifname": "eth0"}]`)}
	if err := cmdGC(gc); err != nil {
		t.Fatal(err)
	}
	list, _ := api.Client{Socket: socket}.List()
	if len(list) != 2 || list[0].ID != "hooked" || list[1].ID != "keep" {
		t.Fatalf("after GC: %+v", list)
	}
	if ok, err := guards.Has("hooked"); !ok || err != nil {
		t.Errorf("GC removed the guard of a container the hook sandboxed: %v", err)
	}
	// Once that sandbox is gone, its guard is no one's.
	api.Client{Socket: socket}.Detach("hooked")
	if err := cmdGC(gc); err != nil {
		t.Fatal(err)
	}
	if ok, _ := guards.Has("hooked"); ok {
		t.Error("GC left the guard of a sandbox that is gone")
	}
	if err := cmdStatus(gc); err != nil {
		t.Errorf("STATUS with a daemon: %v", err)
	}
	down := &skel.CmdArgs{StdinData: conf("1.1.0", "/nonexistent.sock", state, nil, "")}
	if err := cmdStatus(down); err == nil || !strings.Contains(err.Error(), "not reachable") {
		t.Errorf("STATUS without a daemon: %v", err)
	}
	// The runtime removes a pod's pinned namespace, also one whose DEL
	// never came ("keep" is still attached): the daemon's hold on it
	// must not keep the bind mount busy.
	for _, netns := range namespaces {
		netns.Close() // the test's own hold
		if err := testutils.UnmountNS(netns); err != nil {
			t.Errorf("removing a pod's namespace: %v", err)
		}
	}
}

// podNetns is a netns with eth0 (a veth whose peer is on the host) at
// 10.99.0.5/24 and a default route via 10.99.0.1, as a bridge
// plugin leaves it.
func podNetns(t *testing.T) ns.NetNS {
	t.Helper()
	pod, err := testutils.NewNS()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		pod.Close()
		// Lazily: a veth into the namespace can keep the mount busy for a
		// moment.
		unix.Unmount(pod.Path(), unix.MNT_DETACH)
		os.Remove(pod.Path())
	})
	// The host end stays in the test's (host) namespace, as a bridge
	// plugin leaves it; the host guard is installed on it.
	hostName := fmt.Sprintf("cfp%d", time.Now().UnixNano()%1e9)
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: hostName}, PeerName: "cfpeer0"}
	if err := netlink.LinkAdd(veth); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if l, err := netlink.LinkByName(hostName); err == nil {
			netlink.LinkDel(l)
		}
	})
	p, _ := netlink.LinkByName("cfpeer0")
	if err := netlink.LinkSetNsFd(p, int(pod.Fd())); err != nil {
		t.Fatal(err)
	}
	err = pod.Do(func(ns.NetNS) error {
		eth, _ := netlink.LinkByName("cfpeer0")
		netlink.LinkSetName(eth, "eth0")
		eth, _ = netlink.LinkByName("eth0")
		addr, _ := netlink.ParseAddr("10.99.0.5/24")
		netlink.AddrAdd(eth, addr)
		netlink.LinkSetUp(eth)
		_, dflt, _ := net.ParseCIDR("0.0.0.0/0")
		return netlink.RouteAdd(&netlink.Route{LinkIndex: eth.Attrs().Index, Dst: dflt, Gw: net.ParseIP("10.99.0.1")})
	})
	if err != nil {
		t.Fatal(err)
	}
	return pod
}

func routeDev(t *testing.T, netns ns.NetNS, dst string) string {
	t.Helper()
	dev := ""
	netns.Do(func(ns.NetNS) error {
		routes, err := netlink.RouteGet(net.ParseIP(dst))
		if err == nil && len(routes) > 0 {
			if l, err := netlink.LinkByIndex(routes[0].LinkIndex); err == nil {
				dev = l.Attrs().Name
			}
		}
		return nil
	})
	return dev
}

func TestClusterRangesStayOnTheMainInterface(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	socket, state := node(t)
	for _, tc := range []struct {
		name  string
		extra string
		// where 10.96.0.10 (a service), 10.99.0.7 (a pod on the same
		// bridge) and 203.0.113.10 (outside) are routed
		svc, neighbour, outside string
	}{
		{"cluster ranges kept", `, "clusterCIDRs": ["10.96.0.0/12", "10.99.0.0/16"]`, "eth0", "eth0", "cf0"},
		{"all through the engine", `, "clusterCIDRs": ["10.96.0.0/12"], "allThroughEngine": true`, "cf0", "cf0", "cf0"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			pod := podNetns(t)
			args := &skel.CmdArgs{ContainerID: "kept", Netns: pod.Path(), IfName: "eth0", StdinData: conf("1.0.0", socket, state, annotated, tc.extra)}
			if _, _, err := testutils.CmdAddWithArgs(args, func() error { return cmdAdd(args) }); err != nil {
				t.Fatal(err)
			}
			guard, _ := exec.Command("nft", "list", "chain", "inet", "childflow-guard", "addr-kept").CombinedOutput()
			if !strings.Contains(string(guard), "drop") || (tc.svc == "eth0") != strings.Contains(string(guard), "ip daddr 10.96.0.0/12 accept") {
				t.Errorf("host guard on the pod's veth:\n%s", guard)
			}
			if err := testutils.CmdCheckWithArgs(args, func() error { return cmdCheck(args) }); err != nil {
				t.Errorf("CHECK: %v", err)
			}
			// Its record first, so that the daemon cannot put it back.
			if err := os.Remove(filepath.Join(state, "guards", "kept.json")); err != nil {
				t.Fatal(err)
			}
			exec.Command("nft", "delete", "table", "inet", "childflow-guard").Run()
			if err := testutils.CmdCheckWithArgs(args, func() error { return cmdCheck(args) }); err == nil || !strings.Contains(err.Error(), "childflow-guard") {
				t.Errorf("CHECK without the host guard: %v", err)
			}
			for dst, want := range map[string]string{"10.96.0.10": tc.svc, "10.99.0.7": tc.neighbour, "203.0.113.10": tc.outside} {
				if got := routeDev(t, pod, dst); got != want {
					t.Errorf("%s is routed through %q, want %q", dst, got, want)
				}
			}
			if err := testutils.CmdDelWithArgs(args, func() error { return cmdDel(args) }); err != nil {
				t.Fatal(err)
			}
			if out, err := exec.Command("nft", "list", "table", "inet", "childflow-guard").CombinedOutput(); err == nil {
				t.Errorf("host guard left after DEL:\n%s", out)
			}
			if got := routeDev(t, pod, "203.0.113.10"); got != "eth0" {
				t.Errorf("after DEL the default route is through %q, want eth0 again", got)
			}
			pod.Do(func(ns.NetNS) error {
				routes, _ := netlink.RouteList(nil, netlink.FAMILY_ALL)
				for _, r := range routes {
					if r.Protocol == 87 {
						t.Errorf("route left by childflow after DEL: %s", r)
					}
				}
				return nil
			})
		})
	}
}
