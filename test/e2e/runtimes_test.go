//go:build e2e

package e2e

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// dockerd is a docker daemon of the test's own (data root, socket, no
// iptables) with childflow-runtime registered twice: "childflow" gives
// every container a default policy, "childflow-plain" only adds the hook.
type dockerd struct {
	sock string
	cmd  *exec.Cmd
	log  *bytes.Buffer
}

func startDockerd(t *testing.T, n *node) *dockerd {
	t.Helper()
	dir := t.TempDir()
	policyFile := filepath.Join(dir, "policy.yaml")
	os.WriteFile(policyFile, []byte("default_policy: deny\nallow_cidrs: [203.0.113.10/32]\n"), 0o644)
	runtime := filepath.Join(filepath.Dir(bin), "childflow-runtime")
	args := []string{"--childflow-socket=" + n.socket, "--childflow-state-dir=" + n.state}
	cfg := map[string]any{
		"runtimes": map[string]any{
			"childflow":       map[string]any{"path": runtime, "runtimeArgs": append(args, "--childflow-policy="+policyFile)},
			"childflow-plain": map[string]any{"path": runtime, "runtimeArgs": args},
		},
		"iptables":       false,
		"storage-driver": "vfs",
	}
	b, _ := json.Marshal(cfg)
	os.WriteFile(filepath.Join(dir, "daemon.json"), b, 0o644)
	d := &dockerd{sock: filepath.Join(dir, "docker.sock"), log: &bytes.Buffer{}}
	d.cmd = exec.Command("dockerd", "--config-file", filepath.Join(dir, "daemon.json"), "--data-root", filepath.Join(dir, "data"),
		"--exec-root", filepath.Join(dir, "exec"), "-H", "unix://"+d.sock, "--pidfile", filepath.Join(dir, "docker.pid"))
	d.cmd.Stdout, d.cmd.Stderr = d.log, d.log
	// What dockerd and its containerd leave in TMPDIR goes with the test
	// (containerd's stack dump, at dockerd's SIGUSR1 when its health
	// check fails under load).
	d.cmd.Env = append(os.Environ(), "TMPDIR="+dir)
	leaveRunAsFound(t, "/run/docker", "/run/containerd")
	leaveCgroupsAsFound(t, "docker")
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		// A test that failed midway leaves its networks, whose bridges
		// dockerd keeps on the host when it exits.
		networks := d.run(t, "network", "ls", "-q", "--filter", "type=custom").stdout
		d.cmd.Process.Signal(os.Interrupt)
		d.cmd.Wait()
		exec.Command("ip", "link", "del", "docker0").Run()
		for _, id := range strings.Fields(networks) {
			exec.Command("ip", "link", "del", "br-"+id).Run()
		}
		// dockerd leaves its mount of the host's namespace (for
		// --network host) in its exec root when it exits.
		mounts, _ := filepath.Glob(filepath.Join(dir, "exec", "netns", "*"))
		for _, m := range mounts {
			unix.Unmount(m, unix.MNT_DETACH)
		}
	})
	eventually(t, "dockerd to answer", func() bool { return d.run(t, "version").code == 0 })
	root := t.TempDir()
	rootfs(t, root)
	imp := exec.Command("sh", "-c", `tar -C "$1" -c . | docker -H "unix://$2" import - bb:latest`, "sh", root, d.sock)
	if out, err := imp.CombinedOutput(); err != nil {
		t.Fatalf("docker import: %v\n%s", err, out)
	}
	return d
}

func (d *dockerd) run(t *testing.T, args ...string) result {
	t.Helper()
	return execute(t, append([]string{"docker", "-H", "unix://" + d.sock}, args...)...)
}

// background runs a container detached under runtime and returns its
// id, its pid and its address on docker's default bridge.
func (d *dockerd) background(t *testing.T, runtime string, args ...string) (id string, pid int, ip string) {
	t.Helper()
	r := d.run(t, append([]string{"run", "-d", "--runtime", runtime}, args...)...)
	if r.code != 0 {
		t.Fatalf("%v\ndockerd:\n%s", r, d.log)
	}
	id = strings.TrimSpace(r.stdout)
	fmt.Sscan(d.run(t, "inspect", "-f", "{{.State.Pid}}", id).stdout, &pid)
	return id, pid, strings.TrimSpace(d.run(t, "inspect", "-f", "{{.NetworkSettings.IPAddress}}", id).stdout)
}

// hostNetfilter is what a sandbox must never change on the host.
func hostNetfilter(t *testing.T) string {
	t.Helper()
	nft, _ := exec.Command("nft", "list", "ruleset").CombinedOutput()
	rules, _ := exec.Command("ip", "rule").CombinedOutput()
	rules6, _ := exec.Command("ip", "-6", "rule").CombinedOutput()
	return string(nft) + string(rules) + string(rules6)
}

// netfilterAsFound checks the host's nftables and ip rules against
// before (hostNetfilter at the test's start).
func netfilterAsFound(t *testing.T, before string) {
	t.Helper()
	if after := hostNetfilter(t); after != before {
		t.Errorf("the host's nftables or ip rules changed:\nbefore:\n%s\nafter:\n%s", before, after)
	}
}

