//go:build e2e

package e2e

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// node is a childflow daemon for one test, with its own socket, state
// and flow log directories.
type node struct {
	dir, socket, state, flows string
	args                      []string // the daemon's further flags
	ownPIDs                   bool     // the daemon in a PID namespace of its own
	daemon                    *exec.Cmd
	log                       *bytes.Buffer
}

func startNode(t *testing.T, args ...string) *node {
	t.Helper()
	requireRoot(t)
	dir := t.TempDir()
	n := &node{dir: dir, socket: filepath.Join(dir, "engine.sock"), state: filepath.Join(dir, "state"), flows: filepath.Join(dir, "flows"), args: args}
	n.start(t)
	t.Cleanup(func() { n.stop() })
	return n
}

func (n *node) start(t *testing.T) {
	t.Helper()
	n.log = &bytes.Buffer{}
	n.daemon = exec.Command(bin, append([]string{"daemon", "--socket", n.socket, "--state-dir", n.state, "--flow-log-dir", n.flows, "--dns", "203.0.113.53"}, n.args...)...)
	n.daemon.Stdout, n.daemon.Stderr = n.log, n.log
	if n.ownPIDs {
		n.daemon.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWPID}
	}
	if err := n.daemon.Start(); err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 100; i++ {
		if c, err := net.Dial("unix", n.socket); err == nil {
			c.Close()
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("daemon did not come up:\n%s", n.log)
}

func (n *node) stop() {
	if n.daemon != nil && n.daemon.Process != nil {
		n.daemon.Process.Signal(syscall.SIGTERM)
		n.daemon.Wait()
	}
}

func (n *node) kill(t *testing.T) {
	t.Helper()
	n.daemon.Process.Kill()
	n.daemon.Wait()
}

// sandboxes is `childflow sandboxes --format json` against this node.
func (n *node) sandboxes(t *testing.T) []map[string]any {
	t.Helper()
	r := run(t, root, "sandboxes", "--socket", n.socket, "--format", "json")
	if r.code != 0 {
		t.Fatalf("childflow sandboxes: %v", r)
	}
	var list []map[string]any
	if err := json.Unmarshal([]byte(r.stdout), &list); err != nil {
		t.Fatalf("sandboxes output %q: %v", r.stdout, err)
	}
	return list
}

// sandbox is sandbox id's entry in n.sandboxes, nil if it has none.
func (n *node) sandbox(t *testing.T, id string) map[string]any {
	t.Helper()
	for _, sb := range n.sandboxes(t) {
		if sb["id"] == id {
			return sb
		}
	}
	return nil
}

// waitDetached waits for every sandbox of n to be detached and its
// record gone.
func (n *node) waitDetached(t *testing.T) {
	t.Helper()
	eventually(t, "every sandbox to be detached", func() bool { return len(n.sandboxes(t)) == 0 && len(n.records(t)) == 0 })
}

func (n *node) records(t *testing.T) []string {
	entries, _ := os.ReadDir(filepath.Join(n.state, "sandboxes"))
	var out []string
	for _, e := range entries {
		out = append(out, e.Name())
	}
	return out
}

func (n *node) hookArgs(stage string) []any {
	return []any{"childflow-hook", "--socket", n.socket, "--state-dir", n.state, stage}
}

// rootfs is a busybox-static root filesystem; busybox's wget crashes
// here, so HTTP is spoken with nc.
func rootfs(t *testing.T, dir string) {
	t.Helper()
	for _, d := range []string{"bin", "etc", "proc", "dev", "sys", "tmp"} {
		os.MkdirAll(filepath.Join(dir, d), 0o755)
	}
	b, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(dir, "bin/busybox"), b, 0o755)
	for _, a := range []string{"sh", "nc", "nslookup", "ping", "ip", "cat", "sleep", "echo", "printf", "head", "tail", "grep"} {
		os.Symlink("busybox", filepath.Join(dir, "bin", a))
	}
	os.WriteFile(filepath.Join(dir, "etc/resolv.conf"), []byte("nameserver 203.0.113.53\n"), 0o644)
	os.WriteFile(filepath.Join(dir, "etc/passwd"), []byte("root:x:0:0:root:/:/bin/sh\n"), 0o644)
}

// bundle writes an OCI bundle running script with ann as annotations and
// hooks as config.json's hooks (nil: none).
func bundle(t *testing.T, ann map[string]string, hooks map[string]any, script string) string {
	t.Helper()
	dir := t.TempDir()
	rootfs(t, filepath.Join(dir, "rootfs"))
	if out, err := exec.Command("runc", "spec", "--bundle", dir).CombinedOutput(); err != nil {
		t.Fatalf("runc spec: %v\n%s", err, out)
	}
	path := filepath.Join(dir, "config.json")
	var spec map[string]any
	b, _ := os.ReadFile(path)
	json.Unmarshal(b, &spec)
	proc := spec["process"].(map[string]any)
	proc["terminal"] = false
	proc["args"] = []string{"sh", "-c", script}
	spec["root"].(map[string]any)["readonly"] = false
	if len(ann) > 0 {
		spec["annotations"] = ann
	}
	if hooks != nil {
		spec["hooks"] = hooks
	}
	b, _ = json.Marshal(spec)
	os.WriteFile(path, b, 0o644)
	return dir
}

func (n *node) hooks() map[string]any {
	hook := filepath.Join(filepath.Dir(bin), "childflow-hook")
	return map[string]any{
		"createRuntime": []any{map[string]any{"path": hook, "args": n.hookArgs("createRuntime")}},
		"poststop":      []any{map[string]any{"path": hook, "args": n.hookArgs("poststop")}},
	}
}

// oci runs an OCI runtime (runc, crun) with its own state root.
func oci(t *testing.T, runtime, stateRoot string, args ...string) result {
	t.Helper()
	argv := append([]string{runtime, "--root", stateRoot}, args...)
	if runtime == "crun" {
		// crun 1.8 refuses this machine's hybrid cgroups (v1 plus a v2
		// hierarchy with hugetlb): give it a mount namespace without v2.
		argv = append([]string{"unshare", "-m", "--propagation", "private", "sh", "-c", `umount /sys/fs/cgroup/unified 2>/dev/null; exec "$@"`, "crun"}, argv...)
	}
	return execute(t, argv...)
}

