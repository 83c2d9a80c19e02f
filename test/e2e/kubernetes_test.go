//go:build e2e

package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// cri is containerd with its CRI plugin, as kubelet drives it, with a CNI
// conflist chaining bridge + host-local + portmap + childflow-cni.
type cri struct {
	dir, sock string
	n         *node
}

const (
	criImage  = "docker.io/cftest/busybox:latest"
	podSubnet = "10.244.87.0/24"
	podBridge = "cfcri0"
)

// startCRI starts containerd's CRI with childflow-cni chained, or with
// the node's other plugins alone (withoutPlugin). Either way it offers the
// "childflow" runtime handler (deploy/containerd/config.toml, the chart's
// RuntimeClass): runc through childflow-runtime, the pod's childflow.dev/
// annotations passed to every container.
func startCRI(t *testing.T, n *node, withoutPlugin bool) *cri {
	t.Helper()
	c := &cri{dir: t.TempDir(), n: n}
	c.sock = filepath.Join(c.dir, "containerd.sock")
	bin, netd := filepath.Join(c.dir, "cni-bin"), filepath.Join(c.dir, "net.d")
	os.MkdirAll(bin, 0o755)
	os.MkdirAll(netd, 0o755)
	for _, p := range []string{"bridge", "host-local", "portmap", "loopback"} {
		os.Symlink("/usr/lib/cni/"+p, filepath.Join(bin, p))
	}
	os.Symlink(filepath.Join(filepath.Dir(binPath()), "childflow-cni"), filepath.Join(bin, "childflow-cni"))
	plugins := []any{
		map[string]any{"type": "bridge", "bridge": podBridge, "isGateway": true, "ipMasq": false,
			"ipam": map[string]any{"type": "host-local", "ranges": [][]map[string]string{{{"subnet": podSubnet}}},
				"routes": []map[string]string{{"dst": "0.0.0.0/0"}}, "dataDir": filepath.Join(c.dir, "ipam")}},
		map[string]any{"type": "portmap", "capabilities": map[string]bool{"portMappings": true}},
	}
	if !withoutPlugin {
		plugins = append(plugins, map[string]any{"type": "childflow-cni", "capabilities": map[string]bool{"io.kubernetes.cri.pod-annotations": true},
			"socket": n.socket, "stateDir": n.state, "clusterCIDRs": []string{"10.244.0.0/16", "10.96.0.0/12"}})
	}
	conflist, _ := json.Marshal(map[string]any{"cniVersion": "1.0.0", "name": "cftest", "plugins": plugins})
	os.WriteFile(filepath.Join(netd, "10-cftest.conflist"), conflist, 0o644)
	cfg := fmt.Sprintf(`version = 2
root = %q
state = %q
[grpc]
  address = %q
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = %q
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "native"
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = %q
    conf_dir = %q
`, filepath.Join(c.dir, "root"), filepath.Join(c.dir, "state"), c.sock, criImage, bin, netd)
	// The handler as deploy/containerd/config.toml ships it, pointed at
	// this test's childflow-runtime.
	shipped, err := os.ReadFile("../../deploy/containerd/config.toml")
	const installed = `BinaryName = "/usr/local/bin/childflow-runtime"`
	if err != nil || !strings.Contains(string(shipped), installed) {
		t.Fatalf("deploy/containerd/config.toml: %v, want its %s", err, installed)
	}
	cfg += strings.ReplaceAll(string(shipped), installed, fmt.Sprintf("BinaryName = %q", filepath.Join(filepath.Dir(binPath()), "childflow-runtime")))
	os.WriteFile(filepath.Join(c.dir, "config.toml"), []byte(cfg), 0o644)
	_, cniCache := os.Stat("/var/lib/cni") // libcni caches results there
	var log bytes.Buffer
	leaveRunAsFound(t, "/run/containerd")
	leaveCgroupsAsFound(t, "k8s.io") // the CRI's namespace
	cmd := exec.Command("containerd", "--config", filepath.Join(c.dir, "config.toml"))
	// containerd hands its environment to the shim and the runtime.
	cmd.Env = append(os.Environ(), "CHILDFLOW_SOCKET="+n.socket, "CHILDFLOW_STATE_DIR="+n.state, "TMPDIR="+c.dir)
	cmd.Stdout, cmd.Stderr = &log, &log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for _, id := range strings.Fields(c.crictl(t, "pods", "-q").stdout) {
			c.crictl(t, "stopp", id)
			c.crictl(t, "rmp", "-f", id)
		}
		cmd.Process.Signal(os.Interrupt)
		cmd.Wait()
		exec.Command("ip", "link", "del", podBridge).Run()
		if os.IsNotExist(cniCache) {
			os.RemoveAll("/var/lib/cni")
		}
		if t.Failed() {
			t.Logf("containerd log:\n%s", log.String())
		}
	})
	eventually(t, "containerd's CRI to answer", func() bool { return c.crictl(t, "info").code == 0 })
	root := t.TempDir()
	rootfs(t, root)
	image := ociImage(t, root, criImage, []string{"/bin/sleep", "1000000"})
	if out, err := exec.Command("ctr", "-a", c.sock, "-n", "k8s.io", "images", "import", "--snapshotter", "native", image).CombinedOutput(); err != nil {
		t.Fatalf("ctr images import: %v\n%s", err, out)
	}
	return c
}