func TestDockerThroughTheRuntimeWrapper(t *testing.T) {
	n := startNode(t)
	before := hostNetfilter(t)
	d := startDockerd(t, n)

	// Docker's default capabilities include NET_RAW: beside eth0, a raw
	// packet socket could send around the sandbox. The hook guards the
	// container's end of docker's bridge from the host, as childflow-cni
	// guards a pod's: the container runs, and its raw frames go nowhere.
	// Without childflow's policy the same frame gets its echo: the probe
	// sees an escape.
	guarded, pid, guardedIP := d.background(t, "childflow", "bb:latest", "sleep", "1000000")
	if out := rawFrameVia(t, "docker0", pid, guardedIP); out != "contained" {
		t.Errorf("a raw frame from a sandboxed container keeping NET_RAW: %s", out)
	}
	plain, pid, plainIP := d.background(t, "childflow-plain", "bb:latest", "sleep", "1000000")
	if out := rawFrameVia(t, "docker0", pid, plainIP); out != "escaped" {
		t.Errorf("a raw frame from an unsandboxed container: %s", out)
	}
	d.run(t, "rm", "-f", plain)

	// Docker's bridge gives the container eth0: new connections must go
	// through cf0 and the policy, the host behind the bridge included.
	r := d.run(t, "run", "--rm", "--runtime", "childflow", "--cap-drop", "NET_RAW", "bb:latest", "sh", "-c", probe+`
nc -w 2 172.17.0.1 22 </dev/null && echo reach-bridge-host || echo blocked-bridge-host`)
	if r.code != 0 {
		t.Fatalf("%v\ndockerd:\n%s", r, d.log)
	}
	wantLines(t, r.stdout, "reach 203.0.113.10", "blocked 203.0.113.20", "blocked 2001:db8::20", "has-cf0", "blocked-bridge-host")

	// Inbound through the bridge still works: replies leave by eth0.
	id, pid, ip := d.background(t, "childflow", "--cap-drop", "NET_RAW", "bb:latest", "sh", "-c", `while true; do echo "hi from inside" | nc -l -p 8080; done`)
	var got string
	for i := 0; i < 20 && !strings.Contains(got, "hi from inside"); i++ {
		if c, err := net.DialTimeout("tcp", ip+":8080", 2*time.Second); err == nil {
			c.SetDeadline(time.Now().Add(3 * time.Second))
			b := make([]byte, 64)
			k, _ := c.Read(b)
			got = string(b[:k])
			c.Close()
		} else {
			time.Sleep(200 * time.Millisecond)
		}
	}
	if !strings.Contains(got, "hi from inside") {
		t.Errorf("inbound connection to %s:8080 through docker's bridge got %q", ip, got)
	}
	// Dropping NET_RAW does not leave the veth unguarded: a container
	// run later in this network may keep it, or NET_ADMIN, with or
	// without the hook.
	if out := rawFrameVia(t, "docker0", pid, ip); out != "contained" {
		t.Errorf("a raw frame from the namespace of a sandboxed container that dropped NET_RAW: %s", out)
	}
	if l := n.sandboxes(t); len(l) != 2 {
		t.Errorf("sandboxes while two containers run: %v", l)
	}
	// A container run in its network (--network container:, compose's
	// network_mode: service:) gets the runtime's policy too: it joins
	// the sandbox there, NET_RAW kept or not, since the veth is guarded.
	// Under docker's own runtime, no hook, it shares the sandbox's
	// routes and guard all the same.
	for _, args := range [][]string{{"--runtime", "childflow", "--cap-drop", "NET_RAW"}, {"--runtime", "childflow"}, {}} {
		r = d.run(t, append(append([]string{"run", "--rm"}, args...), "--network", "container:"+id, "bb:latest", "sh", "-c", probe)...)
		if r.code != 0 {
			t.Errorf("a container (%v) in the sandboxed container's network: %v", args, r)
		}
		wantLines(t, r.stdout, "reach 203.0.113.10", "blocked 203.0.113.20", "blocked 2001:db8::20", "has-cf0")
	}
	if l := n.sandboxes(t); len(l) != 2 {
		t.Errorf("sandboxes once containers joined them: %v", l)
	}
	// A container left in its network once it stopped keeps the
	// sandbox, which lingers until that one stops too.
	r = d.run(t, "run", "-d", "--network", "container:"+id, "bb:latest", "sleep", "1000000")
	if r.code != 0 {
		t.Fatalf("a container left in the sandboxed container's network: %v", r)
	}
	left := strings.TrimSpace(r.stdout)
	if r = d.run(t, "stop", "-t", "1", id); r.code != 0 {
		t.Fatalf("stopping the sandboxed container: %v", r)
	}
	eventually(t, "the sandbox to linger", func() bool { return n.sandbox(t, id)["lingering"] == true })
	r = d.run(t, "exec", left, "sh", "-c", probe) // docker took eth0: cf0 is all it has
	wantLines(t, r.stdout, "reach 203.0.113.10", "blocked 203.0.113.20", "blocked 2001:db8::20", "has-cf0")
	d.run(t, "rm", "-f", left, id, guarded)

	// The host's network is no sandbox's.
	r = d.run(t, "run", "--rm", "--runtime", "childflow", "--network", "host", "bb:latest", "echo", "RAN")
	if r.code == 0 || strings.Contains(r.stdout, "RAN") || !strings.Contains(r.stderr, "shares the host's network namespace") {
		t.Errorf("a container in the host's network: %v", r)
	}

	// Only the hook, no policy, no annotation: the container is untouched.
	r = d.run(t, "run", "--rm", "--runtime", "childflow-plain", "bb:latest", "sh", "-c", "ip -o link | grep -q cf0 && echo has-cf0 || echo no-cf0")
	wantLines(t, r.stdout, "no-cf0")

	n.waitDetached(t)
	netfilterAsFound(t, before)
}