// probe is a script that reports what the container reaches.
const probe = `
for h in 203.0.113.10 203.0.113.20 2001:db8::20; do
  if printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 3 $h 80 | grep -q 'hello from the test internet'; then echo "reach $h"; else echo "blocked $h"; fi
done
ip -o link | grep -q cf0 && echo has-cf0 || echo no-cf0
`

var sandboxedAnn = map[string]string{
	"childflow.dev/default-policy": "deny",
	"childflow.dev/allow-cidrs":    "203.0.113.10/32",
}

func wantLines(t *testing.T, out string, want ...string) {
	t.Helper()
	for _, w := range want {
		if !strings.Contains(out, w+"\n") {
			t.Errorf("output lacks %q:\n%s", w, out)
		}
	}
}

func TestContainerPolicyUnderRuncAndCrun(t *testing.T) {
	n := startNode(t)
	for _, runtime := range []string{"runc", "crun"} {
		t.Run(runtime, func(t *testing.T) {
			state := t.TempDir()
			id := "cf-policy-" + runtime
			r := oci(t, runtime, state, "run", "--bundle", bundle(t, sandboxedAnn, n.hooks(), probe), id)
			if r.code != 0 {
				t.Fatalf("annotated container: %v", r)
			}
			wantLines(t, r.stdout, "reach 203.0.113.10", "blocked 203.0.113.20", "blocked 2001:db8::20", "has-cf0")
			log, _ := os.ReadFile(filepath.Join(n.flows, id+".jsonl"))
			if !strings.Contains(string(log), `"event":"policy_violation"`) || !strings.Contains(string(log), `"dst":"203.0.113.20:80"`) {
				t.Errorf("flow log lacks the violation:\n%s", log)
			}

			r = oci(t, runtime, state, "run", "--bundle", bundle(t, nil, n.hooks(), probe), id+"-plain")
			if r.code != 0 {
				t.Fatalf("unannotated container: %v", r)
			}
			wantLines(t, r.stdout, "blocked 203.0.113.10", "no-cf0")
			if l := n.sandboxes(t); len(l) != 0 || len(n.records(t)) != 0 {
				t.Errorf("after the containers exited: sandboxes %v, records %v", l, n.records(t))
			}
		})
	}
}

// The runtime wrapper reads the runtime's arguments as the runtime does:
// runc takes -root and -bundle for --root and --bundle, crun -bDIR. Read
// wrong, a create went to the runtime without the hook and the annotated
// container ran with no sandbox. What it cannot read, and the restore of
// a sandboxed container, it refuses before the runtime runs.
func TestTheRuntimeWrapperReadsTheRuntimesArguments(t *testing.T) {
	n := startNode(t)
	wrapper := func(runtime string, args ...string) []string {
		argv := append([]string{filepath.Join(filepath.Dir(bin), "childflow-runtime"), "--childflow-runtime", runtime,
			"--childflow-socket", n.socket, "--childflow-state-dir", n.state}, args...)
		if runtime == "crun" { // as in oci
			argv = append([]string{"unshare", "-m", "--propagation", "private", "sh", "-c", `umount /sys/fs/cgroup/unified 2>/dev/null; exec "$@"`, "crun"}, argv...)
		}
		return argv
	}
	for runtime, args := range map[string]func(state, dir, id string) []string{
		"runc": func(state, dir, id string) []string {
			return []string{"-root", state, "-log-format=text", "run", "-bundle", dir, id}
		},
		"crun": func(state, dir, id string) []string { return []string{"--root=" + state, "run", "-b" + dir, id} },
	} {
		t.Run(runtime, func(t *testing.T) {
			id := "cf-args-" + runtime
			r := execute(t, wrapper(runtime, args(t.TempDir(), bundle(t, sandboxedAnn, nil, probe), id)...)...)
			if r.code != 0 {
				t.Fatalf("annotated container: %v", r)
			}
			wantLines(t, r.stdout, "reach 203.0.113.10", "blocked 203.0.113.20", "blocked 2001:db8::20", "has-cf0")
		})
	}
	state, dir := t.TempDir(), bundle(t, sandboxedAnn, nil, "echo RAN")
	r := execute(t, wrapper("runc", "--log-verbosity", "3", "run", "--bundle", dir, "cf-args-unknown")...)
	if r.code != 2 || !strings.Contains(r.stderr, `"3" is no runc or crun command`) || strings.Contains(r.stdout, "RAN") {
		t.Errorf("an unknown global flag before run: %v", r)
	}
	r = execute(t, wrapper("runc", "--root", state, "restore", "--image-path", t.TempDir(), "--bundle", dir, "cf-args-restore")...)
	if r.code != 1 || !strings.Contains(r.stderr, "childflow-runtime: restoring a sandboxed container from a checkpoint is not supported") {
		t.Errorf("restore of an annotated container: %v", r)
	}
	if entries, _ := os.ReadDir(state); len(entries) != 0 {
		t.Errorf("the runtime ran: its state holds %d entries", len(entries))
	}
}

// A container with CAP_NET_RAW pings through a raw socket, which the
// sandbox's tables list by protocol, not by echo identifier: the flow is
// still the ping's.
func TestContainerRawSocketPingIsAttributed(t *testing.T) {
	n := startNode(t)
	dir := bundle(t, sandboxedAnn, n.hooks(), "ping -c2 -W2 203.0.113.10 && ping -c1 -W1 203.0.113.20; true")
	editSpec(t, dir, withNetRaw)

	id := "cf-raw-ping"
	r := oci(t, "runc", t.TempDir(), "run", "--bundle", dir, id)
	if r.code != 0 || !strings.Contains(r.stdout, "2 packets received") {
		t.Fatalf("ping in the container: %v", r)
	}
	log, _ := os.ReadFile(filepath.Join(n.flows, id+".jsonl"))
	for _, dst := range []string{"203.0.113.10", "203.0.113.20"} {
		var found bool
		for _, line := range strings.Split(string(log), "\n") {
			if strings.Contains(line, `"event":"connect_attempt"`) && strings.Contains(line, `"dst":"`+dst+`:0"`) {
				found = strings.Contains(line, `"comm":"ping"`) && strings.Contains(line, `"pid":`)
			}
		}
		if !found {
			t.Errorf("no connect_attempt to %s owned by ping:\n%s", dst, log)
		}
	}
}