func binPath() string { return bin }

func (c *cri) podPID(t *testing.T, pod string) int {
	t.Helper()
	var st struct {
		Info struct{ PID int } `json:"info"`
	}
	json.Unmarshal([]byte(c.crictl(t, "inspectp", pod).stdout), &st)
	if st.Info.PID == 0 {
		t.Fatalf("no pid for pod %s", pod)
	}
	return st.Info.PID
}

// rawFrameVia writes, in the namespace of the pod's (or container's)
// process pid, a UDP datagram from its address to 203.0.113.20's echo
// port straight onto eth0, addressed to the host's bridge, and says
// whether the echo came back.
func rawFrameVia(t *testing.T, bridge string, pid int, podIP string) string {
	t.Helper()
	return rawFrameOn(t, "eth0", bridge, pid, podIP)
}

// rawFrameOn is rawFrameVia on the namespace's interface link.
func rawFrameOn(t *testing.T, link, bridge string, pid int, podIP string) string {
	t.Helper()
	if netnsInode(t, fmt.Sprintf("/proc/%d/ns/net", pid)) == netnsInode(t, "/proc/self/ns/net") {
		t.Fatalf("process %d is in the host's network namespace: no raw frame from there", pid)
	}
	mac, err := os.ReadFile("/sys/class/net/" + bridge + "/address")
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("nsenter", "--net=/proc/"+fmt.Sprint(pid)+"/ns/net", "python3", "../testdata/rawudp.py",
		podIP, "40007", "203.0.113.20", "7", strings.TrimSpace(string(mac)), "3")
	cmd.Env = append(os.Environ(), "IFACE="+link)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("raw frame: %v\n%s", err, out)
	}
	return strings.TrimSpace(string(out))
}