// Compose puts containers on networks of their own. There docker's
// resolver in the container (127.0.0.11) names the other containers, and
// asks the container's --dns from inside its namespace for the rest: that
// query meets the sandbox's DNS redirect, so the engine decides it
// (docker 20.10; one that asked from the host's namespace would go around
// the policy, and the dnsmasq log would show it). On two networks, each
// of a container's veths is guarded.
func TestDockerNetworksOfTheirOwn(t *testing.T) {
	n := startNode(t)
	before := hostNetfilter(t)
	d := startDockerd(t, n)
	d.run(t, "network", "create", "proj")
	db, _, _ := d.background(t, "childflow-plain", "--network", "proj", "--name", "db", "bb:latest", "sleep", "1000000")
	dbIP := strings.TrimSpace(d.run(t, "inspect", "-f", "{{.NetworkSettings.Networks.proj.IPAddress}}", db).stdout)
	// ask looks db up and asks docker's resolver for name; it returns
	// what nslookup said and whether dnsmasq was asked for name from
	// the container's address.
	ask := func(runtime, name string) (string, bool) {
		t.Helper()
		r := d.run(t, "run", "--rm", "--runtime", runtime, "--network", "proj", "--dns", "203.0.113.53", "bb:latest",
			"sh", "-c", "nslookup db; nslookup "+name+" 127.0.0.11; echo ip=$(hostname -i)")
		_, ip, _ := strings.Cut(r.stdout, "ip=")
		if net.ParseIP(strings.TrimSpace(ip)) == nil {
			t.Fatalf("a container on a user-defined network: %v", r)
		}
		dnsmasq, _ := os.ReadFile(filepath.Join(proxyLogDir, "dnsmasq.log"))
		return r.stdout, strings.Contains(string(dnsmasq), name+" from "+strings.TrimSpace(ip))
	}
	if out, asked := ask("childflow-plain", "control.wild.test"); !asked || !strings.Contains(out, "Address: 203.0.113.10") {
		t.Errorf("an unsandboxed container's name through docker's resolver: dnsmasq asked %v\n%s", asked, out)
	}
	out, asked := ask("childflow", "exfil.wild.test")
	if !strings.Contains(out, "Address: "+dbIP+"\n") || strings.Contains(out, "203.0.113.10") || asked {
		t.Errorf("names in a sandboxed container on a user-defined network (db at %s): dnsmasq asked %v\n%s", dbIP, asked, out)
	}
	logs, _ := filepath.Glob(filepath.Join(n.flows, "*.jsonl"))
	var denied bool
	for _, l := range logs {
		denied = denied || hasEvent(readFlowLog(t, l), map[string]any{"event": "policy_violation", "qname": "exfil.wild.test"})
	}
	if !denied {
		t.Errorf("no policy_violation for the name asked through docker's resolver")
	}
	d.run(t, "rm", "-f", db)

	// A plain container's frame on the second network escapes: the
	// probe works there.
	d.run(t, "network", "create", "proj2")
	bridge2 := "br-" + strings.TrimSpace(d.run(t, "network", "inspect", "-f", "{{.Id}}", "proj2").stdout)[:12]
	for _, runtime := range []string{"childflow", "childflow-plain"} {
		id := strings.TrimSpace(d.run(t, "create", "--runtime", runtime, "--network", "proj", "bb:latest", "sleep", "1000000").stdout)
		d.run(t, "network", "connect", "proj2", id)
		if r := d.run(t, "start", id); r.code != 0 {
			t.Fatalf("a container on two networks under %s: %v", runtime, r)
		}
		var pid int
		fmt.Sscan(d.run(t, "inspect", "-f", "{{.State.Pid}}", id).stdout, &pid)
		ip2 := strings.TrimSpace(d.run(t, "inspect", "-f", "{{.NetworkSettings.Networks.proj2.IPAddress}}", id).stdout)
		want := map[string]string{"childflow": "contained", "childflow-plain": "escaped"}[runtime]
		if out := rawFrameOn(t, "eth1", bridge2, pid, ip2); out != want {
			t.Errorf("a raw frame on the second network of a container under %s: %s, want %s", runtime, out, want)
		}
		d.run(t, "rm", "-f", id)
	}

	d.run(t, "network", "rm", "proj", "proj2")
	n.waitDetached(t)
	netfilterAsFound(t, before)
}