// editSpec changes the config.json of the bundle in dir.
func editSpec(t *testing.T, dir string, edits ...func(spec map[string]any)) {
	t.Helper()
	path := filepath.Join(dir, "config.json")
	var spec map[string]any
	b, _ := os.ReadFile(path)
	if err := json.Unmarshal(b, &spec); err != nil {
		t.Fatal(err)
	}
	for _, edit := range edits {
		edit(spec)
	}
	b, _ = json.Marshal(spec)
	os.WriteFile(path, b, 0o644)
}

// withNetRaw gives the container CAP_NET_RAW (runc spec's set lacks it).
func withNetRaw(spec map[string]any) {
	caps := spec["process"].(map[string]any)["capabilities"].(map[string]any)
	for _, set := range []string{"bounding", "effective", "permitted"} {
		caps[set] = append(caps[set].([]any), "CAP_NET_RAW")
	}
}

// bundleIn writes a bundle of a sandboxed container running script in
// the named network namespace, with CAP_NET_RAW if netRaw.
func bundleIn(t *testing.T, n *node, netns string, netRaw bool, script string) string {
	t.Helper()
	dir := bundle(t, sandboxedAnn, n.hooks(), script)
	editSpec(t, dir, inNetns(netns))
	if netRaw {
		editSpec(t, dir, withNetRaw)
	}
	return dir
}

// inNetns runs the container in the named network namespace.
func inNetns(name string) func(spec map[string]any) {
	return func(spec map[string]any) {
		for _, ns := range spec["linux"].(map[string]any)["namespaces"].([]any) {
			if ns := ns.(map[string]any); ns["type"] == "network" {
				ns["path"] = "/var/run/netns/" + name
			}
		}
	}
}

// namedNetns makes a network namespace for the test, named prefix and
// the test's pid, with eth0 a veth whose other end (NAMEa) is the host's,
// then runs cmds (NAME standing for its name) and returns its name. Its
// links NAMEa, NAMEb and NAMEx go with it.
func namedNetns(t *testing.T, prefix string, cmds ...string) string {
	t.Helper()
	name := fmt.Sprintf("%s%d", prefix, os.Getpid())
	t.Cleanup(func() {
		exec.Command("ip", "netns", "del", name).Run()
		for _, end := range []string{"a", "b", "x"} {
			exec.Command("ip", "link", "del", name+end).Run()
		}
	})
	for _, cmd := range append([]string{"ip netns add NAME", "ip link add NAMEa type veth peer name eth0 netns NAME"}, cmds...) {
		cmd = strings.ReplaceAll(cmd, "NAME", name)
		if out, err := exec.Command("sh", "-c", cmd).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v\n%s", cmd, err, out)
		}
	}
	return name
}

// The veths beside cf0 are guarded from the host, each of them, and a
// container keeping CAP_NET_RAW may attach or join the namespace; a
// tunnel whose outer packets the namespace routes itself (a loaded ipip
// module's tunl0 in every namespace; vxlan here, the kernel the tests
// run on having none of those) is no other interface. A namespace with
// an interface that cannot be guarded so (a tunnel made on the host and
// moved in) is not guarded: a container keeping NET_RAW there is
// refused, the first to attach it and any that would join it, while
// containers without it run sandboxed.
func TestContainersBesideOtherInterfaces(t *testing.T) {
	n := startNode(t)
	state := t.TempDir()
	container := func(id, netns string, netRaw bool, script string) result {
		t.Helper()
		return oci(t, "runc", state, "run", "--bundle", bundleIn(t, n, netns, netRaw, script), id)
	}
	// holder runs a container in netns until the test ends.
	holder := func(id, netns string, netRaw bool) {
		t.Helper()
		startDetached(t, state, bundleIn(t, n, netns, netRaw, "sleep 600"), id)
	}
	guarded := func(id string) any {
		if sb := n.sandbox(t, id); sb != nil {
			return sb["guarded"]
		}
		return "no sandbox"
	}

	tunnel := namedNetns(t, "cfgt", "ip link add NAMEb type veth peer name eth1 netns NAME",
		"ip -n NAME link add vx0 type vxlan id 7 dstport 4789 remote 192.0.2.7")
	holder("cf-guarded", tunnel, true)
	if g := guarded("cf-guarded"); g != true {
		t.Errorf("a container keeping NET_RAW beside two veths and a tunnel routed in its namespace: guarded %v", g)
	}
	if out, _ := exec.Command("nft", "list", "table", "inet", "childflow-guard").CombinedOutput(); !strings.Contains(string(out), "chain from-cf-guarded {") ||
		!strings.Contains(string(out), "chain from-cf-guarded+eth1 {") {
		t.Errorf("the guards of the container's two veths:\n%s", out)
	}
	if r := container("cf-guarded-join", tunnel, true, "echo RAN"); r.code != 0 || !strings.Contains(r.stdout, "RAN") {
		t.Errorf("a container keeping NET_RAW joining a guarded sandbox: %v", r)
	}

	// A vxlan made on the host and moved in sends from the host.
	two := namedNetns(t, "cfng", "ip link add NAMEx type vxlan id 8 dstport 4789 remote 192.0.2.8", "ip link set NAMEx netns NAME")
	r := container("cf-unguarded-raw", two, true, "echo RAN")
	if r.code == 0 || strings.Contains(r.stdout, "RAN") || !strings.Contains(r.stderr, "has CAP_NET_RAW") ||
		!strings.Contains(r.stderr, two+"x is a vxlan, not a veth: childflow cannot guard it from the host") {
		t.Errorf("a container keeping NET_RAW beside two interfaces: %v", r)
	}
	holder("cf-unguarded", two, false)
	r = container("cf-unguarded-join-raw", two, true, "echo RAN")
	if r.code == 0 || strings.Contains(r.stdout, "RAN") || !strings.Contains(r.stderr, "has CAP_NET_RAW and another network interface") {
		t.Errorf("a container keeping NET_RAW joining an unguarded sandbox: %v", r)
	}
	r = container("cf-unguarded-join", two, false, probe)
	if r.code != 0 {
		t.Errorf("a container without NET_RAW joining an unguarded sandbox: %v", r)
	}
	wantLines(t, r.stdout, "reach 203.0.113.10", "blocked 203.0.113.20", ipv6Only("blocked 2001:db8::20"), "has-cf0")
	if g := guarded("cf-unguarded"); g != nil {
		t.Errorf("the sandbox beside two interfaces: guarded %v", g)
	}
}