// netnsInode is the inode of the network namespace at path.
func netnsInode(t *testing.T, path string) uint64 {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

// claimByARP sends, from the namespace of the pod's process pid,
// gratuitous ARPs saying addr is at the pod's MAC address, and reports
// whether the node's entry for addr named that MAC address after one.
func claimByARP(t *testing.T, pid int, addr string) bool {
	t.Helper()
	netns := "--net=/proc/" + fmt.Sprint(pid) + "/ns/net"
	link, err := exec.Command("nsenter", netns, "ip", "-o", "link", "show", "eth0").Output()
	_, mac, _ := strings.Cut(string(link), "link/ether ")
	if err != nil || len(mac) < 17 {
		t.Fatalf("the pod's MAC address: %v %q", err, link)
	}
	for range 3 { // the true owner's next ARP packet may put its entry back
		if out, err := exec.Command("nsenter", netns, "python3", "../testdata/spoof.py", "arp", addr).CombinedOutput(); err != nil {
			t.Fatalf("ARP claim: %v\n%s", err, out)
		}
		time.Sleep(50 * time.Millisecond)
		if entry, _ := exec.Command("ip", "neigh", "show", addr, "dev", podBridge).Output(); strings.Contains(string(entry), mac[:17]) {
			return true
		}
	}
	return false
}

func (c *cri) crictl(t *testing.T, args ...string) result {
	t.Helper()
	return execute(t, append([]string{"crictl", "--runtime-endpoint", "unix://" + c.sock, "--image-endpoint", "unix://" + c.sock, "--timeout", "30s"}, args...)...)
}

// pod runs a pod sandbox with ann and one container running script;
// it returns the pod and container ids and the pod's IP.
func (c *cri) pod(t *testing.T, name string, ann map[string]string, script string) (pod, ctr, ip string) {
	t.Helper()
	pod, ctrs, ip := c.podOf(t, name, "", ann, script)
	return pod, ctrs[0], ip
}

// podOf runs a pod sandbox with ann under the runtime handler (""
// for containerd's default) and a container running each script.
func (c *cri) podOf(t *testing.T, name, handler string, ann map[string]string, scripts ...string) (pod string, ctrs []string, ip string) {
	t.Helper()
	podCfg, _ := json.Marshal(map[string]any{
		"metadata":      map[string]any{"name": name, "namespace": "team", "uid": name + "-uid", "attempt": 0},
		"annotations":   ann,
		"log_directory": filepath.Join(c.dir, "logs", name),
		"linux":         map[string]any{},
	})
	podFile := filepath.Join(c.dir, name+"-pod.json")
	os.WriteFile(podFile, podCfg, 0o644)
	runp := []string{"runp", podFile}
	if handler != "" {
		runp = []string{"runp", "--runtime", handler, podFile}
	}
	r := c.crictl(t, runp...)
	if r.code != 0 {
		t.Fatalf("crictl runp %s: %v", name, r)
	}
	pod = strings.TrimSpace(r.stdout)
	for i, script := range scripts {
		ctrName := "main"
		if i > 0 {
			ctrName = fmt.Sprintf("sidecar%d", i)
		}
		ctrCfg, _ := json.Marshal(map[string]any{
			"metadata": map[string]any{"name": ctrName},
			"image":    map[string]any{"image": criImage},
			"command":  []string{"/bin/sh", "-c", script},
			"log_path": ctrName + ".log",
			"linux":    map[string]any{},
		})
		ctrFile := filepath.Join(c.dir, name+"-"+ctrName+".json")
		os.WriteFile(ctrFile, ctrCfg, 0o644)
		r = c.crictl(t, "create", pod, ctrFile, podFile)
		if r.code != 0 {
			t.Fatalf("crictl create %s: %v", ctrName, r)
		}
		ctr := strings.TrimSpace(r.stdout)
		if r := c.crictl(t, "start", ctr); r.code != 0 {
			t.Fatalf("crictl start %s: %v", ctrName, r)
		}
		ctrs = append(ctrs, ctr)
	}
	var st struct {
		Status struct {
			Network struct{ IP string } `json:"network"`
		} `json:"status"`
	}
	json.Unmarshal([]byte(c.crictl(t, "inspectp", pod).stdout), &st)
	return pod, ctrs, st.Status.Network.IP
}

func (c *cri) exec(t *testing.T, ctr, script string) string {
	t.Helper()
	return c.crictl(t, "exec", "-s", ctr, "/bin/sh", "-c", script).stdout
}

// dialPod connects to the pod's port from the host, as a kubelet probe
// or a service would, and returns what the pod said.
func dialPod(ip string, port int) string {
	var got string
	for i := 0; i < 30 && !strings.Contains(got, "hi from the pod"); i++ {
		c, err := net.DialTimeout("tcp", net.JoinHostPort(ip, fmt.Sprint(port)), 2*time.Second)
		if err != nil {
			time.Sleep(200 * time.Millisecond)
			continue
		}
		c.SetDeadline(time.Now().Add(3 * time.Second))
		b := make([]byte, 64)
		k, _ := c.Read(b)
		got = string(b[:k])
		c.Close()
	}
	return got
}

const podServer = `while true; do echo "hi from the pod" | nc -l -p 8080; done`

func TestKubernetesPodsThroughContainerdCRI(t *testing.T) {
	n := startNode(t)
	before := hostNetfilter(t)
	c := startCRI(t, n, false)

	pod, ctr, ip := c.pod(t, "sandboxed", map[string]string{
		"childflow.dev/default-policy": "deny",
		"childflow.dev/allow-cidrs":    "203.0.113.10/32",
		"childflow.dev/allow-domains":  "web.test",
	}, podServer)
	out := c.exec(t, ctr, probe+`
# The cluster resolver's address is a cluster range, yet DNS to it is
# answered by the engine (here from the testnet's dnsmasq).
nslookup web.test 10.96.0.10 | grep -q 203.0.113.10 && echo dns-via-engine || echo dns-elsewhere`)
	wantLines(t, out, "reach 203.0.113.10", "blocked 203.0.113.20", "blocked 2001:db8::20", "has-cf0", "dns-via-engine")
	if got := dialPod(ip, 8080); !strings.Contains(got, "hi from the pod") {
		t.Errorf("inbound connection to the pod %s:8080 got %q", ip, got)
	}
	// NET_RAW in the pod (a default capability) writes frames around the
	// pod's own rules, to the bridge for the node to route: the node's
	// guard on the pod's port stops them.
	if out := rawFrameVia(t, podBridge, c.podPID(t, pod), ip); out != "contained" {
		t.Errorf("a raw frame from the pod to 203.0.113.20: %s", out)
	}
	list := n.sandboxes(t)
	if len(list) != 1 || list[0]["source"] != "cni" || list[0]["labels"].(map[string]any)["pod_name"] != "sandboxed" {
		t.Fatalf("daemon sandboxes: %v", list)
	}
	flows, _ := os.ReadFile(filepath.Join(n.flows, pod+".jsonl"))
	if !strings.Contains(string(flows), `"pod_namespace":"team","pod_name":"sandboxed","pod_uid":"sandboxed-uid"`) {
		t.Errorf("flow log lacks the pod's names:\n%.600s", flows)
	}
	// The probe ran through crictl exec: its processes are in the pod's
	// namespace, not below any process the plugin knew of.
	if !attributed(string(flows), "203.0.113.10:80", "nc") {
		t.Errorf("the pod's connection to 203.0.113.10:80 is not attributed to nc:\n%.1500s", flows)
	}

	plainPod, plainCtr, plainIP := c.pod(t, "plain", nil, podServer)
	wantLines(t, c.exec(t, plainCtr, "ip -o link | grep -q cf0 && echo has-cf0 || echo no-cf0"), "no-cf0")
	// Unguarded, the same frame gets its echo: the probe sees an escape.
	if out := rawFrameVia(t, podBridge, c.podPID(t, plainPod), plainIP); out != "escaped" {
		t.Errorf("a raw frame from the unannotated pod: %s", out)
	}
	if got := dialPod(plainIP, 8080); !strings.Contains(got, "hi from the pod") {
		t.Errorf("inbound to the unannotated pod got %q", got)
	}
	// Nor can the sandboxed pod pose as its neighbour on the bridge (a
	// gratuitous ARP naming the neighbour's address): the node keeps
	// sending the neighbour's packets to the neighbour. The unannotated
	// pod can, which shows the probe works.
	if posed := claimByARP(t, c.podPID(t, pod), plainIP); posed {
		t.Errorf("the sandboxed pod took the node's ARP entry for its neighbour %s", plainIP)
	}
	if posed := claimByARP(t, c.podPID(t, plainPod), ip); !posed {
		t.Errorf("the unannotated pod's ARP claim to %s did not reach the node: the probe shows nothing", ip)
	}
	exec.Command("ip", "neigh", "del", ip, "dev", podBridge).Run()

	// The daemon restarted while the pod runs keeps its policy.
	n.kill(t)
	n.start(t)
	wantLines(t, c.exec(t, ctr, probe), "reach 203.0.113.10", "blocked 203.0.113.20", "blocked 2001:db8::20")

	// The guard's table deleted, as a flush ruleset does: the daemon puts
	// it back, and the raw frame is contained again.
	if out, err := exec.Command("nft", "delete", "table", "bridge", "childflow-guard").CombinedOutput(); err != nil {
		t.Fatalf("deleting the guard's table: %v\n%s", err, out)
	}
	for deadline := time.Now().Add(5 * time.Second); exec.Command("nft", "list", "chain", "bridge", "childflow-guard", "from-"+pod[:12]).Run() != nil; time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the daemon did not put the pod's guard back")
		}
	}
	// Knowing whom it knew (the daemon's snapshot at its start): the node,
	// whose connections to the pod above made it known.
	addrs, _ := exec.Command("ip", "-4", "-o", "addr", "show", "dev", podBridge).Output()
	nodeIP, _, _ := strings.Cut(strings.Fields(string(addrs) + " _ _ _ _")[3], "/")
	if known, _ := exec.Command("nft", "list", "set", "bridge", "childflow-guard", "inbound4-"+pod[:12]).Output(); !strings.Contains(string(known), nodeIP+" ") {
		t.Errorf("the pod's guard put back forgot the node (%s), which had reached the pod:\n%s", nodeIP, known)
	}
	if out := rawFrameVia(t, podBridge, c.podPID(t, pod), ip); out != "contained" {
		t.Errorf("a raw frame from the pod once its guard was put back: %s", out)
	}

	// An additional network Multus adds to the running pod: a veth on a
	// bridge is guarded, with the address the network gave it; a macvlan
	// moved in, which nothing on the node could guard, is deleted.
	podPID := c.podPID(t, pod)
	del := cniPlugin(t, pod, podPID, "net1", "bridge")
	eventually(t, "the guard of the pod's additional network", func() bool { return hasGuard("bridge", pod, "net1") })
	if out := rawFrameOn(t, "net1", "cf-extra0", podPID, "10.99.0.2"); out != "contained" {
		t.Errorf("a raw frame on the pod's additional network: %s", out)
	}
	if err := exec.Command("ping", "-c", "1", "-W", "5", "10.99.0.2").Run(); err != nil {
		t.Errorf("the node pinging the pod on its additional network: %v", err)
	}
	macvlanDeleted(t, podPID)
	if err := del(); err != nil {
		t.Error(err)
	}

	// A bad annotation fails the pod; it never runs unsandboxed.
	bad, _ := json.Marshal(map[string]any{
		"metadata":      map[string]any{"name": "bad", "namespace": "team", "uid": "bad-uid"},
		"annotations":   map[string]string{"childflow.dev/deny-cidrs": "everything"},
		"log_directory": filepath.Join(c.dir, "logs", "bad"), "linux": map[string]any{},
	})
	os.WriteFile(filepath.Join(c.dir, "bad.json"), bad, 0o644)
	if r := c.crictl(t, "runp", filepath.Join(c.dir, "bad.json")); r.code == 0 || !strings.Contains(r.stderr, "childflow.dev/deny-cidrs") {
		t.Errorf("runp with a bad annotation: %v", r)
	}

	for _, id := range strings.Fields(c.crictl(t, "pods", "-q").stdout) {
		c.crictl(t, "stopp", id)
		c.crictl(t, "rmp", id)
	}
	n.waitDetached(t)
	netfilterAsFound(t, before)
}