// TestInterfacesAddedToARunningContainer connects a network to a running
// sandboxed container, as docker network connect, podman network connect
// (a CNI plugin) or an admin does: what no hook saw gets guarded (or, if
// it cannot be, deleted) by the node daemon, and steered.
func TestInterfacesAddedToARunningContainer(t *testing.T) {
	n := startNode(t)
	before := hostNetfilter(t)
	d := startDockerd(t, n)
	d.run(t, "network", "create", "proj")
	d.run(t, "network", "create", "proj2")
	bridge2 := "br-" + strings.TrimSpace(d.run(t, "network", "inspect", "-f", "{{.Id}}", "proj2").stdout)[:12]

	// docker network connect gives the container a veth no createRuntime
	// hook saw: the daemon guards it and steers its routes.
	id, pid, _ := d.background(t, "childflow", "--network", "proj", "bb:latest", "sleep", "1000000")
	// What a process inside writes onto it the moment it appears, before
	// its guard, must not get out either (but for a few frames that beat
	// the hold now and then).
	subnet2 := strings.TrimSpace(d.run(t, "network", "inspect", "-f", "{{(index .IPAM.Config 0).Subnet}}", "proj2").stdout)
	bridgeMAC, _ := os.ReadFile("/sys/class/net/" + bridge2 + "/address")
	arrived, sent := flood(t, pid, "eth1", netip.MustParsePrefix(subnet2).Addr().Next().Next().String(), strings.TrimSpace(string(bridgeMAC)), func() {
		d.run(t, "network", "connect", "proj2", id)
	})
	t.Logf("docker network connect's veth: %d of %d raw frames arrived", arrived, sent)
	if sent == 0 || arrived > sent/100 {
		t.Errorf("raw frames written onto a network's interface as it was connected to a sandboxed container: %d arrived of %d\ndaemon log:\n%s", arrived, sent, n.log)
	}
	ip2 := strings.TrimSpace(d.run(t, "inspect", "-f", "{{.NetworkSettings.Networks.proj2.IPAddress}}", id).stdout)
	gw2 := strings.TrimSpace(d.run(t, "network", "inspect", "-f", "{{(index .IPAM.Config 0).Gateway}}", "proj2").stdout)
	port := "eth1"
	guarded := func() bool { return hasGuard("", id, port) }
	eventually(t, "the guard of the connected network's veth", guarded)
	if out := rawFrameOn(t, "eth1", bridge2, pid, ip2); out != "contained" {
		t.Errorf("a raw frame on a network connected to a running sandboxed container: %s", out)
	}
	// Its guard names its address there: it still answers who reaches it.
	if r := d.run(t, "run", "--rm", "--runtime", "childflow-plain", "--network", "proj2", "bb:latest", "ping", "-c", "1", "-W", "5", ip2); r.code != 0 {
		t.Errorf("a container on the connected network pinging the sandboxed one: %v", r)
	}
	// What it opens to that network goes through the engine and its policy.
	d.run(t, "exec", id, "sh", "-c", "nc -w 2 "+gw2+" 80 </dev/null")
	if !hasEvent(readFlowLog(t, filepath.Join(n.flows, id+".jsonl")), map[string]any{"event": "connect_attempt", "dst": gw2 + ":80"}) {
		t.Errorf("a connection to the connected network (%s) is not in the sandbox's flow log", gw2)
	}
	// An interface moved in that cannot be guarded (a macvlan on the
	// host's) is deleted; one made inside with both ends there stays.
	netns := "--net=/proc/" + fmt.Sprint(pid) + "/ns/net"
	if out, err := exec.Command("nsenter", netns, "ip", "link", "add", "cf-in0", "type", "veth", "peer", "name", "cf-in1").CombinedOutput(); err != nil {
		t.Fatalf("a veth pair inside: %v\n%s", err, out)
	}
	macvlanDeleted(t, pid)
	if exec.Command("nsenter", netns, "ip", "link", "show", "cf-in0").Run() != nil {
		t.Errorf("a veth made inside the sandbox's namespace was deleted")
	}
	// A CNI plugin adding one (podman network connect, a Multus network)
	// makes the veth in the namespace, puts its host's end on the bridge
	// and gives it an address before bringing it up: its guard must be
	// the bridge's, naming that address, and what is written onto it as
	// it comes up must not get out, nor open a way out for later (a
	// bridge's guard lets the pod answer whoever sent it a datagram, and a
	// routed veth's whatever conntrack takes for an answer). A few frames
	// may beat a hold (docs/containers.md): at most 1 in 100 here. The
	// node tracks connections, as one with NAT, kube-proxy or a firewall
	// does: what answers frames that got out before a guard is then told
	// from connections made to the pod.
	if out, err := exec.Command("nft", "add table inet cf-node; add chain inet cf-node c { type filter hook forward priority 0; }; add rule inet cf-node c ct state new counter").CombinedOutput(); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	untrack := func() { exec.Command("nft", "delete", "table", "inet", "cf-node").Run() }
	t.Cleanup(untrack)
	var del func() error
	for _, plugin := range []string{"ptp", "bridge"} {
		arrived, sent := flood(t, pid, "net1", "10.99.0.2", "arp:203.0.113.1", func() { del = cniPlugin(t, id, pid, "net1", plugin) })
		t.Logf("the CNI %s plugin's veth: %d of %d raw frames arrived", plugin, arrived, sent)
		if sent == 0 || arrived > sent/100 {
			t.Errorf("raw frames written onto an interface the CNI %s plugin added as it came up: %d arrived of %d", plugin, arrived, sent)
		}
		if plugin == "ptp" {
			if err := del(); err != nil {
				t.Error(err)
			}
			eventually(t, "the guard of the routed veth to go", func() bool { return !hasGuard("", id, "net1") })
		}
	}
	eventually(t, "the bridge guard of the veth a CNI plugin added", func() bool { return hasGuard("bridge", id, "net1") })
	if out := rawFrameOn(t, "net1", "cf-extra0", pid, "10.99.0.2"); out != "contained" {
		t.Errorf("a raw frame on an interface a CNI plugin added: %s", out)
	}
	if err := exec.Command("ping", "-c", "1", "-W", "5", "10.99.0.2").Run(); err != nil {
		t.Errorf("the host pinging the sandboxed container on an interface a CNI plugin added: %v", err)
	}
	if err := del(); err != nil {
		t.Error(err)
	}
	untrack()

	// An IPv6 network: its guard names the address docker gives the
	// container there, which a container on that network reaches. (Its
	// link-local address comes once the hold ends, after the guard, so
	// the guard passes no neighbour discovery for it: unused here.)
	if hasIPv6 {
		d.run(t, "network", "create", "--ipv6", "--subnet", "fd00:cf:6::/64", "proj6")
		d.run(t, "network", "connect", "proj6", id)
		ip6 := strings.TrimSpace(d.run(t, "inspect", "-f", "{{.NetworkSettings.Networks.proj6.GlobalIPv6Address}}", id).stdout)
		addrs, _ := exec.Command("nsenter", netns, "ip", "-o", "addr", "show", "to", ip6).Output()
		link6 := strings.TrimSuffix(strings.Fields(string(addrs) + " _ _")[1], ":")
		eventually(t, "the guard of the IPv6 network's veth", func() bool { return hasGuard("bridge", id, link6) })
		if record, _ := os.ReadFile(filepath.Join(n.state, "guards", id[:12]+"+"+link6+".json")); !strings.Contains(string(record), `"`+ip6+`"`) {
			t.Errorf("the guard of an IPv6 network's veth does not name the container's address there (%s): %s", ip6, record)
		}
		if r := d.run(t, "run", "--rm", "--runtime", "childflow-plain", "--network", "proj6", "bb:latest", "ping", "-6", "-c", "1", "-W", "5", ip6); r.code != 0 {
			t.Errorf("a container on a connected IPv6 network pinging the sandboxed one: %v", r)
		}
		d.run(t, "network", "disconnect", "proj6", id)
		d.run(t, "network", "rm", "proj6")
	}

	// Disconnected, its guard goes.
	d.run(t, "network", "disconnect", "proj2", id)
	eventually(t, "the guard of the disconnected network's veth to go", func() bool { return !guarded() })
	// Connected while no daemon runs, the next one guards it.
	n.kill(t)
	d.run(t, "network", "connect", "proj2", id)
	n.start(t)
	ip2 = strings.TrimSpace(d.run(t, "inspect", "-f", "{{.NetworkSettings.Networks.proj2.IPAddress}}", id).stdout)
	addrs, _ := exec.Command("nsenter", netns, "ip", "-o", "addr", "show", "to", ip2).Output()
	link := strings.TrimSuffix(strings.Fields(string(addrs) + " _ _")[1], ":") // docker names it eth2 now
	port = link
	eventually(t, "the restarted daemon to guard the veth connected while none ran", guarded)
	if out := rawFrameOn(t, link, bridge2, pid, ip2); out != "contained" {
		t.Errorf("a raw frame on a network connected while no daemon ran: %s", out)
	}
	d.run(t, "rm", "-f", id)

	d.run(t, "network", "rm", "proj", "proj2")
	n.waitDetached(t)
	netfilterAsFound(t, before)
}