// A namespace can outlive the container that sandboxed it (a named one,
// a pod's pinned one). Once no process is left in it, it is left as it
// was found, so the next container sandboxes it again; while processes
// are left (containers that joined), the sandbox serves them, guarded,
// and takes containers that join it.
func TestANamespaceThatOutlivesItsContainer(t *testing.T) {
	n := startNode(t)
	name := namedNetns(t, "cfol", "ip addr add 198.51.100.1/30 dev NAMEa", "ip link set NAMEa up",
		"ip -n NAME addr add 198.51.100.2/30 dev eth0", "ip -n NAME link set eth0 up", "ip -n NAME link set lo up",
		"ip -n NAME route add default via 198.51.100.1")
	inside := func() string {
		out, _ := exec.Command("sh", "-c", "ip -n "+name+" -o link; ip -n "+name+" route; ip -n "+name+" rule; ip netns exec "+name+" nft list tables").CombinedOutput()
		return string(out)
	}
	found := inside()
	state := t.TempDir()
	container := func(id string) {
		t.Helper()
		r := oci(t, "runc", state, "run", "--bundle", bundleIn(t, n, name, false, probe), id)
		if r.code != 0 {
			t.Fatalf("container %s: %v", id, r)
		}
		wantLines(t, r.stdout, "reach 203.0.113.10", "blocked 203.0.113.20", ipv6Only("blocked 2001:db8::20"), "has-cf0")
		eventually(t, "container "+id+"'s sandbox to be detached", func() bool { return len(n.records(t)) == 0 })
	}
	container("cf-outlived")
	if now := inside(); now != found {
		t.Errorf("the namespace after its container:\n%s\nas found:\n%s", now, found)
	}
	container("cf-outlived-again")

	// A process left in the namespace (a container that joined, a pod's
	// infra container) keeps the sandbox, its policy and its guard from
	// the host, until it is gone: its raw frames stay in.
	setForTheTest(t, "/proc/sys/net/ipv4/ip_forward", "1")
	var left *exec.Cmd
	leave := func() {
		t.Helper()
		left = exec.Command("ip", "netns", "exec", name, "sleep", "600")
		if err := left.Start(); err != nil {
			t.Fatal(err)
		}
		eventually(t, "the process left to enter the namespace", func() bool {
			return netnsInode(t, fmt.Sprintf("/proc/%d/ns/net", left.Process.Pid)) == netnsInode(t, "/var/run/netns/"+name)
		})
	}
	defer func() {
		if left != nil && left.Process != nil {
			left.Process.Kill()
			left.Wait()
		}
	}()
	rawFrame := func() string { return rawFrameOn(t, "eth0", name+"a", left.Process.Pid, "198.51.100.2") }
	sandboxedLeft := func() {
		t.Helper()
		out, _ := exec.Command("ip", "netns", "exec", name, "sh", "-c", probe).CombinedOutput()
		wantLines(t, string(out), "reach 203.0.113.10", "blocked 203.0.113.20", ipv6Only("blocked 2001:db8::20"), "has-cf0")
	}
	adoptedAlone := func(id string) {
		t.Helper()
		if sbs := n.sandboxes(t); len(sbs) != 1 || sbs[0]["id"] != id || sbs[0]["adopted"] != true {
			t.Fatalf("the restarted daemon's sandboxes: %v, want %s adopted", sbs, id)
		}
	}
	endsWithTheProcessLeft := func(id string) {
		t.Helper()
		left.Process.Kill()
		left.Wait()
		eventually(t, "sandbox "+id+" to end with the last process in its namespace", func() bool { return len(n.records(t)) == 0 })
		if now := inside(); now != found {
			t.Errorf("the namespace once its last process was gone:\n%s\nas found:\n%s", now, found)
		}
		if out, _ := exec.Command("nft", "list", "ruleset").CombinedOutput(); strings.Contains(string(out), id) {
			t.Errorf("the guard of %s stayed after its sandbox ended:\n%s", id, out)
		}
	}

	leave()
	if out := rawFrame(); out != "escaped" {
		t.Fatalf("a raw frame from the namespace without a sandbox: %s, want escaped (the probe works)", out)
	}
	r := oci(t, "runc", state, "run", "--bundle", bundleIn(t, n, name, false, probe), "cf-left")
	if r.code != 0 {
		t.Fatalf("container cf-left: %v", r)
	}
	eventually(t, "the sandbox to linger", func() bool {
		sbs := n.sandboxes(t)
		return len(sbs) == 1 && sbs[0]["id"] == "cf-left" && sbs[0]["lingering"] == true
	})
	if r := run(t, root, "sandboxes", "--socket", n.socket); !strings.Contains(r.stdout, "oci-hook (lingering)") {
		t.Errorf("childflow sandboxes does not show the sandbox lingering: %v", r)
	}
	if rec, _ := os.ReadFile(filepath.Join(n.state, "sandboxes", "cf-left.json")); !strings.Contains(string(rec), fmt.Sprintf(`"netns":"/proc/%d/ns/net"`, left.Process.Pid)) {
		t.Errorf("the lingering sandbox's record does not name the process left: %s", rec)
	}
	if out := rawFrame(); out != "contained" {
		t.Errorf("a raw frame from the namespace once its container was gone, a process left in it: %s", out)
	}
	sandboxedLeft()
	// A daemon restarted meanwhile finds the namespace through that process.
	n.kill(t)
	n.start(t)
	adoptedAlone("cf-left")
	r = oci(t, "runc", state, "run", "--bundle", bundleIn(t, n, name, false, probe), "cf-left-join")
	if r.code != 0 {
		t.Fatalf("a container joining the lingering sandbox: %v", r)
	}
	wantLines(t, r.stdout, "reach 203.0.113.10", "blocked 203.0.113.20", ipv6Only("blocked 2001:db8::20"), "has-cf0")
	endsWithTheProcessLeft("cf-left")

	// The same when the container stops while no daemon runs: the hook
	// leaves the guard to the processes left, and the daemon, back,
	// adopts the sandbox through one of them.
	leave()
	startDetached(t, state, bundleIn(t, n, name, false, "sleep 600"), "cf-down")
	n.kill(t)
	if r := oci(t, "runc", state, "delete", "--force", "cf-down"); r.code != 0 {
		t.Fatalf("deleting the container while no daemon runs: %v", r)
	}
	if out := rawFrame(); out != "contained" {
		t.Errorf("a raw frame from the namespace once its container was gone while no daemon ran: %s", out)
	}
	n.start(t)
	adoptedAlone("cf-down")
	sandboxedLeft()
	endsWithTheProcessLeft("cf-down")

	// A daemon in a PID namespace of its own can neither reach the
	// containers' namespaces by their host pids nor tell whether a
	// process is left in one: it says so.
	n.stop()
	n.ownPIDs = true
	n.start(t)
	eventually(t, "a daemon in a PID namespace of its own to say so", func() bool {
		return strings.Contains(n.log.String(), "not in the host's PID namespace")
	})
}