// TestKubernetesRuntimeClassPods runs pods under the "childflow" runtime
// handler, the chart's RuntimeClass, where containerd passes the pod's
// annotations to every container of the pod, each of which runs the hook:
// the first (the pod's sandbox) attaches the pod's namespace and guards
// its veth from the node (its capabilities include NET_RAW), the others
// join. With the node's own plugins alone, and with childflow-cni chained
// too, which has attached and guarded the namespace before any container.
func TestKubernetesRuntimeClassPods(t *testing.T) {
	for _, tc := range []struct {
		name          string
		withoutPlugin bool
		source        string
	}{
		{"the runtime class alone", true, "oci-hook"},
		{"with childflow-cni", false, "cni"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			n := startNode(t)
			before := hostNetfilter(t)
			c := startCRI(t, n, tc.withoutPlugin)
			pod, ctrs, ip := c.podOf(t, "classed", "childflow", sandboxedAnn, "sleep 1000000", podServer)
			for _, ctr := range ctrs {
				wantLines(t, c.exec(t, ctr, probe), "reach 203.0.113.10", "blocked 203.0.113.20", "blocked 2001:db8::20", "has-cf0")
			}
			list := n.sandboxes(t)
			if len(list) != 1 || list[0]["id"] != pod || list[0]["source"] != tc.source {
				t.Errorf("daemon sandboxes, want the pod's alone from %s: %v", tc.source, list)
			}
			if got := dialPod(ip, 8080); !strings.Contains(got, "hi from the pod") {
				t.Errorf("inbound connection to the pod %s:8080 got %q", ip, got)
			}
			// The pod's containers keep NET_RAW (containerd's default):
			// the guard on the node stops their raw frames.
			if out := rawFrameVia(t, podBridge, c.podPID(t, pod), ip); out != "contained" {
				t.Errorf("a raw frame from the pod to 203.0.113.20: %s", out)
			}
			// A container whose own annotations ask for another policy
			// cannot share the pod's namespace.
			file := filepath.Join(c.dir, "other.json")
			b, _ := json.Marshal(map[string]any{
				"metadata": map[string]any{"name": "other"}, "image": map[string]any{"image": criImage},
				"command": []string{"sleep", "1000000"}, "log_path": "other.log", "linux": map[string]any{},
				"annotations": map[string]string{"childflow.dev/allow-cidrs": "203.0.113.0/24"},
			})
			os.WriteFile(file, b, 0o644)
			r := c.crictl(t, "create", pod, file, filepath.Join(c.dir, "classed-pod.json"))
			if r.code == 0 {
				r = c.crictl(t, "start", strings.TrimSpace(r.stdout))
			}
			if r.code == 0 || !strings.Contains(r.stderr, "another policy") {
				t.Errorf("a container asking for another policy in the pod: %v", r)
			}
			// The pod's other containers leave first; the sandbox stays
			// the pod's.
			c.crictl(t, "stop", ctrs[1])
			wantLines(t, c.exec(t, ctrs[0], probe), "reach 203.0.113.10", "blocked 203.0.113.20")
			c.crictl(t, "stopp", pod)
			c.crictl(t, "rmp", pod)
			n.waitDetached(t)
			netfilterAsFound(t, before)
			// What the chart's admissionPolicy.requireRuntimeClass
			// relies on: a node whose containerd lacks the handler
			// refuses the pod rather than run it under another runtime.
			r = c.crictl(t, "runp", "--runtime", "childflow-elsewhere", filepath.Join(c.dir, "classed-pod.json"))
			if r.code == 0 || !strings.Contains(strings.ReplaceAll(r.stderr, `\"`, `"`), `no runtime for "childflow-elsewhere" is configured`) {
				t.Errorf("a pod under a runtime handler the node lacks: %v", r)
			}
		})
	}
}