func TestContainerdThroughTheRuntimeWrapper(t *testing.T) {
	n := startNode(t)
	dir := t.TempDir()
	sock := filepath.Join(dir, "containerd.sock")
	cfg := fmt.Sprintf("version = 2\nroot = %q\nstate = %q\ndisabled_plugins = [\"io.containerd.grpc.v1.cri\"]\n[grpc]\n  address = %q\n",
		filepath.Join(dir, "root"), filepath.Join(dir, "state"), sock)
	os.WriteFile(filepath.Join(dir, "config.toml"), []byte(cfg), 0o644)
	var log bytes.Buffer
	leaveRunAsFound(t, "/run/containerd")
	leaveCgroupsAsFound(t, "default") // ctr's namespace
	containerd := exec.Command("containerd", "--config", filepath.Join(dir, "config.toml"))
	// containerd hands its environment to the shim and the runtime.
	containerd.Env = append(os.Environ(), "CHILDFLOW_SOCKET="+n.socket, "CHILDFLOW_STATE_DIR="+n.state, "TMPDIR="+dir)
	containerd.Stdout, containerd.Stderr = &log, &log
	if err := containerd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { containerd.Process.Signal(os.Interrupt); containerd.Wait() })
	eventually(t, "containerd to answer", func() bool { _, err := os.Stat(sock); return err == nil })
	root := t.TempDir()
	rootfs(t, root)
	// ctr now and then loses the end of what a container writes just
	// before it exits (plain runc, no childflow: 4 of 150 runs with both
	// CPUs busy), so the script's output comes back through a file in
	// its rootfs.
	out := filepath.Join(root, "out")
	ctr := func(id string, ann map[string]string, script string) result {
		os.Remove(out)
		args := []string{"-a", sock, "run", "--rm", "--rootfs", "--runc-binary", filepath.Join(filepath.Dir(bin), "childflow-runtime"), "--env", "PATH=/bin"}
		for k, v := range ann {
			args = append(args, "--annotation", k+"="+v)
		}
		r := execute(t, append(append([]string{"ctr"}, args...), root, id, "/bin/sh", "-c", "("+script+") >/out")...)
		if b, err := os.ReadFile(out); err == nil {
			r.stdout += string(b)
		}
		return r
	}
	r := ctr("cf-ctr", sandboxedAnn, probe)
	if r.code != 0 {
		t.Fatalf("%v\ncontainerd:\n%s", r, log.String())
	}
	wantLines(t, r.stdout, "reach 203.0.113.10", "blocked 203.0.113.20", "blocked 2001:db8::20", "has-cf0")
	r = ctr("cf-ctr-plain", nil, "ip -o link | grep -q cf0 && echo has-cf0 || echo no-cf0")
	wantLines(t, r.stdout, "no-cf0")
	r = ctr("cf-ctr-bad", map[string]string{"childflow.dev/block-private": "sometimes"}, "echo RAN")
	if r.code == 0 || strings.Contains(r.stdout, "RAN") || !strings.Contains(r.stderr, "childflow.dev/block-private") {
		t.Errorf("bad annotation under containerd: %v", r)
	}
	n.waitDetached(t)
}