// attributed says whether log has a connect_attempt to dst owned by comm.
func attributed(log, dst, comm string) bool {
	for _, line := range strings.Split(log, "\n") {
		if strings.Contains(line, `"event":"connect_attempt"`) && strings.Contains(line, `"dst":"`+dst+`"`) &&
			strings.Contains(line, `"comm":"`+comm+`"`) && strings.Contains(line, `"pid":`) {
			return true
		}
	}
	return false
}

// A container that loops on denied connections does not fill the node's
// disk: its flow log is rotated at --flow-log-max-size, and
// --flow-log-max-files are kept, whole lines each, the newest events.
func TestContainerFlowLogIsBounded(t *testing.T) {
	n := startNode(t, "--flow-log-max-size", "16KiB", "--flow-log-max-files", "2")
	script := `i=0; while [ $i -lt 300 ]; do nc -w 1 203.0.113.20 80 </dev/null 2>/dev/null; i=$((i+1)); done
printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 3 203.0.113.10 80 | grep -q hello && echo last-reached`
	r := oci(t, "runc", t.TempDir(), "run", "--bundle", bundle(t, sandboxedAnn, n.hooks(), script), "cf-bounded")
	if r.code != 0 || !strings.Contains(r.stdout, "last-reached") {
		t.Fatalf("container: %v", r)
	}
	entries, _ := os.ReadDir(n.flows)
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if strings.Join(names, " ") != "cf-bounded.jsonl cf-bounded.jsonl.1" {
		t.Fatalf("flow log files %v, want the current one and one rotated", names)
	}
	var violations int
	var last map[string]any
	for _, name := range []string{"cf-bounded.jsonl.1", "cf-bounded.jsonl"} {
		b, _ := os.ReadFile(filepath.Join(n.flows, name))
		if len(b) > 17<<10 {
			t.Errorf("%s holds %d bytes, bound 16 KiB", name, len(b))
		}
		for _, line := range strings.Split(strings.TrimSuffix(string(b), "\n"), "\n") {
			var ev map[string]any
			if err := json.Unmarshal([]byte(line), &ev); err != nil || ev["schema_version"] != 1.0 {
				t.Fatalf("%s: line %q: %v", name, line, err)
			}
			if ev["event"] == "policy_violation" {
				violations++
			}
			last = ev
		}
	}
	if violations == 0 || violations >= 300 || last["event"] != "flow_end" || last["dst"] != "203.0.113.10:80" {
		t.Errorf("kept %d of 300 violations, last event %v: want some, and the newest", violations, last)
	}
}

// The logs of sandboxes that are gone are removed beyond
// --flow-log-retain, oldest first; a running sandbox's never are.
func TestGoneSandboxesLogsAreRetainedWithinTheBudget(t *testing.T) {
	n := startNode(t, "--flow-log-retain", "1")
	state := t.TempDir()
	startDetached(t, state, bundle(t, sandboxedAnn, n.hooks(), "sleep 600"), "cf-running")
	if r := oci(t, "runc", state, "exec", "cf-running", "sh", "-c", probe); !strings.Contains(r.stdout, "reach 203.0.113.10") {
		t.Fatalf("running container: %v", r)
	}
	if r := oci(t, "runc", state, "run", "--bundle", bundle(t, sandboxedAnn, n.hooks(), probe), "cf-gone"); !strings.Contains(r.stdout, "reach 203.0.113.10") {
		t.Fatalf("short container: %v", r)
	}
	if _, err := os.Stat(filepath.Join(n.flows, "cf-gone.jsonl")); err == nil {
		t.Errorf("the log of a sandbox that is gone was kept beyond --flow-log-retain 1")
	}
	if b, err := os.ReadFile(filepath.Join(n.flows, "cf-running.jsonl")); err != nil || !strings.Contains(string(b), "policy_violation") {
		t.Errorf("the running sandbox's log was pruned: %v", err)
	}
}

// The node's sandboxes hold at most --max-flows flows together: they
// share the node's ephemeral ports, and a few of them at their own limit
// would take every one, leaving the node none for its own sockets.
func TestSandboxesShareTheNodesFlowLimit(t *testing.T) {
	n := startNode(t, "--max-flows", "20")
	script := `i=0; while [ $i -lt 30 ]; do { sleep 3 | nc -w 5 203.0.113.10 80 >/dev/null 2>&1; echo "exit $?" >>/tmp/r; } & i=$((i+1)); done; wait
echo "relayed $(grep -c 'exit 0' /tmp/r) refused $(grep -vc 'exit 0' /tmp/r)"`
	r := oci(t, "runc", t.TempDir(), "run", "--bundle", bundle(t, sandboxedAnn, n.hooks(), script), "cf-flows")
	var relayed, refused int
	if _, err := fmt.Sscanf(r.stdout[strings.Index(r.stdout, "relayed"):], "relayed %d refused %d", &relayed, &refused); err != nil || relayed == 0 || relayed > 20 || relayed+refused != 30 {
		t.Fatalf("want at most 20 of 30 held connections relayed, the rest refused: %v (%v)", r, err)
	}
	t.Logf("relayed %d, refused %d", relayed, refused)
	log, _ := os.ReadFile(filepath.Join(n.flows, "cf-flows.jsonl"))
	if !strings.Contains(string(log), "the daemon's limit (--max-flows)") {
		t.Errorf("flow log lacks the limit's runtime_failure:\n%s", log)
	}
}

func TestBadAnnotationStopsTheContainer(t *testing.T) {
	n := startNode(t)
	for _, tc := range []struct{ key, value, want string }{
		{"childflow.dev/allow-cidrs", "203.0.113.0/99", `invalid annotation childflow.dev/allow-cidrs "203.0.113.0/99"`},
		{"childflow.dev/default-polcy", "deny", "unknown annotation childflow.dev/default-polcy"},
		{"childflow.dev/policy", "flow_log: /etc/shadow", `key "flow_log" cannot be set by an annotation`},
		// A slip of the prefix is no way to an unsandboxed container.
		{"Childflow.dev/default-policy", "deny", "unknown annotation Childflow.dev/default-policy"},
		{"childflow.io/default-policy", "deny", "unknown annotation childflow.io/default-policy"},
	} {
		state := t.TempDir()
		r := oci(t, "runc", state, "run", "--bundle", bundle(t, map[string]string{tc.key: tc.value}, n.hooks(), "echo RAN"), "cf-bad")
		// runc quotes the hook's stderr in its own message.
		stderr := strings.ReplaceAll(r.stderr, `\"`, `"`)
		if r.code == 0 || strings.Contains(r.stdout, "RAN") || !strings.Contains(stderr, tc.want) {
			t.Errorf("%s=%s: want a failed start naming it (%q): %v", tc.key, tc.value, tc.want, r)
		}
		oci(t, "runc", state, "delete", "--force", "cf-bad")
	}
	if l := n.sandboxes(t); len(l) != 0 || len(n.records(t)) != 0 {
		t.Errorf("a failed start left sandboxes %v, records %v", l, n.records(t))
	}
}

func TestDaemonRestartKeepsTheSandboxPolicy(t *testing.T) {
	n := startNode(t)
	state := t.TempDir()
	id := "cf-restart"
	startDetached(t, state, bundle(t, sandboxedAnn, n.hooks(), "sleep 600"), id)
	check := func(when string) {
		r := oci(t, "runc", state, "exec", id, "sh", "-c", probe)
		wantLines(t, r.stdout, "reach 203.0.113.10", "blocked 203.0.113.20", "blocked 2001:db8::20")
		if t.Failed() {
			t.Fatalf("%s: %v\ndaemon log:\n%s", when, r, n.log)
		}
	}
	check("before the restart")
	n.kill(t)
	r := oci(t, "runc", state, "exec", id, "sh", "-c", "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 203.0.113.20 80 | grep -c hello")
	if strings.TrimSpace(r.stdout) != "0" {
		t.Fatalf("with the daemon down the denied host answered: %v", r)
	}
	n.start(t)
	list := n.sandboxes(t)
	if len(list) != 1 || list[0]["id"] != id || list[0]["adopted"] != true {
		t.Fatalf("after the restart: %v\n%s", list, n.log)
	}
	check("after the restart")
	// runc exec's processes are no descendants of the container's init.
	if log, _ := os.ReadFile(filepath.Join(n.flows, id+".jsonl")); !attributed(string(log), "203.0.113.10:80", "nc") {
		t.Errorf("the exec'd probes' connections are not attributed to nc:\n%.1500s", log)
	}

	oci(t, "runc", state, "kill", id, "KILL")
	eventually(t, "the container to stop", func() bool {
		return strings.Contains(oci(t, "runc", state, "state", id).stdout, `"stopped"`)
	})
	if r := oci(t, "runc", state, "delete", id); r.code != 0 {
		t.Fatalf("runc delete: %v", r)
	}
	if l := n.sandboxes(t); len(l) != 0 || len(n.records(t)) != 0 {
		t.Errorf("after runc delete (poststop): sandboxes %v, records %v", l, n.records(t))
	}
}

func TestHookStartsAnEngineWhereNoDaemonRuns(t *testing.T) {
	requireRoot(t)
	n := &node{dir: t.TempDir()}
	n.socket, n.state = filepath.Join(n.dir, "engine.sock"), filepath.Join(n.dir, "state")
	ann := map[string]string{
		"childflow.dev/default-policy": "deny",
		"childflow.dev/allow-domains":  "allowed.test",
		"childflow.dev/dns":            "203.0.113.53",
	}
	script := `printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 3 allowed.test 80 | grep -q hello && echo reach-allowed
printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 3 denied.test 80 | grep -q hello && echo reach-denied || echo blocked-denied`
	r := oci(t, "runc", t.TempDir(), "run", "--bundle", bundle(t, ann, n.hooks(), script), "cf-nodaemon")
	if r.code != 0 {
		b, _ := os.ReadFile(filepath.Join(n.state, "daemon.log"))
		t.Fatalf("%v\ndaemon log:\n%s", r, b)
	}
	wantLines(t, r.stdout, "reach-allowed", "blocked-denied")
	eventually(t, "the per-container engine to exit", func() bool { return len(processes(n.socket)) == 0 })
	if len(n.records(t)) != 0 {
		t.Errorf("records left: %v", n.records(t))
	}
	if _, err := os.Stat(n.socket); err == nil {
		t.Errorf("socket %s left behind", n.socket)
	}
}