// cniPlugin runs a CNI plugin by hand against process pid's network
// namespace, as podman network connect (its CNI backend) and Multus do:
// it adds ifName with the address 10.99.0.2/24 from host-local, a veth
// whose host's end is on the bridge cf-extra0 (bridge; the host then
// takes 10.99.0.1 there) or routed to (ptp, with 10.99.0.1 on it). It
// returns the plugin's DEL.
func cniPlugin(t *testing.T, id string, pid int, ifName, plugin string) (del func() error) {
	t.Helper()
	conf := map[string]any{"cniVersion": "0.4.0", "name": "cf-extra-" + plugin, "type": plugin,
		"ipam": map[string]any{"type": "host-local", "subnet": "10.99.0.0/24", "dataDir": t.TempDir()}}
	if plugin == "bridge" {
		conf["bridge"] = "cf-extra0"
		t.Cleanup(func() { exec.Command("ip", "link", "del", "cf-extra0").Run() })
	}
	stdin, _ := json.Marshal(conf)
	cni := func(command string) error {
		cmd := exec.Command("/usr/lib/cni/" + plugin)
		cmd.Env = append(os.Environ(), "CNI_COMMAND="+command, "CNI_CONTAINERID="+id, "CNI_NETNS=/proc/"+fmt.Sprint(pid)+"/ns/net", "CNI_IFNAME="+ifName, "CNI_PATH=/usr/lib/cni")
		cmd.Stdin = bytes.NewReader(stdin)
		if out, err := cmd.CombinedOutput(); err != nil {
			return fmt.Errorf("CNI %s %s of %s: %v\n%s", plugin, command, ifName, err, out)
		}
		return nil
	}
	t.Cleanup(func() { cni("DEL") })
	if err := cni("ADD"); err != nil {
		t.Fatal(err)
	}
	if plugin == "bridge" {
		exec.Command("ip", "addr", "add", "10.99.0.1/24", "dev", "cf-extra0").Run()
	}
	return func() error { return cni("DEL") }
}