// startDetached runs a container in the background (runc run --detach),
// deleted when the test ends. Its output goes to a file: the container
// keeps runc's stdio, and a pipe would not close while it runs.
func startDetached(t *testing.T, state, bundle, id string) {
	t.Helper()
	out, _ := os.Create(filepath.Join(t.TempDir(), "out"))
	defer out.Close()
	cmd := exec.Command("runc", "--root", state, "run", "--detach", "--bundle", bundle, id)
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Run(); err != nil {
		b, _ := os.ReadFile(out.Name())
		t.Fatalf("runc run -d: %v\n%s", err, b)
	}
	t.Cleanup(func() { oci(t, "runc", state, "delete", "--force", id) })
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for i := 0; i < 100; i++ {
		if cond() {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("timed out waiting for %s", what)
}

// nodeLoopback is a TCP and a UDP listener on the node's 127.0.0.1 that
// count what reaches them.
type nodeLoopback struct {
	tcp     net.Listener
	udp     net.PacketConn
	port    string
	touched chan string
}

func listenNodeLoopback(t *testing.T) *nodeLoopback {
	t.Helper()
	l := &nodeLoopback{touched: make(chan string, 64)}
	var err error
	if l.tcp, err = net.Listen("tcp4", "127.0.0.1:0"); err != nil {
		t.Fatal(err)
	}
	l.port = strconv.Itoa(l.tcp.Addr().(*net.TCPAddr).Port)
	if l.udp, err = net.ListenPacket("udp4", "127.0.0.1:"+l.port); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.tcp.Close(); l.udp.Close() })
	go func() {
		for {
			c, err := l.tcp.Accept()
			if err != nil {
				return
			}
			l.touched <- "tcp from " + c.RemoteAddr().String()
			c.Write([]byte("node-local secret\n"))
			c.Close()
		}
	}()
	go func() {
		b := make([]byte, 2048)
		for {
			n, from, err := l.udp.ReadFrom(b)
			if err != nil {
				return
			}
			l.touched <- fmt.Sprintf("udp from %s: %q", from, b[:n])
		}
	}()
	return l
}

func (l *nodeLoopback) drain() []string {
	var out []string
	for {
		select {
		case s := <-l.touched:
			out = append(out, s)
		default:
			return out
		}
	}
}

// Whoever writes a container's annotations gets no way into the node's
// loopback, where services trust local callers: not through an
// allow-cidr naming the gateway (which stands for the host's loopback
// under `childflow exec`) or the loopback itself, nor through a dns or
// proxy annotation pointing there. What names the loopback outright
// stops the container; the gateway just leads nowhere.
func TestAnnotationsDoNotReachTheNodesLoopback(t *testing.T) {
	n := startNode(t)
	lo := listenNodeLoopback(t)
	gateways := "10.87.0.0/24, 172.29.87.0/24, 192.168.187.0/24, 10.254.87.0/24, 100.87.0.0/24"
	dial := func(host string) string {
		return `echo hi | nc -w 3 ` + host + ` ` + lo.port + ` | grep -q secret && echo reached || echo blocked`
	}
	for _, tc := range []struct {
		name, key, value, script string
		starts                   bool // else refused, naming the annotation
	}{
		{"allow-cidrs naming the gateway", "childflow.dev/allow-cidrs", gateways,
			`gw=$(ip -4 route | grep default | { read a b c d; echo $c; }); ` + dial("$gw"), true},
		{"allow-cidrs naming the loopback", "childflow.dev/allow-cidrs", "127.0.0.0/8", dial("::127.0.0.1"), false},
		{"dns at the loopback", "childflow.dev/dns", "127.0.0.1:" + lo.port, `nslookup leak.test; echo ran`, false},
		{"proxy at the loopback", "childflow.dev/proxy", "http://127.0.0.1:" + lo.port, dial("203.0.113.10"), false},
		{"proxy named localhost", "childflow.dev/proxy", "socks5://localhost:" + lo.port, dial("203.0.113.10"), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			state := t.TempDir()
			ann := map[string]string{tc.key: tc.value}
			r := oci(t, "runc", state, "run", "--bundle", bundle(t, ann, n.hooks(), tc.script), "cf-loopback")
			oci(t, "runc", state, "delete", "--force", "cf-loopback")
			if got := lo.drain(); len(got) > 0 || strings.Contains(r.stdout, "reached") {
				t.Fatalf("the node's loopback was reached: %v\n%v", got, r)
			}
			if tc.starts {
				wantLines(t, r.stdout, "blocked")
				log, _ := os.ReadFile(filepath.Join(n.flows, "cf-loopback.jsonl"))
				if !strings.Contains(string(log), `"reason_code":"host_address"`) {
					t.Errorf("flow log lacks the gateway's host_address violation:\n%s", log)
				}
				return
			}
			stderr := strings.ReplaceAll(r.stderr, `\"`, `"`)
			if r.code == 0 || !strings.Contains(stderr, "invalid annotation "+tc.key) || !strings.Contains(stderr, "loopback") {
				t.Errorf("want a failed start naming %s and the loopback: %v", tc.key, r)
			}
		})
	}
	if l := n.sandboxes(t); len(l) != 0 || len(n.records(t)) != 0 {
		t.Errorf("sandboxes %v, records %v left", l, n.records(t))
	}
}

// The node daemon opens every connection from the node, where the
// instance metadata service answers with the node's own identity (its
// cloud role, its service account), which a pod's own traffic may not get
// (IMDSv2's hop limit, GKE's metadata server): a container never reaches
// it, whatever its annotations say. childflow exec, on the caller's own
// machine, still does unless --block-metadata. Here the testnet's web
// server stands in for it, at 169.254.169.254 routed from the node only.
func TestContainersDoNotGetTheNodesIdentity(t *testing.T) {
	n := startNode(t)
	ns := testnet + "-inet"
	for _, c := range [][]string{
		{"ip", "netns", "exec", ns, "ip", "addr", "add", "169.254.169.254/32", "dev", "lo"},
		{"ip", "route", "add", "169.254.169.254/32", "via", "203.0.113.10"},
	} {
		if r := execute(t, c...); r.code != 0 {
			t.Fatal(r)
		}
	}
	t.Cleanup(func() {
		execute(t, "ip", "route", "del", "169.254.169.254/32")
		execute(t, "ip", "netns", "exec", ns, "ip", "addr", "del", "169.254.169.254/32", "dev", "lo")
	})
	get := `printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 3 169.254.169.254 80 | grep -q hello && echo reached || echo blocked`
	if r := run(t, root, "--", "sh", "-c", get); !strings.Contains(r.stdout, "reached") {
		t.Fatalf("childflow exec does not reach the stand-in metadata service: %v", r)
	}
	for _, ann := range []map[string]string{
		{"childflow.dev/enabled": "true"},
		{"childflow.dev/allow-cidrs": "169.254.169.254/32", "childflow.dev/block-metadata": "false"},
	} {
		r := oci(t, "runc", t.TempDir(), "run", "--bundle", bundle(t, ann, n.hooks(), get), "cf-identity")
		if !strings.Contains(r.stdout, "blocked") {
			t.Errorf("%v: the container reached the node's metadata service: %v", ann, r)
		}
		log, _ := os.ReadFile(filepath.Join(n.flows, "cf-identity.jsonl"))
		if !strings.Contains(string(log), `"reason_code":"metadata_endpoint"`) {
			t.Errorf("%v: flow log lacks the metadata_endpoint violation:\n%s", ann, log)
		}
	}
	// Nor as the container's resolver or proxy, which the node would
	// talk to for it.
	for key, value := range map[string]string{
		"childflow.dev/dns":   "169.254.169.254",
		"childflow.dev/proxy": "http://[::ffff:169.254.169.254]:80",
	} {
		r := oci(t, "runc", t.TempDir(), "run", "--bundle", bundle(t, map[string]string{key: value}, n.hooks(), "echo started"), "cf-identity")
		stderr := strings.ReplaceAll(r.stderr, `\"`, `"`)
		if r.code == 0 || strings.Contains(r.stdout, "started") || !strings.Contains(stderr, "invalid annotation "+key) || !strings.Contains(stderr, "identity") {
			t.Errorf("%s: %s: want a failed start naming the annotation and the identity service: %v", key, value, r)
		}
	}
}

// serveInTestnet runs a server of testdata's in the testnet's internet
// namespace until the test ends, once it says "listening"; the rest of
// what it prints is the test's to read.
func serveInTestnet(t *testing.T, argv ...string) *bufio.Scanner {
	t.Helper()
	server := exec.Command("ip", append([]string{"netns", "exec", testnet + "-inet"}, argv...)...)
	out, _ := server.StdoutPipe()
	if err := server.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { server.Process.Kill(); server.Wait() })
	lines := bufio.NewScanner(out)
	if !lines.Scan() || lines.Text() != "listening" {
		t.Fatalf("%v: %q", argv, lines.Text())
	}
	return lines
}

// A container that uploads and exits at once leaves the tail of its data
// in the engine when its runtime detaches it: the daemon relays it first.
func TestContainersUploadTailArrives(t *testing.T) {
	n := startNode(t)
	lines := serveInTestnet(t, "python3", "../testdata/slowreader.py", "203.0.113.10", "9101")
	const size = 8 << 20
	r := oci(t, "runc", t.TempDir(), "run", "--bundle",
		bundle(t, sandboxedAnn, n.hooks(), fmt.Sprintf("nc 203.0.113.10 9101 -e head -c %d /dev/zero", size)), "cf-upload")
	if r.code != 0 {
		t.Fatalf("container: %v", r)
	}
	got := make(chan string, 1)
	go func() { lines.Scan(); got <- lines.Text() }()
	select {
	case n := <-got:
		if n != fmt.Sprint(size) {
			t.Errorf("the server got %s of the %d bytes sent", n, size)
		}
	case <-time.After(15 * time.Second):
		t.Fatal("the server got no end of the upload")
	}
}

// A container's hosts file (the one its runtime mounts at /etc/hosts, as
// docker's --add-host writes, else its image's) names addresses for the
// domain rules, as the engine's answers do.
func TestContainersHostsFileNamesCount(t *testing.T) {
	n := startNode(t)
	const get = `printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 3 %s 80 | grep -q 'hello from the test internet' && echo reach %[1]s || echo blocked %[1]s`
	// Allowed by name under a default deny, from a mounted file.
	dir := bundle(t, map[string]string{"childflow.dev/default-policy": "deny", "childflow.dev/allow-domains": "pinned.test"},
		n.hooks(), fmt.Sprintf(get, "web.pinned.test"))
	hosts := filepath.Join(t.TempDir(), "hosts")
	os.WriteFile(hosts, []byte("203.0.113.10 web.pinned.test\n"), 0o644)
	var spec map[string]any
	b, _ := os.ReadFile(filepath.Join(dir, "config.json"))
	json.Unmarshal(b, &spec)
	spec["mounts"] = append(spec["mounts"].([]any), map[string]any{"destination": "/etc/hosts", "type": "bind", "source": hosts, "options": []string{"rbind", "ro"}})
	b, _ = json.Marshal(spec)
	os.WriteFile(filepath.Join(dir, "config.json"), b, 0o644)
	r := oci(t, "runc", t.TempDir(), "run", "--bundle", dir, "cf-hosts-mounted")
	if r.code != 0 {
		t.Fatalf("container: %v", r)
	}
	wantLines(t, r.stdout, "reach web.pinned.test")
	// Denied by name under the default allow, from the image's file.
	dir = bundle(t, map[string]string{"childflow.dev/deny-domains": "denied.test"}, n.hooks(), fmt.Sprintf(get, "web.denied.test"))
	os.WriteFile(filepath.Join(dir, "rootfs/etc/hosts"), []byte("203.0.113.10 web.denied.test\n"), 0o644)
	r = oci(t, "runc", t.TempDir(), "run", "--bundle", dir, "cf-hosts-image")
	if r.code != 0 {
		t.Fatalf("container: %v", r)
	}
	wantLines(t, r.stdout, "blocked web.denied.test")
}