// flood writes raw UDP frames from src onto iface in process pid's
// network namespace the moment it comes up (test/testdata/rawflood.py,
// to gateway, a MAC address or arp:IP), for half a second, while during
// adds it; it returns how many reached the testnet's 203.0.113.20, and
// how many were written.
func flood(t *testing.T, pid int, iface, src, gateway string, during func()) (arrived, sent int) {
	t.Helper()
	inet := testnet + "-inet"
	counted := func() int {
		out, _ := exec.Command("ip", "netns", "exec", inet, "nft", "list", "table", "inet", "cf-flood").Output()
		_, n, _ := strings.Cut(string(out), "counter packets ")
		c, err := strconv.Atoi(strings.Fields(n + " ?")[0])
		if err != nil {
			t.Fatalf("counting the flood: %s", out)
		}
		return c
	}
	if exec.Command("ip", "netns", "exec", inet, "nft", "list", "table", "inet", "cf-flood").Run() != nil {
		if out, err := exec.Command("ip", "netns", "exec", inet, "nft", "add table inet cf-flood; add chain inet cf-flood c { type filter hook prerouting priority -300; }; add rule inet cf-flood c udp sport 40008 udp dport 7 counter").CombinedOutput(); err != nil {
			t.Fatalf("counting the flood: %v\n%s", err, out)
		}
		t.Cleanup(func() { exec.Command("ip", "netns", "exec", inet, "nft", "delete", "table", "inet", "cf-flood").Run() })
	}
	before := counted()
	cmd := exec.Command("nsenter", "--net=/proc/"+fmt.Sprint(pid)+"/ns/net", "python3", "../testdata/rawflood.py", iface, src, "203.0.113.20", "7", gateway, "0.5")
	var stderr strings.Builder
	cmd.Stderr = &stderr
	stdout, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	out := bufio.NewReader(stdout)
	if line, _ := out.ReadString('\n'); line != "ready\n" {
		cmd.Wait()
		t.Fatalf("the flood did not start: %q %s", line, stderr.String())
	}
	during()
	rest, _ := io.ReadAll(out)
	cmd.Wait()
	if _, err := fmt.Sscanf(string(rest), "sent=%d", &sent); err != nil {
		t.Fatalf("the flood: %q %s", rest, stderr.String())
	}
	return counted() - before, sent
}

// hasGuard says whether the host's guard table of family (any, if "")
// holds the chain of sandbox id's interface port.
func hasGuard(family, id, port string) bool {
	list := []string{"list", "ruleset"}
	if family != "" {
		list = []string{"list", "table", family, "childflow-guard"}
	}
	out, _ := exec.Command("nft", list...).Output()
	return strings.Contains(string(out), "chain from-"+id[:12]+"+"+port+" {")
}

// macvlanDeleted moves a macvlan, on a veth of the host's made for it,
// into process pid's network namespace, and waits for the node daemon to
// delete it: nothing on the host could guard it.
func macvlanDeleted(t *testing.T, pid int) {
	t.Helper()
	for _, args := range [][]string{
		{"link", "add", "cf-lower", "type", "veth", "peer", "name", "cf-lower1"},
		{"link", "add", "cf-mv", "link", "cf-lower", "type", "macvlan"},
		{"link", "set", "cf-mv", "netns", fmt.Sprint(pid)},
	} {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %v: %v\n%s", args, err, out)
		}
	}
	t.Cleanup(func() { exec.Command("ip", "link", "del", "cf-lower").Run() })
	eventually(t, "the macvlan moved in to be deleted", func() bool {
		return exec.Command("nsenter", "--net=/proc/"+fmt.Sprint(pid)+"/ns/net", "ip", "link", "show", "cf-mv").Run() != nil
	})
}

// startPodman sets podman up for a test, with the hooks.d entries shipped
// in deploy/ pointed at the test's binaries and node n: podman runs it
// with args, run runs a script in a container of the busybox rootfs root
// (with no network, or in the pod named).
func startPodman(t *testing.T, n *node) (podman func(args ...string) result, run func(ann map[string]string, script string, pod ...string) result, root string) {
	t.Helper()
	dir := shortTempDir(t, "cfpod") // podman refuses a runroot of more than 50 bytes
	hooksDir := filepath.Join(dir, "hooks.d")
	os.MkdirAll(hooksDir, 0o755)
	// The hooks.d entries shipped in deploy/, pointed at this test's
	// binaries and daemon.
	hook := filepath.Join(filepath.Dir(bin), "childflow-hook")
	for _, stage := range []string{"createRuntime", "poststop"} {
		b, err := os.ReadFile("../../deploy/hooks.d/childflow-" + stage + ".json")
		if err != nil {
			t.Fatal(err)
		}
		var entry map[string]any
		if err := json.Unmarshal(b, &entry); err != nil {
			t.Fatalf("deploy/hooks.d/childflow-%s.json: %v", stage, err)
		}
		h := entry["hook"].(map[string]any)
		h["path"], h["args"] = hook, n.hookArgs(stage)
		b, _ = json.Marshal(entry)
		os.WriteFile(filepath.Join(hooksDir, "childflow-"+stage+".json"), b, 0o644)
	}
	root = t.TempDir()
	rootfs(t, root)
	leaveCgroupsAsFound(t, "libpod_parent") // once its cleanup is done
	// conmon starts podman's cleanup of each container, which may still
	// be at work in these directories when a run returns (a start the
	// hook refused): the directories go once it is done.
	t.Cleanup(func() {
		eventually(t, "podman's cleanup processes to exit", func() bool {
			return exec.Command("pgrep", "-f", dir).Run() != nil
		})
	})
	// Everything podman keeps in this test's directory: its locks as
	// files in its tmpdir, not the host's /dev/shm/libpod_lock, that
	// tmpdir rather than /run/libpod, and runc's state rather than
	// /run/runc. (Its cleanup process, started by conmon, still runs
	// runc delete without the flag, which makes /run/runc.)
	leaveRunAsFound(t, "/run/runc")
	conf := filepath.Join(dir, "containers.conf")
	// Explicit ulimits: root here cannot raise them to podman's defaults.
	if err := os.WriteFile(conf, []byte("[containers]\ndefault_ulimits = [\"nofile=1024:1024\", \"nproc=1024:1024\"]\n[engine]\nlock_type = \"file\"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	podman = func(args ...string) result {
		// runc: crun trips over this machine's hybrid cgroups.
		return execute(t, append([]string{"env", "CONTAINERS_CONF=" + conf, "podman",
			"--root", filepath.Join(dir, "root"), "--runroot", filepath.Join(dir, "runroot"), "--tmpdir", filepath.Join(dir, "tmp"),
			"--runtime-flag", "root=" + filepath.Join(dir, "runc"), "--storage-driver", "vfs",
			"--hooks-dir", hooksDir, "--cgroup-manager", "cgroupfs", "--events-backend", "file", "--runtime", "runc"}, args...)...)
	}
	// run runs script in a container of the rootfs, with no network or
	// in the pod named.
	run = func(ann map[string]string, script string, pod ...string) result {
		args := []string{"run", "--rm", "--network", "none"}
		if len(pod) > 0 {
			args = []string{"run", "--rm", "--pod", pod[0]}
		}
		for k, v := range ann {
			args = append(args, "--annotation", k+"="+v)
		}
		return podman(append(args, "--rootfs", root, "/bin/sh", "-c", script)...)
	}
	return podman, run, root
}

func TestPodmanWithHooksDir(t *testing.T) {
	n := startNode(t)
	_, run, _ := startPodman(t, n)
	r := run(sandboxedAnn, probe)
	if r.code != 0 {
		t.Fatal(r)
	}
	wantLines(t, r.stdout, "reach 203.0.113.10", "blocked 203.0.113.20", "blocked 2001:db8::20", "has-cf0")
	r = run(nil, "ip -o link | grep -q cf0 && echo has-cf0 || echo no-cf0")
	wantLines(t, r.stdout, "no-cf0")
	// The hooks.d entries run the hook on a slip of the prefix too, and
	// the hook refuses it: no container unsandboxed over a typo.
	r = run(map[string]string{"childflow.io/default-policy": "deny"}, "echo RAN")
	if r.code == 0 || strings.Contains(r.stdout, "RAN") || !strings.Contains(strings.ReplaceAll(r.stderr, `\"`, `"`), "unknown annotation childflow.io/default-policy") {
		t.Errorf("a mistyped annotation prefix: want a failed start naming it: %v", r)
	}
	n.waitDetached(t)
}

// A pod's containers share its infra container's namespace, which
// outlives each of them: the first sandboxes it, the sandbox lingers for
// the infra container once that one exited, the next joins it, and it
// ends with the pod. (The infra image is the rootfs, imported: podman's
// own needs catatonit or a registry.) Left out of make e2e-vm: there,
// on cgroup v2 without systemd, podman 4.3.1 with cgroupfs cannot start
// a pod's infra container ("error reopening /dev/null inside container").
func TestPodmanPodsShareASandbox(t *testing.T) {
	n := startNode(t)
	podman, run, root := startPodman(t, n)
	dir := t.TempDir()
	image := filepath.Join(dir, "infra.tar")
	if out, err := exec.Command("tar", "-C", root, "-cf", image, ".").CombinedOutput(); err != nil {
		t.Fatalf("tar: %v\n%s", err, out)
	}
	for _, args := range [][]string{
		{"import", "--change", `ENTRYPOINT ["/bin/sleep", "1000000"]`, image, "localhost/cf-infra"},
		{"pod", "create", "--name", "cfpod", "--network", "none", "--infra-image", "localhost/cf-infra"},
		{"pod", "start", "cfpod"},
	} {
		if r := podman(args...); r.code != 0 {
			t.Fatalf("podman %v: %v", args, r)
		}
	}
	t.Cleanup(func() { podman("pod", "rm", "-f", "-t", "0", "cfpod") })
	for _, which := range []string{"first", "next"} {
		r := run(sandboxedAnn, probe, "cfpod")
		if r.code != 0 {
			t.Fatalf("the pod's %s container: %v", which, r)
		}
		wantLines(t, r.stdout, "reach 203.0.113.10", "blocked 203.0.113.20", "blocked 2001:db8::20", "has-cf0")
	}
	if sbs := n.sandboxes(t); len(sbs) != 1 || sbs[0]["lingering"] != true {
		t.Errorf("the pod's sandbox once its containers exited: %v, want one, lingering", sbs)
	}
	if r := podman("pod", "rm", "-f", "-t", "0", "cfpod"); r.code != 0 {
		t.Fatalf("removing the pod: %v", r)
	}
	n.waitDetached(t)
}
