package steer

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// The guard's topology, all in namespaces of the test's own: a node
// forwarding between a pod (10.77.0.2, fd77::2) and a remote host
// (198.51.100.2, 2001:db8:77::2). The pod has no rules of its own, so
// its plain sockets send the very frames a process with CAP_NET_RAW
// writes around a sandboxed pod's rules.
const (
	nodeNS, podNS, remoteNS = "cfhg-node", "cfhg-pod", "cfhg-remote"
)

func guardTopology(t *testing.T, bridged bool) (hostIf, gatewayMAC string) {
	t.Helper()
	down := func() {
		for _, n := range []string{nodeNS, podNS, remoteNS} {
			exec.Command("ip", "netns", "del", n).Run()
		}
	}
	down()
	t.Cleanup(down)
	podSide := "hg-pod" // the node's interface toward the pod
	cmds := [][]string{
		{"netns", "add", nodeNS}, {"netns", "add", podNS}, {"netns", "add", remoteNS},
		{"-n", nodeNS, "link", "add", "hg-pod", "type", "veth", "peer", "name", "eth0", "netns", podNS},
		{"-n", nodeNS, "link", "add", "hg-rem", "type", "veth", "peer", "name", "eth0", "netns", remoteNS},
	}
	if bridged {
		podSide = "hg-br"
		cmds = append(cmds, []string{"-n", nodeNS, "link", "add", "hg-br", "type", "bridge"},
			[]string{"-n", nodeNS, "link", "set", "hg-pod", "master", "hg-br"},
			[]string{"-n", nodeNS, "link", "set", "hg-br", "up"})
	}
	cmds = append(cmds, [][]string{
		{"-n", nodeNS, "addr", "add", "10.77.0.1/24", "dev", podSide},
		{"-n", nodeNS, "addr", "add", "fd77::1/64", "dev", podSide, "nodad"},
		{"-n", nodeNS, "addr", "add", "198.51.100.1/24", "dev", "hg-rem"},
		{"-n", nodeNS, "addr", "add", "2001:db8:77::1/64", "dev", "hg-rem", "nodad"},
		{"-n", podNS, "addr", "add", "10.77.0.2/24", "dev", "eth0"},
		{"-n", podNS, "addr", "add", "fd77::2/64", "dev", "eth0", "nodad"},
		{"-n", remoteNS, "addr", "add", "198.51.100.2/24", "dev", "eth0"},
		{"-n", remoteNS, "addr", "add", "2001:db8:77::2/64", "dev", "eth0", "nodad"},
	}...)
	for _, n := range []string{nodeNS, podNS, remoteNS} {
		cmds = append(cmds, []string{"-n", n, "link", "set", "lo", "up"})
	}
	cmds = append(cmds, [][]string{
		{"-n", nodeNS, "link", "set", "hg-pod", "up"}, {"-n", nodeNS, "link", "set", "hg-rem", "up"},
		{"-n", podNS, "link", "set", "eth0", "up"}, {"-n", remoteNS, "link", "set", "eth0", "up"},
		{"-n", podNS, "route", "add", "default", "via", "10.77.0.1"},
		{"-n", podNS, "-6", "route", "add", "default", "via", "fd77::1"},
		{"-n", remoteNS, "route", "add", "default", "via", "198.51.100.1"},
		{"-n", remoteNS, "-6", "route", "add", "default", "via", "2001:db8:77::1"},
	}...)
	for _, args := range cmds {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	run(t, nodeNS, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
	// UDP echo servers: the remote host's and the node's on 7, the
	// node's on 53 (a resolver in a kept range), the pod's on 9000.
	serve(t, remoteNS, "7")
	serve(t, nodeNS, "7")
	serve(t, nodeNS, "53")
	serve(t, podNS, "9000")
	// Until the node's link-local address has passed DAD, it cannot
	// resolve the pod's IPv6 address.
	for i := 0; exec.Command("ip", "netns", "exec", podNS, "ping", "-c1", "-W1", "2001:db8:77::2").Run() != nil; i++ {
		if i == 10 {
			t.Fatal("the pod cannot reach the remote host over IPv6")
		}
	}
	mac, err := exec.Command("ip", "netns", "exec", nodeNS, "cat", "/sys/class/net/"+podSide+"/address").Output()
	if err != nil {
		t.Fatal(err)
	}
	return "hg-pod", strings.TrimSpace(string(mac))
}

// vethNode makes a node namespace, name, with a bridge, hg-br, and veths
// whose other ends stay there too: hg-a and hg-e routed, hg-b and hg-c
// the bridge's ports. in runs f in it.
func vethNode(t *testing.T, name string) (in func(f func() error)) {
	t.Helper()
	exec.Command("ip", "netns", "del", name).Run()
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	for _, args := range [][]string{
		{"netns", "add", name},
		{"-n", name, "link", "add", "hg-br", "type", "bridge"},
		{"-n", name, "link", "add", "hg-a", "type", "veth", "peer", "name", "hg-a-pod"},
		{"-n", name, "link", "add", "hg-b", "master", "hg-br", "type", "veth", "peer", "name", "hg-b-pod"},
		{"-n", name, "link", "add", "hg-c", "master", "hg-br", "type", "veth", "peer", "name", "hg-c-pod"},
		{"-n", name, "link", "add", "hg-e", "type", "veth", "peer", "name", "hg-e-pod"},
	} {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	return inNetns(t, openNetns(t, name))
}

// nodeNetns opens the node's namespace until the test's cleanups are
// done (theirs, registered after, run before it is closed).
func nodeNetns(t *testing.T) ns.NetNS { return openNetns(t, nodeNS) }

func openNetns(t *testing.T, name string) ns.NetNS {
	t.Helper()
	target, err := ns.GetNS("/run/netns/" + name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { target.Close() })
	return target
}

// inNetns runs f in target, failing the test on its error.
func inNetns(t *testing.T, target ns.NetNS) (in func(f func() error)) {
	return func(f func() error) {
		t.Helper()
		if err := target.Do(func(ns.NetNS) error { return f() }); err != nil {
			t.Fatal(err)
		}
	}
}

func run(t *testing.T, netns string, args ...string) {
	t.Helper()
	if out, err := exec.Command("ip", append([]string{"netns", "exec", netns}, args...)...).CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

func serve(t *testing.T, netns, port string) {
	t.Helper()
	cmd := exec.Command("ip", "netns", "exec", netns, "python3", "../../hack/udpecho.py", port, "::")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	// Until it listens, a datagram not echoed would prove nothing.
	until(t, "a UDP echo listening on port "+port+" in "+netns, netns, "-lun", "sport = :"+port)
}

// background runs args in netns until the test ends, its output in out.
// A child it leaves (a killed `timeout`'s) may hold its output open: the
// test's end waits a second for that, not for ever.
func background(t *testing.T, netns string, args ...string) (cmd *exec.Cmd, out *strings.Builder) {
	t.Helper()
	cmd = exec.Command("ip", append([]string{"netns", "exec", netns}, args...)...)
	out = &strings.Builder{}
	cmd.Stdout = out
	cmd.WaitDelay = time.Second
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	return cmd, out
}

// until waits for ss, run in netns with args, to list a socket.
func until(t *testing.T, what, netns string, args ...string) {
	t.Helper()
	for range 100 {
		if out, _ := exec.Command("ip", append([]string{"netns", "exec", netns, "ss", "-H"}, args...)...).Output(); len(out) > 0 {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("%s: not seen", what)
}

// echoed reports whether a UDP datagram from netns to addr came back.
func echoed(netns, addr, sourcePort string) bool {
	to := "UDP:" + addr
	if sourcePort != "" {
		to += ",sourceport=" + sourcePort + ",reuseaddr"
	}
	for range 3 { // the first datagram may wait for neighbour discovery
		out, _ := exec.Command("ip", "netns", "exec", netns, "sh", "-c", "echo ping | timeout 2 socat -T1 - "+to).Output()
		if strings.Contains(string(out), "ping") {
			return true
		}
	}
	return false
}

// solicited reports whether a neighbour solicitation the pod sends to
// the remote host's global address gets there.
func solicited(t *testing.T) bool {
	t.Helper()
	listen := exec.Command("ip", "netns", "exec", remoteNS, "python3", "../../test/testdata/ndprobe.py", "listen", "2")
	var out strings.Builder
	listen.Stdout = &out
	if err := listen.Start(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	run(t, podNS, "python3", "../../test/testdata/ndprobe.py", "send", "2001:db8:77::2")
	listen.Wait()
	return strings.Contains(out.String(), "got")
}

func TestHostGuardStopsFramesAroundThePodsRules(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root: namespaces, veths and nftables")
	}
	guards := Guards{Dir: t.TempDir()}
	for _, bridged := range []bool{false, true} {
		name := "routed veth"
		if bridged {
			name = "bridge port"
		}
		t.Run(name, func(t *testing.T) {
			hostIf, gatewayMAC := guardTopology(t, bridged)
			escapes := func() []string {
				var got []string
				for _, c := range []struct{ what, addr string }{
					{"to the remote host", "198.51.100.2:7"},
					{"to the remote host over IPv6", "[2001:db8:77::2]:7"},
					{"to a resolver in a kept range", "10.77.0.1:53"},
				} {
					if echoed(podNS, c.addr, "") {
						got = append(got, c.what)
					}
				}
				// A frame from the remote host's address, through the node
				// back to the pod, would make conntrack take the pod's next
				// datagram to the remote host for a reply.
				run(t, podNS, "python3", "../../test/testdata/rawudp.py", "198.51.100.2", "7", "10.77.0.2", "5555", gatewayMAC)
				time.Sleep(100 * time.Millisecond)
				if echoed(podNS, "198.51.100.2:7", "5555") {
					got = append(got, "to the remote host, after a frame from its address")
				}
				if solicited(t) {
					got = append(got, "a neighbour solicitation to the remote host")
				}
				return got
			}
			// Unguarded, every one gets through: the probes can see an escape.
			if got := escapes(); len(got) != 5 {
				t.Fatalf("without the guard only these got through: %q", got)
			}
			target := nodeNetns(t)
			err := target.Do(func(ns.NetNS) error {
				return guards.Install(HostGuard{
					ID: "0123456789abcdef", HostIf: hostIf,
					Pod:  []netip.Addr{netip.MustParseAddr("10.77.0.2"), netip.MustParseAddr("fd77::2")},
					Keep: []netip.Prefix{netip.MustParsePrefix("10.77.0.0/24"), netip.MustParsePrefix("fd77::/64")},
				})
			})
			if err != nil {
				t.Fatal(err)
			}
			if got := escapes(); len(got) != 0 {
				t.Errorf("guarded, the pod still got through %q", got)
			}
			defer func() {
				if t.Failed() || testing.Verbose() {
					out, _ := exec.Command("ip", "netns", "exec", nodeNS, "nft", "list", "ruleset").CombinedOutput()
					t.Logf("the node's ruleset:\n%s", out)
				}
			}()
			// What must still work: the kept ranges, and answering whoever
			// reached the pod.
			for _, c := range []struct{ what, netns, addr string }{
				{"the pod to the node", podNS, "10.77.0.1:7"},
				{"the pod to the node over IPv6", podNS, "[fd77::1]:7"},
				{"the remote host to the pod", remoteNS, "10.77.0.2:9000"},
				{"the remote host to the pod over IPv6", remoteNS, "[fd77::2]:9000"},
			} {
				if !echoed(c.netns, c.addr, "") {
					t.Errorf("guarded, no answer from %s", c.what)
				}
			}
		})
	}
}

// What a pod sent before its veth was guarded (an interface added to a
// running sandbox is guarded only once it is up) must not pass after
// it: neither a flow it opened then, nor one a frame with a forged
// source made conntrack take for the remote host's.
func TestHostGuardForgetsWhatThePodOpenedBeforeIt(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root: namespaces, veths and nftables")
	}
	guards := Guards{Dir: t.TempDir()}
	for _, bridged := range []bool{false, true} {
		name := "routed veth"
		if bridged {
			name = "bridge port"
		}
		t.Run(name, func(t *testing.T) {
			hostIf, gatewayMAC := guardTopology(t, bridged)
			// A node tracks connections (its NAT, its firewall, another
			// pod's routed guard); a namespace does once a rule asks.
			// It masquerades its pods, as docker's networks and the CNI
			// plugins' ipMasq do: what answers the pod's flows comes to
			// the node's address. But for one port, as pods with routed
			// addresses are not.
			run(t, nodeNS, "nft", "add table inet node; add chain inet node forward { type filter hook forward priority 0; }; add rule inet node forward ct state new counter; "+
				"add chain inet node nat { type nat hook postrouting priority 100; }; add rule inet node nat udp sport 5559 return; add rule inet node nat oifname hg-rem masquerade")
			if !echoed(podNS, "198.51.100.2:7", "5556") {
				t.Fatal("unguarded, the pod's flow to the remote host got no echo: the test shows nothing")
			}
			run(t, podNS, "python3", "../../test/testdata/rawudp.py", "198.51.100.2", "7", "10.77.0.2", "5557", gatewayMAC)
			// A flow whose answer comes once the pod is guarded.
			run(t, podNS, "sh", "-c", "echo late | socat -u - UDP:198.51.100.2:8,sourceport=5558; echo late | socat -u - UDP:198.51.100.2:9,sourceport=5559")
			target := nodeNetns(t)
			err := target.Do(func(ns.NetNS) error {
				g := HostGuard{ID: "0123456789abcdef", HostIf: hostIf, Pod: []netip.Addr{netip.MustParseAddr("10.77.0.2")}}
				if err := guards.Install(g); err != nil {
					return err
				}
				return guards.ForgetConnections(g)
			})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { target.Do(func(ns.NetNS) error { return guards.Remove("0123456789abcdef") }) })
			if echoed(podNS, "198.51.100.2:7", "5556") {
				t.Error("guarded, the flow the pod opened before its guard still passes")
			}
			if echoed(podNS, "198.51.100.2:7", "5557") {
				t.Error("guarded, the pod answers a datagram it forged from the remote host before its guard")
			}
			run(t, remoteNS, "sh", "-c", "echo answer | socat -u - UDP:198.51.100.1:5558,sourceport=8")
			serve(t, remoteNS, "8")
			if echoed(podNS, "198.51.100.2:8", "5558") {
				t.Error("guarded, the pod talks on with a remote host that answered, after its guard, a flow it opened before")
			}
			run(t, remoteNS, "sh", "-c", "echo answer | socat -u - UDP:10.77.0.2:5559,sourceport=9")
			serve(t, remoteNS, "9")
			// Without NAT whoever can reach a bridge's pod can open the
			// way for it; on a routed veth, an answer does not.
			if !bridged && echoed(podNS, "198.51.100.2:9", "5559") {
				t.Error("guarded, the pod talks on with a remote host that answered, after its guard and without NAT, a flow it opened before")
			}
			// Whoever reaches it after is still answered.
			if !echoed(remoteNS, "10.77.0.2:9000", "") {
				t.Error("guarded, no answer from the pod to the remote host")
			}
		})
	}
}

// A late answer to what a pod sent before its guard (an interface added
// to a running sandbox, the window after a `flush ruleset`) must not open
// the way to whoever answered: any server, one the pod's policy denies
// too, answers a SYN or a query. Without NAT, as pods with routed
// addresses are.
func TestALateAnswerOpensNoWayOut(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root: namespaces, veths and nftables")
	}
	guards := Guards{Dir: t.TempDir()}
	for _, bridged := range []bool{false, true} {
		name := "routed veth"
		if bridged {
			name = "bridge port"
		}
		t.Run(name, func(t *testing.T) {
			hostIf, _ := guardTopology(t, bridged)
			// The remote host's answer waits until the pod is guarded.
			run(t, remoteNS, "nft", "add table inet late; add chain inet late out { type filter hook output priority 0; }; add rule inet late out tcp sport 7777 drop")
			// The remote host sends its SYN-ACK again 1, 3, 7 and 15 s after the pod's SYN.
			listen, heard := background(t, remoteNS, "timeout", "20", "socat", "-u", "TCP-LISTEN:7777,reuseaddr", "-")
			until(t, "the remote host listening", remoteNS, "-ltn", "sport = :7777")
			background(t, podNS, "sh", "-c", "echo late | timeout 20 socat -u - TCP:198.51.100.2:7777,sourceport=5560")
			until(t, "the pod's SYN at the remote host", remoteNS, "-tn", "state", "syn-recv")
			run(t, podNS, "sh", "-c", "echo late | socat -u - UDP:198.51.100.2:8,sourceport=5561")
			target := nodeNetns(t)
			err := target.Do(func(ns.NetNS) error {
				g := HostGuard{ID: "0123456789abcdef", HostIf: hostIf, Pod: []netip.Addr{netip.MustParseAddr("10.77.0.2")}}
				if err := guards.InstallLate(g); err != nil {
					return err
				}
				return guards.ForgetConnections(g)
			})
			if err != nil {
				t.Fatal(err)
			}
			guarded := time.Now()
			t.Cleanup(func() { target.Do(func(ns.NetNS) error { return guards.Remove("0123456789abcdef") }) })
			// A UDP answer cannot be told from a datagram that reaches the
			// pod first, but comes before a late guard learns anyone. (A
			// routed veth's guard asks conntrack, which here tracked nothing
			// before the guard: TestHostGuardForgetsWhatThePodOpenedBeforeIt.)
			run(t, remoteNS, "sh", "-c", "echo answer | socat -u - UDP:10.77.0.2:5561,sourceport=8")
			serve(t, remoteNS, "8")
			if bridged && echoed(podNS, "198.51.100.2:8", "5561") {
				t.Error("guarded, the pod talks with a remote host that answered, after its guard, a datagram it sent before")
			}
			// A TCP answer is told as one, also once the guard learns again.
			time.Sleep(time.Until(guarded.Add(answerGrace)))
			run(t, remoteNS, "nft", "delete table inet late")
			listen.Wait()
			if strings.Contains(heard.String(), "late") {
				t.Error("guarded, the pod talks with a remote host that answered, after its guard, a SYN it sent before")
			}
			// Whoever reaches it after is still answered, over TCP too.
			background(t, podNS, "timeout", "5", "socat", "-u", "SYSTEM:echo answer", "TCP-LISTEN:9001,reuseaddr")
			until(t, "the pod listening", podNS, "-ltn", "sport = :9001")
			if out, _ := exec.Command("ip", "netns", "exec", remoteNS, "timeout", "3", "socat", "-u", "TCP:10.77.0.2:9001", "-").Output(); !strings.Contains(string(out), "answer") {
				t.Error("guarded, a remote host that connects to the pod gets no answer")
			}
		})
	}
}

// What a bridge floods to every port (a frame to a MAC address it has not
// learned, as the node sends one to a neighbour whose entry outlived the
// bridge's, or to broadcast or multicast) reaches a bridged pod's port
// though it was sent to another: its sender reached someone else, not
// the pod, and must not become one the pod may talk with.
func TestOnlyWhatIsSentToThePodMakesItsSenderKnown(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root: namespaces, a bridge and nftables")
	}
	hostIf, _ := guardTopology(t, true)
	guardPod(t, hostIf)
	// The node's neighbours 10.77.0.3 and fd77::3 have a MAC address the
	// bridge has never seen: what it routes to them is flooded.
	for _, a := range []string{"10.77.0.3", "fd77::3"} {
		run(t, nodeNS, "ip", "neigh", "replace", a, "lladdr", "02:00:00:00:77:03", "dev", "hg-br", "nud", "permanent")
	}
	// A counter at the pod shows the flood arrives at its port.
	for _, v := range []struct{ remote, other, mine string }{
		{"198.51.100.2", "10.77.0.3:9999", "10.77.0.2:9000"},
		{"2001:db8:77::2", "[fd77::3]:9999", "[fd77::2]:9000"},
	} {
		flooded := counted(t, podNS, "netdev", "flood", "udp dport 9999 counter")
		run(t, remoteNS, "sh", "-c", "echo flood | socat -u - UDP:"+v.other)
		if strings.Contains(flooded(), "packets 0 ") {
			t.Fatalf("the datagram to %s did not reach the pod's port: %s", v.other, flooded())
		}
		if knows(t, v.remote) {
			t.Errorf("the pod's guard knows a remote host that sent a datagram to another address (%s) on its bridge", v.other)
		}
		// A datagram sent to the pod makes its sender known.
		run(t, remoteNS, "sh", "-c", "echo hello | socat -u - UDP:"+v.mine)
		if !knows(t, v.remote) {
			t.Errorf("the pod's guard does not know a remote host that sent it a datagram (%s)", v.mine)
		}
	}
	// A neighbour solicitation for the pod goes to its solicited-node
	// address: the node's, from its global address, must be answered.
	for _, netns := range []string{nodeNS, podNS} {
		run(t, netns, "ip", "-6", "neigh", "flush", "all")
	}
	if out, err := exec.Command("ip", "netns", "exec", nodeNS, "ping", "-6", "-c", "1", "-W", "3", "-I", "fd77::1", "fd77::2").CombinedOutput(); err != nil {
		t.Errorf("the node cannot reach the pod from its global address: %v\n%s", err, out)
	}
}

// A bridged pod's guard remembers who reached the pod by address, not by
// connection: a host that did (the node, with a probe) must get answers
// from the pod, not connections it opens to the host's other services,
// nor pings, nor a SYN hidden past a first fragment too short to tell,
// nor datagrams of its own. With br_netfilter (Kubernetes nodes load it,
// docker does) and without: the host's conntrack tells those datagrams,
// and br_netfilter moves where it sees them.
func TestAHostThatReachedABridgedPodIsOnlyAnswered(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root: namespaces, a bridge and nftables")
	}
	withAndWithoutBrNetfilter(t, reachedOnlyAnswered)
}

// withAndWithoutBrNetfilter runs f with br_netfilter on ("1") and off
// ("0") in its node, which f sets (nodeBrNetfilter) once it made it.
func withAndWithoutBrNetfilter(t *testing.T, f func(t *testing.T, on string)) {
	loadBrNetfilter(t)
	for _, on := range []string{"1", "0"} {
		t.Run("bridge-nf-call-iptables="+on, func(t *testing.T) { f(t, on) })
	}
}

// nodeBrNetfilter turns br_netfilter on ("1") or off ("0") in the node.
func nodeBrNetfilter(t *testing.T, on string) {
	t.Helper()
	run(t, nodeNS, "sysctl", "-qw", "net.bridge.bridge-nf-call-iptables="+on, "net.bridge.bridge-nf-call-ip6tables="+on)
}

// loadBrNetfilter makes sure br_netfilter is there, whose sysctls, per
// namespace, say whether a bridge's frames pass the IP hooks. One the
// test loads has the host's own turned off at once, so that the host's
// bridges filter as they did, and is unloaded at the test's end.
func loadBrNetfilter(t *testing.T) {
	t.Helper()
	if _, err := os.Stat("/proc/sys/net/bridge"); err == nil {
		return // built in, or loaded by the host
	}
	if out, err := exec.Command("modprobe", "br_netfilter").CombinedOutput(); err != nil {
		t.Fatalf("loading br_netfilter: %v\n%s", err, out)
	}
	t.Cleanup(func() { exec.Command("modprobe", "-r", "br_netfilter").Run() })
	if out, err := exec.Command("sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=0", "net.bridge.bridge-nf-call-ip6tables=0", "net.bridge.bridge-nf-call-arptables=0").CombinedOutput(); err != nil {
		t.Fatalf("turning br_netfilter off for the host: %v\n%s", err, out)
	}
}

// reachedOnlyAnswered is TestAHostThatReachedABridgedPodIsOnlyAnswered,
// with br_netfilter on the node as brNetfilter says ("1", "0").
func reachedOnlyAnswered(t *testing.T, brNetfilter string) {
	hostIf, _ := guardTopology(t, true)
	nodeBrNetfilter(t, brNetfilter)
	for netns, port := range map[string]string{remoteNS: "7777", nodeNS: "7778", podNS: "9001"} {
		background(t, netns, "socat", "TCP6-LISTEN:"+port+",reuseaddr,fork", "SYSTEM:echo hello")
		until(t, "a TCP listener on "+port, netns, "-ltn", "sport = :"+port)
	}
	peers := []string{"198.51.100.2:7", "[2001:db8:77::2]:7", "10.77.0.1:7", "[fd77::1]:7"}
	connects := func(netns, addr string) bool {
		out, _ := exec.Command("ip", "netns", "exec", netns, "timeout", "3", "socat", "-u", "TCP:"+addr+",connect-timeout=2", "-").Output()
		return strings.Contains(string(out), "hello")
	}
	opens := func() []string {
		var got []string
		for _, a := range []string{"198.51.100.2:7777", "[2001:db8:77::2]:7777", "10.77.0.1:7778", "[fd77::1]:7778"} {
			if connects(podNS, a) {
				got = append(got, "a connection to "+a)
			}
		}
		for _, a := range []string{"198.51.100.2", "2001:db8:77::2", "10.77.0.1", "fd77::1"} {
			if exec.Command("ip", "netns", "exec", podNS, "ping", "-c1", "-W1", a).Run() == nil {
				got = append(got, "a ping to "+a)
			}
		}
		// A datagram of the pod's own, not an answer: the guard's udp
		// sets tell.
		for _, a := range peers {
			if echoed(podNS, a, "") {
				got = append(got, "a datagram to "+a)
			}
		}
		// A packet of another protocol, which neither host sent the pod:
		// its proto sets tell, and the host's conntrack (unsureMark).
		for netns, addrs := range map[string][]string{remoteNS: {"198.51.100.2", "2001:db8:77::2"}, nodeNS: {"10.77.0.1", "fd77::1"}} {
			for _, a := range addrs {
				if protoReaches(t, podNS, netns, a) {
					got = append(got, fmt.Sprintf("a packet of protocol %d to %s", experimentalProto, a))
				}
			}
		}
		// What arrives at the remote host's port 7779, reassembled.
		syns := counted(t, remoteNS, "inet", "syn", "tcp dport 7779 tcp flags & (syn | ack) == syn counter")
		run(t, podNS, "python3", "../../test/testdata/fragsyn.py", "10.77.0.2", "198.51.100.2", "7779")
		time.Sleep(100 * time.Millisecond)
		if !strings.Contains(syns(), "packets 0 ") {
			got = append(got, "a SYN in fragments")
		}
		return got
	}
	// Unguarded, every one gets through: the probes can see an escape.
	if got := opens(); len(got) != 17 {
		t.Fatalf("without the guard only these got through: %q", got)
	}
	guardPod(t, hostIf)
	// The remote host and the node reach the pod, and it answers them.
	reaching := []struct{ netns, pod, remote string }{
		{remoteNS, "10.77.0.2", "198.51.100.2"}, {remoteNS, "fd77::2", "2001:db8:77::2"},
		{nodeNS, "10.77.0.2", "10.77.0.1"}, {nodeNS, "fd77::2", "fd77::1"},
	}
	for _, v := range reaching {
		if to := net.JoinHostPort(v.pod, "9000"); !echoed(v.netns, to, "") {
			t.Fatalf("guarded, the pod does not answer %s's datagram to %s", v.netns, to)
		}
		if !knows(t, v.remote) {
			t.Fatalf("guarded, the pod's guard does not know %s, which reached it", v.remote)
		}
	}
	for _, v := range []struct{ netns, pod string }{
		{remoteNS, "10.77.0.2:9001"}, {remoteNS, "[fd77::2]:9001"}, {nodeNS, "10.77.0.2:9001"}, {nodeNS, "[fd77::2]:9001"},
	} {
		if !connects(v.netns, v.pod) {
			t.Errorf("guarded, the pod does not answer a connection from %s to %s", v.netns, v.pod)
		}
	}
	if got := opens(); len(got) != 0 {
		t.Errorf("guarded, the pod still opened %q", got)
	}
	// Sent a packet of another protocol, the pod answers in it.
	for _, v := range reaching {
		if !protoReaches(t, v.netns, podNS, v.pod) {
			t.Fatalf("guarded, %s's packet of protocol %d did not reach the pod at %s", v.netns, experimentalProto, v.pod)
		}
		if !protoReaches(t, podNS, v.netns, v.remote) {
			t.Errorf("guarded, the pod does not answer %s in the protocol (%d) it was sent", v.remote, experimentalProto)
		}
	}
}

// guardPod guards the topology's pod, both its addresses and no kept
// range, on hostIf until the test ends.
func guardPod(t *testing.T, hostIf string) {
	t.Helper()
	target := nodeNetns(t)
	guards := Guards{Dir: t.TempDir()}
	pod := []netip.Addr{netip.MustParseAddr("10.77.0.2"), netip.MustParseAddr("fd77::2")}
	inNetns(t, target)(func() error { return guards.Install(HostGuard{ID: "0123456789abcdef", HostIf: hostIf, Pod: pod}) })
	t.Cleanup(func() { target.Do(func(ns.NetNS) error { return guards.Remove("0123456789abcdef") }) })
}

// knows reports whether guardPod's guard knows addr: it reached the pod.
func knows(t *testing.T, addr string) bool {
	t.Helper()
	set := inboundSet(guardKey("0123456789abcdef"), strings.Contains(addr, ":"))
	out, err := exec.Command("ip", "netns", "exec", nodeNS, "nft", "list", "set", "bridge", GuardTable, set).CombinedOutput()
	if err != nil {
		t.Fatalf("nft list set %s: %v\n%s", set, err, out)
	}
	return strings.Contains(string(out), " "+addr+" ")
}

// counted counts, with rules, what arrives in netns, in a table of its
// own, name: at eth0's ingress for family netdev, at input for inet.
// listed reads the rules and counters. Called again, it counts from
// nought (nft 1.0.6's `reset counters` leaves a rule's counter be).
func counted(t *testing.T, netns, family, name string, rules ...string) (listed func() string) {
	t.Helper()
	hook := "type filter hook input priority 0;"
	if family == "netdev" {
		hook = "type filter hook ingress device eth0 priority 0;"
	}
	table := family + " " + name
	batch := "add table " + table + "; delete table " + table + "; add table " + table + "; add chain " + table + " in { " + hook + " }"
	for _, r := range rules {
		batch += "; add rule " + table + " in " + r
	}
	run(t, netns, "nft", batch)
	return func() string {
		out, _ := exec.Command("ip", "netns", "exec", netns, "nft", "list", "chain", family, name, "in").Output()
		return string(out)
	}
}

// An answer too large for the link comes in fragments, and only the first
// carries the header that tells it for an answer: the others must not
// make its sender known either.
func TestFragmentsOfAnAnswerMakeNoOneKnown(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root: namespaces, a bridge and nftables")
	}
	hostIf, _ := guardTopology(t, true)
	guardPod(t, hostIf)
	// The remote host's echo reply of 4000 bytes to a ping the pod sent
	// before its guard (as if it had), in fragments.
	const reply = `import socket, sys
dst = sys.argv[1]
six = ':' in dst
s = socket.socket(socket.AF_INET6 if six else socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMPV6 if six else socket.IPPROTO_ICMP)
m = bytearray([129 if six else 0, 0, 0, 0, 0x12, 0x34, 0, 1]) + b'x' * 4000
if not six:
    c = sum((m[i] << 8) + m[i + 1] for i in range(0, len(m), 2))
    while c >> 16:
        c = (c & 0xffff) + (c >> 16)
    m[2:4] = (~c & 0xffff).to_bytes(2, 'big')
s.sendto(bytes(m), (dst, 0))
`
	for _, v := range []struct{ pod, remote string }{{"10.77.0.2", "198.51.100.2"}, {"fd77::2", "2001:db8:77::2"}} {
		fragments := counted(t, podNS, "netdev", "frags", "ip frag-off & 0x1fff != 0 counter", "frag frag-off != 0 counter")
		run(t, remoteNS, "python3", "-c", reply, v.pod)
		if !strings.Contains(fragments(), "packets 2 ") {
			t.Fatalf("the answer to %s did not come in fragments: %s", v.pod, fragments())
		}
		if knows(t, v.remote) {
			t.Errorf("the pod's guard knows a remote host whose answer came to %s in fragments", v.pod)
		}
		// A datagram in fragments is known by its first.
		run(t, remoteNS, "python3", "-c", "import socket, sys; a = socket.getaddrinfo(sys.argv[1], 9000, type=socket.SOCK_DGRAM)[0]; socket.socket(a[0], socket.SOCK_DGRAM).sendto(b'x' * 4000, a[4])", v.pod)
		if !knows(t, v.remote) {
			t.Errorf("the pod's guard does not know a remote host that sent %s a datagram in fragments", v.pod)
		}
	}
}

// A `flush ruleset` takes what a bridged pod's guard knew of who reached
// it, and the guard would come back knowing no one and learn from no
// answer: the pod's side of a TCP connection made to it would stay cut,
// and its answers to datagrams and other protocols' packets it was sent,
// which its answer sets hold.
// Restore gives it back what it knew, from a Snapshot taken before, and
// only that: a connection the pod opened in the flush's window, unguarded,
// stays cut.
func TestABridgedPodsConnectionsOutliveAFlush(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root: namespaces, a bridge and nftables")
	}
	hostIf, _ := guardTopology(t, true)
	target := nodeNetns(t)
	in := inNetns(t, target)
	guards := Guards{Dir: t.TempDir()}
	g := HostGuard{ID: "0123456789abcdef", HostIf: hostIf, Pod: []netip.Addr{netip.MustParseAddr("10.77.0.2"), netip.MustParseAddr("fd77::2")}}
	in(func() error { return guards.Install(g) })
	t.Cleanup(func() { target.Do(func(ns.NetNS) error { return guards.Remove(g.ID) }) })
	// start runs script in netns; its output so far is read back from a
	// file, as the command goes on writing it.
	start := func(netns, script string) (output func() string) {
		path := filepath.Join(t.TempDir(), "out")
		f, err := os.Create(path)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		cmd := exec.Command("ip", "netns", "exec", netns, "sh", "-c", script)
		cmd.Stdout = f
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		return func() string {
			out, _ := os.ReadFile(path)
			return string(out)
		}
	}
	// A packet of another protocol the remote host sends the pod, which
	// answers once its guard is back. Sent before the remote host has
	// second addresses: from those the pod will answer.
	remotes := []string{"198.51.100.2", "2001:db8:77::2"}
	for i, pod := range []string{"10.77.0.2", "fd77::2"} {
		if !protoReaches(t, remoteNS, podNS, pod) {
			t.Fatalf("%s's packet of protocol %d to the pod did not arrive: the test shows nothing", remotes[i], experimentalProto)
		}
	}
	// The remote host's second addresses, which the pod will reach.
	run(t, remoteNS, "ip", "addr", "add", "198.51.100.3/24", "dev", "eth0")
	run(t, remoteNS, "ip", "addr", "add", "2001:db8:77::3/64", "dev", "eth0", "nodad")
	// Connections the remote host makes to the pod, which answers 4 s
	// after, once the guard is back.
	start(podNS, "timeout 20 socat TCP6-LISTEN:9001,reuseaddr,fork SYSTEM:'read x; sleep 4; echo late-$x'")
	until(t, "the pod listening", podNS, "-ltn", "sport = :9001")
	heard := start(remoteNS, "timeout 20 socat -u TCP6-LISTEN:9002,reuseaddr,fork -")
	until(t, "the remote host listening", remoteNS, "-ltn", "sport = :9002")
	// And datagrams, which it answers 4 s after too, a port a family (a
	// UDP listener takes one peer).
	udpPorts := map[string]string{"10.77.0.2": "9003", "[fd77::2]": "9004"}
	for _, port := range udpPorts {
		start(podNS, "timeout 20 socat UDP6-LISTEN:"+port+",reuseaddr SYSTEM:'read x; sleep 4; echo late-$x'")
		until(t, "the pod listening", podNS, "-lun", "sport = :"+port)
	}
	answered := map[string]func() string{}
	for pod, from := range map[string]string{"10.77.0.2": "198.51.100.2", "[fd77::2]": "[2001:db8:77::2]"} {
		answered[pod] = start(remoteNS, "(echo hi; sleep 10) | timeout 12 socat - TCP:"+pod+":9001,bind="+from)
		answered[pod+" UDP"] = start(remoteNS, "(echo hi; sleep 10) | timeout 12 socat - UDP:"+pod+":"+udpPorts[pod]+",bind="+from)
	}
	for i := 0; ; i++ {
		// The UDP listeners connect to their peer at its first datagram.
		out, _ := exec.Command("ip", "netns", "exec", podNS, "ss", "-Htun", "state", "established", "( sport = :9001 or sport = :9003 or sport = :9004 )").Output()
		if strings.Count(string(out), "\n") == 4 {
			break
		}
		if i == 100 {
			t.Fatalf("the connections to the pod: %s", out)
		}
		time.Sleep(20 * time.Millisecond)
	}
	var snapshot *Snapshot
	in(func() error { snapshot = guards.Snapshot(); return nil })
	run(t, nodeNS, "nft", "flush ruleset")
	// What the pod opens meanwhile gets out, unguarded, and is answered.
	for _, remote := range []string{"198.51.100.3", "[2001:db8:77::3]"} {
		start(podNS, "(echo early; sleep 4; echo late) | timeout 12 socat -u - TCP:"+remote+":9002")
	}
	for i := 0; strings.Count(heard(), "early") < 2; i++ {
		if i == 100 {
			t.Fatalf("the pod's connections in the flush's window: %q", heard())
		}
		time.Sleep(20 * time.Millisecond)
	}
	in(func() error { _, err := guards.Restore(snapshot); return err })
	time.Sleep(6 * time.Second)
	for pod, out := range answered {
		if !strings.Contains(out(), "late-hi") {
			t.Errorf("the pod's side of a connection or a datagram exchange made to it (%s) before a flush is cut after its guard came back: %q", pod, out())
		}
	}
	if strings.Contains(heard(), "late") {
		t.Errorf("after its guard came back, the pod goes on talking over a connection it opened unguarded: %q", heard())
	}
	for _, remote := range remotes {
		if !protoReaches(t, podNS, remoteNS, remote) {
			t.Errorf("the pod's answer of protocol %d to %s, which sent it one before a flush, is dropped after its guard came back", experimentalProto, remote)
		}
	}
}

// A snapshot gives back only what a guard would still know, and at most
// maxKnown hosts, those heard from last.
func TestASnapshotKnowsWhatTheGuardWouldStill(t *testing.T) {
	a, b := netip.MustParseAddr("198.51.100.2"), netip.MustParseAddr("2001:db8::2")
	s := &Snapshot{taken: time.Now().Add(-10 * time.Minute), known: map[string][]knownHost{"k": {{a, 5 * time.Minute}, {b, 20 * time.Minute}}}}
	got := s.of("k")
	if len(got) != 1 || got[0].addr != b || got[0].left > 10*time.Minute || got[0].left < 9*time.Minute {
		t.Errorf("known 10 minutes after the snapshot: %v", got)
	}
	var many []knownHost
	for i := range maxKnown + 10 {
		many = append(many, knownHost{netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)}), time.Duration(i+1) * time.Second})
	}
	s = &Snapshot{taken: time.Now(), known: map[string][]knownHost{"k": many}}
	if got := s.of("k"); len(got) != maxKnown || got[0].addr != many[len(many)-1].addr {
		t.Errorf("a snapshot of %d hosts gives back %d, first %v", len(many), len(got), got[0])
	}
	if (*Snapshot)(nil).of("k") != nil || s.of("other") != nil {
		t.Error("no snapshot, or none of the guard, gives back someone")
	}
}

// A snapshot gives back only the answers a guard would still let pass,
// and at most maxAnswers a set, those refreshed last.
func TestASnapshotGivesBackTheAnswersStillDue(t *testing.T) {
	udp4 := udpAnswerSet("k", false)
	s := &Snapshot{taken: time.Now().Add(-time.Minute), answers: map[string][]setEntry{udp4: {{[]byte{1}, 30 * time.Second}, {[]byte{2}, 90 * time.Second}}}}
	got := s.answersOf("k")[udp4]
	if len(got) != 1 || got[0].Key[0] != 2 || got[0].Timeout > 30*time.Second || got[0].Timeout < 29*time.Second {
		t.Errorf("answers a minute after the snapshot: %+v", got)
	}
	var many []setEntry
	for i := range maxAnswers + 10 {
		many = append(many, setEntry{[]byte{byte(i >> 8), byte(i)}, time.Duration(i+1) * time.Second})
	}
	s = &Snapshot{taken: time.Now(), answers: map[string][]setEntry{protoAnswerSet("k", true): many}}
	if got := s.answersOf("k")[protoAnswerSet("k", true)]; len(got) != maxAnswers || string(got[0].Key) != string(many[len(many)-1].key) {
		t.Errorf("a snapshot of %d answers gives back %d", len(many), len(got))
	}
	if (*Snapshot)(nil).answersOf("k") != nil || len(s.answersOf("other")) != 0 {
		t.Error("no snapshot, or none of the guard, gives back answers")
	}
}

// A hold drops what the pod sends, in both families (its veth may stay
// routed or become a bridge's port), until a guard takes its name; the
// other family's goes at Release, and a hold whose interface is gone at
// the next removal.
func TestHoldDropsUntilAGuardTakesTheName(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root: namespaces, veths and nftables")
	}
	for _, bridged := range []bool{false, true} {
		name := "routed veth"
		if bridged {
			name = "bridge port"
		}
		t.Run(name, func(t *testing.T) {
			hostIf, _ := guardTopology(t, bridged)
			target := nodeNetns(t)
			guards := Guards{Dir: t.TempDir()}
			in := inNetns(t, target)
			holds := func() (got map[string]bool) {
				in(func() (err error) { got, err = held(); return err })
				return got
			}
			in(func() error { return guards.Hold(hostIf) })
			in(func() error { return guards.Hold("hg-gone") }) // a sandbox that ended before its guard
			if !holds()[hostIf] || !holds()["hg-gone"] {
				t.Fatalf("held: %v", holds())
			}
			if echoed(podNS, "10.77.0.1:7", "") || echoed(podNS, "198.51.100.2:7", "") {
				t.Error("held, the pod reached the node or the remote host")
			}
			in(func() error {
				return guards.Install(HostGuard{ID: "0123456789abcdef", HostIf: hostIf, Pod: []netip.Addr{netip.MustParseAddr("10.77.0.2")},
					Keep: []netip.Prefix{netip.MustParsePrefix("10.77.0.0/24")}})
			})
			if !echoed(podNS, "10.77.0.1:7", "") {
				t.Error("guarded after a hold, the pod cannot reach a kept range")
			}
			if echoed(podNS, "198.51.100.2:7", "") {
				t.Error("guarded after a hold, the pod reached the remote host")
			}
			in(func() error { return guards.Release(hostIf) })
			if holds()[hostIf] {
				t.Errorf("released, still held: %v", holds())
			}
			if !echoed(podNS, "10.77.0.1:7", "") {
				t.Error("guarded and released, the pod cannot reach a kept range")
			}
			// Another pod's guard keeps the tables.
			in(func() error {
				return guards.Install(HostGuard{ID: "fedcba9876543210", HostIf: "hg-rem", Pod: []netip.Addr{netip.MustParseAddr("198.51.100.2")}})
			})
			in(func() error { return guards.Remove("0123456789abcdef") })
			if holds()["hg-gone"] {
				t.Errorf("a hold of an interface gone outlived the next removal: %v", holds())
			}
			in(func() error { return guards.Remove("fedcba9876543210") })
			if out, _ := exec.Command("ip", "netns", "exec", nodeNS, "nft", "list", "tables").Output(); len(out) > 0 {
				t.Errorf("after the last guard: %s", out)
			}
		})
	}
}

// A tc filter on the host end (Cilium's and Calico's eBPF data planes
// attach programs there) runs before netfilter and can send the pod's
// frames anywhere: such a veth cannot be guarded.
func TestHostGuardRefusesAVethWhoseFramesSkipNetfilter(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root: namespaces, veths, tc and nftables")
	}
	hostIf, mac := guardTopology(t, false)
	guard := HostGuard{
		ID: "0123456789abcdef", HostIf: hostIf,
		Pod:  []netip.Addr{netip.MustParseAddr("10.77.0.2")},
		Keep: []netip.Prefix{netip.MustParsePrefix("10.77.0.0/24")},
	}
	target := nodeNetns(t)
	guards := Guards{Dir: t.TempDir()}
	install := func() error { return target.Do(func(ns.NetNS) error { return guards.Install(guard) }) }
	if err := install(); err != nil {
		t.Fatal(err)
	}
	if echoed(podNS, "198.51.100.2:7", "") {
		t.Fatal("guarded, the pod reached the remote host")
	}
	// A redirect from the pod's veth straight out of the node's other
	// link, to a remote host that takes the pod's frames as its own
	// (the frames keep the node's MAC address, which a BPF program
	// would have rewritten).
	run(t, remoteNS, "ip", "link", "set", "eth0", "address", mac)
	run(t, nodeNS, "tc", "qdisc", "add", "dev", hostIf, "clsact")
	run(t, nodeNS, "tc", "filter", "add", "dev", hostIf, "ingress", "protocol", "all", "u32", "match", "u32", "0", "0",
		"action", "mirred", "egress", "redirect", "dev", "hg-rem")
	if !echoed(podNS, "198.51.100.2:7", "") {
		t.Fatal("the redirect did not take the pod's datagram around the guard: the test shows nothing")
	}
	if err := target.Do(func(ns.NetNS) error { return guards.Remove(guard.ID) }); err != nil {
		t.Fatal(err)
	}
	if err := install(); err == nil || !strings.Contains(err.Error(), "tc ingress filter redirecting") {
		t.Errorf("guarding a veth whose frames a tc filter redirects: %v", err)
	}
	// The bandwidth plugin's shaping redirects to an IFB device, which
	// hands the frames back: that veth can be guarded.
	run(t, nodeNS, "tc", "filter", "del", "dev", hostIf, "ingress")
	run(t, nodeNS, "ip", "link", "add", "hg-ifb", "type", "ifb")
	run(t, nodeNS, "tc", "filter", "add", "dev", hostIf, "ingress", "protocol", "all", "u32", "match", "u32", "0", "0",
		"action", "mirred", "egress", "redirect", "dev", "hg-ifb")
	if err := install(); err != nil {
		t.Errorf("guarding a veth shaped through an IFB device: %v", err)
	}
}

// The pods' guards share a table per family; both stay until the last
// guard goes; a pod added again replaces its own chains.
func TestGuardsShareATablePerFamily(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root: namespaces, veths and nftables")
	}
	in := vethNode(t, nodeNS)
	guards := Guards{Dir: t.TempDir()}
	tables := func() string {
		out, _ := exec.Command("ip", "netns", "exec", nodeNS, "nft", "list", "tables").Output()
		return strings.TrimSpace(string(out))
	}
	keys := func() (got []string) {
		in(func() (err error) { got, err = guards.List(); return err })
		return got
	}
	pod := func(id, hostIf string) HostGuard {
		return HostGuard{ID: id, HostIf: hostIf, Pod: []netip.Addr{netip.MustParseAddr("10.77.0.2")}, Keep: []netip.Prefix{netip.MustParsePrefix("10.77.0.0/24")}}
	}
	in(func() error { return guards.Install(pod("aaaaaaaaaaaa-1", "hg-a")) })
	in(func() error { return guards.Install(pod("bbbbbbbbbbbb-2", "hg-b")) })
	in(func() error { return guards.Install(pod("cccccccccccc-3", "hg-c")) })
	in(func() error { return guards.Install(pod("aaaaaaaaaaaa-1", "hg-a")) })
	// A table made before the pods' link chains has no map for them: the
	// next pod's install adds it.
	run(t, nodeNS, "nft", "delete", "chain", "bridge", GuardTable, "prerouting")
	run(t, nodeNS, "nft", "delete", "map", "bridge", GuardTable, podsLinks)
	withMAC := pod("cccccccccccc-3", "hg-c")
	withMAC.MAC = "02:00:00:00:00:0c"
	in(func() error { return guards.Install(withMAC) })
	if m, _ := exec.Command("ip", "netns", "exec", nodeNS, "nft", "list", "chain", "bridge", GuardTable, "prerouting").Output(); !strings.Contains(string(m), "iifname vmap @"+podsLinks) {
		t.Errorf("the prerouting chain after an install into a table without it:\n%s", m)
	}
	if m, _ := exec.Command("ip", "netns", "exec", nodeNS, "nft", "list", "map", "bridge", GuardTable, podsLinks).Output(); !strings.Contains(string(m), `"hg-c" : jump link-cccccccccccc`) {
		t.Errorf("the link map after an install into a table without it:\n%s", m)
	}
	// Of the three, the bridged pod recorded without a MAC address (as an
	// earlier childflow recorded every pod) is the one without link checks.
	var old []string
	in(func() error { old = guards.WithoutLinkChecks(); return nil })
	if strings.Join(old, " ") != "bbbbbbbbbbbb" {
		t.Errorf("guards without link checks: %q", old)
	}
	if got := tables(); got != "table inet childflow-guard\ntable bridge childflow-guard" {
		t.Errorf("tables with three guards:\n%s", got)
	}
	if got := strings.Join(keys(), " "); got != "aaaaaaaaaaaa bbbbbbbbbbbb cccccccccccc" {
		t.Errorf("guards: %s", got)
	}
	// A pod gone without DEL, whose veth's name a new pod's veth takes:
	// the new pod's chains guard it, also once the old pod's are removed.
	in(func() error { return guards.Install(pod("dddddddddddd-4", "hg-b")) })
	in(func() error { return guards.Remove("bbbbbbbbbbbb-2") })
	if m, _ := exec.Command("ip", "netns", "exec", nodeNS, "nft", "list", "map", "bridge", GuardTable, "from-pods").Output(); !strings.Contains(string(m), `"hg-b" : jump from-dddddddddddd`) {
		t.Errorf("the map after the old pod's removal:\n%s", m)
	}
	in(func() error { return guards.Remove("dddddddddddd-4") })
	if got := strings.Join(keys(), " "); got != "aaaaaaaaaaaa cccccccccccc" {
		t.Errorf("guards after removing one: %s", got)
	}
	// Both tables stay while the node has a guard, for a hold to find.
	in(func() error { return guards.Remove("cccccccccccc-3") })
	if got := tables(); got != "table inet childflow-guard\ntable bridge childflow-guard" {
		t.Errorf("tables after the last bridge port's guard went:\n%s", got)
	}
	// A container on two networks has a guard per veth, all removed
	// with it.
	second := pod("aaaaaaaaaaaa-1", "hg-e")
	second.Port = "eth1"
	in(func() error { return guards.Install(second) })
	if got := keys(); !slices.Contains(got, "aaaaaaaaaaaa+eth1") || !slices.Contains(got, "aaaaaaaaaaaa") || len(got) != 2 {
		t.Errorf("guards of a container's two veths: %s", got)
	}
	if !Matches("aaaaaaaaaaaa+eth1", "aaaaaaaaaaaa-1") || Matches("aaaaaaaaaaaa+eth1", "aaaaaaaaaaab-1") {
		t.Error("Matches of a second veth's key")
	}
	in(func() error { return guards.Remove("aaaaaaaaaaaa-1") })
	in(func() error { return guards.Remove("aaaaaaaaaaaa-1") })
	if got := tables(); got != "" {
		t.Errorf("tables after every guard went:\n%s", got)
	}
	if records, _ := filepath.Glob(filepath.Join(guards.Dir, "guards", "*.json")); len(records) != 0 {
		t.Errorf("records after every guard went: %s", records)
	}
}

// A pod added again (a runtime's second ADD for a container, a hook run
// twice) has its guard replaced in one transaction: a transaction that
// took the old chains and one that added the new would leave its veth
// unguarded between them.
func TestAGuardAddedAgainIsNeverOff(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root: namespaces, veths and nftables")
	}
	in := vethNode(t, nodeNS)
	guards := Guards{Dir: t.TempDir()}
	for _, c := range []struct{ what, id, hostIf, family string }{
		{"routed veth", "aaaaaaaaaaaa-1", "hg-a", "inet"},
		{"bridge port", "bbbbbbbbbbbb-2", "hg-b", "bridge"},
	} {
		g := HostGuard{ID: c.id, HostIf: c.hostIf, MAC: "02:00:00:00:00:0b", Pod: []netip.Addr{netip.MustParseAddr("10.77.0.2")}}
		in(func() error { return guards.Install(g) })
		// Every object: the library filters out NEWGEN, and so every
		// batch, for chains alone (internal/nftwatch).
		mon := nftables.NewMonitor()
		var events chan *nftables.MonitorEvents
		in(func() (err error) { events, err = (&nftables.Conn{}).AddGenerationalMonitor(mon); return err })
		g.Pod = []netip.Addr{netip.MustParseAddr("10.77.0.3")}
		in(func() error { return guards.Install(g) })
		chain := "from-" + g.key()
		for seen, timeout := false, time.After(5*time.Second); !seen; {
			select {
			case batch := <-events:
				var deleted, added bool
				for _, ev := range batch.Changes {
					if ch, _ := ev.Data.(*nftables.Chain); ch != nil && ch.Name == chain {
						deleted = deleted || ev.Type == nftables.MonitorEventTypeDelChain
						added = added || ev.Type == nftables.MonitorEventTypeNewChain
					}
				}
				if deleted != added {
					t.Errorf("%s: one transaction deleted %s (%v) and another added it (%v): the veth was unguarded between them", c.what, chain, deleted, added)
				}
				seen = deleted || added
			case <-timeout:
				t.Fatalf("%s: no transaction replaced %s", c.what, chain)
			}
		}
		mon.Close()
		// The new guard is the one in place, and the veth leads to it.
		out, _ := exec.Command("ip", "netns", "exec", nodeNS, "nft", "list", "chain", c.family, GuardTable, chain).Output()
		if !strings.Contains(string(out), "10.77.0.3") || strings.Contains(string(out), "10.77.0.2") {
			t.Errorf("%s: the guard added again:\n%s", c.what, out)
		}
		out, _ = exec.Command("ip", "netns", "exec", nodeNS, "nft", "list", "map", c.family, GuardTable, fromPods).Output()
		if !strings.Contains(string(out), fmt.Sprintf("%q : jump %s", c.hostIf, chain)) {
			t.Errorf("%s: the map after the guard was added again:\n%s", c.what, out)
		}
	}
	// Added again on a veth of the other kind (its plugin changed): its
	// old chains go from the other family's table.
	g := HostGuard{ID: "aaaaaaaaaaaa-1", HostIf: "hg-c", MAC: "02:00:00:00:00:0c", Pod: []netip.Addr{netip.MustParseAddr("10.77.0.4")}}
	in(func() error { return guards.Install(g) })
	out, _ := exec.Command("ip", "netns", "exec", nodeNS, "nft", "list", "table", "inet", GuardTable).Output()
	if strings.Contains(string(out), g.key()) || strings.Contains(string(out), `"hg-a"`) {
		t.Errorf("a routed veth's guard added again as a bridge port's is left in the inet table:\n%s", out)
	}
	if !hasChain(t, nodeNS, "bridge", "from-"+g.key()) {
		t.Error("a routed veth's guard added again as a bridge port's is not in the bridge table")
	}
}

// hasChain says whether the family's guard table in netns has chain.
func hasChain(t *testing.T, netns, family, chain string) bool {
	t.Helper()
	return exec.Command("ip", "netns", "exec", netns, "nft", "list", "chain", family, GuardTable, chain).Run() == nil
}

// TestGuardsComeBackAfterAFlush: a `flush ruleset` takes the guards'
// tables; Restore puts back the guards of the pods whose veths remain
// (also a veth a second pod took from one gone without DEL: the second
// pod's), forgets those whose veths are gone (also where an unguarded
// pod's veth has the name now), and does nothing when nothing is
// missing.
func TestGuardsComeBackAfterAFlush(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: namespaces, veths and nftables")
	}
	const nodeNS = "cfhg-flush"
	in := vethNode(t, nodeNS)
	guards := Guards{Dir: t.TempDir()}
	nft := func(args ...string) string {
		out, _ := exec.Command("ip", append([]string{"netns", "exec", nodeNS, "nft"}, args...)...).CombinedOutput()
		return strings.TrimSpace(string(out))
	}
	restore := func() (got []string) {
		in(func() (err error) { got, err = guards.Restore(nil); return err })
		sort.Strings(got)
		return got
	}
	pod := func(id, hostIf string) HostGuard {
		return HostGuard{ID: id, HostIf: hostIf, Pod: []netip.Addr{netip.MustParseAddr("10.77.0.2")}, Keep: []netip.Prefix{netip.MustParsePrefix("10.77.0.0/24")}}
	}
	in(func() error { return guards.Install(pod("aaaaaaaaaaaa-1", "hg-a")) })
	in(func() error { return guards.Install(pod("dddddddddddd-4", "hg-b")) })
	in(func() error { return guards.Install(pod("bbbbbbbbbbbb-2", "hg-b")) }) // took hg-b from d
	in(func() error { return guards.Install(pod("cccccccccccc-3", "hg-c")) })
	if got := restore(); len(got) != 0 {
		t.Errorf("restored %v with nothing missing", got)
	}
	before := nft("list", "ruleset")
	// c's pod goes without DEL; an unguarded pod's veth takes the name.
	for _, args := range [][]string{{"link", "del", "hg-c"}, {"link", "add", "hg-c", "master", "hg-br", "type", "veth", "peer", "name", "hg-c-new"}} {
		if out, err := exec.Command("ip", append([]string{"-n", nodeNS}, args...)...).CombinedOutput(); err != nil {
			t.Fatalf("ip %v: %v\n%s", args, err, out)
		}
	}
	nft("flush", "ruleset")
	if got := nft("list", "tables"); got != "" {
		t.Fatalf("tables after the flush:\n%s", got)
	}
	if got := strings.Join(restore(), " "); got != "aaaaaaaaaaaa bbbbbbbbbbbb" {
		t.Errorf("restored %q, want the two pods whose veths remain", got)
	}
	if m := nft("list", "map", "bridge", GuardTable, "from-pods"); !strings.Contains(m, `"hg-b" : jump from-bbbbbbbbbbbb`) || strings.Contains(m, "hg-c") {
		t.Errorf("the bridge's map once restored:\n%s", m)
	}
	if m := nft("list", "map", "inet", GuardTable, "from-pods"); !strings.Contains(m, `"hg-a" : jump from-aaaaaaaaaaaa`) {
		t.Errorf("the routed map once restored:\n%s", m)
	}
	for _, chain := range []string{"from-aaaaaaaaaaaa", "addr-aaaaaaaaaaaa"} {
		if !strings.Contains(before, "chain "+chain) || nft("list", "chain", "inet", GuardTable, chain) == "" {
			t.Errorf("chain %s not back", chain)
		}
	}
	if _, err := os.Stat(guards.recordPath("cccccccccccc")); !os.IsNotExist(err) {
		t.Errorf("the record of the pod whose veth went: %v", err)
	}
	if got := restore(); len(got) != 0 {
		t.Errorf("restored %v again", got)
	}
	// The bridge ports' guards need the inet table, where what they mark
	// unsure is decided: it comes back, also when only it went.
	in(func() error { return guards.Remove("aaaaaaaaaaaa-1") })
	nft("delete", "table", "inet", GuardTable)
	has := func(id string) (ok bool) {
		in(func() (err error) { ok, err = guards.Has(id); return err })
		return ok
	}
	if has("bbbbbbbbbbbb-2") {
		t.Error("a bridge port's guard is whole without the inet table")
	}
	if got := restore(); len(got) != 0 {
		t.Errorf("restored %v when only the inet table went", got)
	}
	if !strings.Contains(nft("list", "chain", "inet", GuardTable, unsureChain), "drop") {
		t.Errorf("the inet table's chain %s is not back:\n%s", unsureChain, nft("list", "ruleset"))
	}
	if !has("bbbbbbbbbbbb-2") {
		t.Error("a bridge port's guard is not whole once the inet table is back")
	}
	in(func() error { return guards.Remove("bbbbbbbbbbbb-2") })
	in(func() error { return guards.Remove("cccccccccccc-3") })
	in(func() error { return guards.Remove("dddddddddddd-4") })
	if got := nft("list", "tables"); got != "" {
		t.Errorf("tables after every guard went:\n%s", got)
	}
	if left, _ := os.ReadDir(filepath.Join(guards.Dir, "guards")); len(left) != 0 {
		t.Errorf("records left: %v", left)
	}
}

// TestHostGuardKeepsABridgedPodFromPosingAsAnother: on a bridge, a pod
// with CAP_NET_RAW can make its neighbours send it what is meant for
// others, without a packet of its own leaving the link: ARP and
// neighbour advertisements naming another's address, a solicitation
// naming another's MAC address for its own, router advertisements,
// frames from another's MAC address (the bridge learns it before any
// forward rule sees the frame). The victims here are an unguarded pod
// beside it and the node.
func TestHostGuardKeepsABridgedPodFromPosingAsAnother(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root: namespaces, a bridge and nftables")
	}
	hostIf, _ := guardTopology(t, true)
	victimNS := neighbourPod(t)
	output := func(netns string, args ...string) string {
		out, _ := exec.Command("ip", append([]string{"netns", "exec", netns}, args...)...).Output()
		return strings.TrimSpace(string(out))
	}
	podMAC, victimMAC := output(podNS, "cat", "/sys/class/net/eth0/address"), output(victimNS, "cat", "/sys/class/net/eth0/address")
	var podLinkLocal netip.Addr
	for i := 0; !podLinkLocal.IsValid(); i++ {
		if i == 50 {
			t.Fatal("the pod has no link-local address")
		}
		if f := strings.Fields(output(podNS, "ip", "-6", "-o", "addr", "show", "dev", "eth0", "scope", "link", "-tentative")); len(f) > 3 {
			podLinkLocal = netip.MustParsePrefix(f[3]).Addr()
		} else {
			time.Sleep(100 * time.Millisecond)
		}
	}
	neighbour := func(netns, addr string) string { return output(netns, "ip", "neigh", "show", addr) }
	posed := func() []string {
		// The victims know the true addresses first: ARP and neighbour
		// advertisements update what a host knows.
		output(victimNS, "ip", "neigh", "flush", "all")
		output(victimNS, "ip", "-6", "route", "flush", "proto", "ra")
		output(nodeNS, "ip", "neigh", "flush", "dev", "hg-br")
		for _, c := range [][]string{{victimNS, "10.77.0.1"}, {victimNS, "fd77::1"}, {nodeNS, "10.77.0.3"}} {
			output(c[0], "ping", "-c1", "-W1", c[1])
		}
		var got []string
		// Checked at once, as the neighbour's next frame teaches the
		// bridge its true port again.
		for range 3 {
			run(t, podNS, "python3", "../../test/testdata/spoof.py", "frame", victimMAC)
			if fdb := output(nodeNS, "bridge", "fdb", "show", "br", "hg-br"); strings.Contains(fdb, victimMAC+" dev "+hostIf+" ") {
				got = append(got, "the neighbour's MAC address, to the bridge")
				break
			}
		}
		run(t, podNS, "python3", "../../test/testdata/spoof.py", "arp", "10.77.0.1")
		run(t, podNS, "python3", "../../test/testdata/spoof.py", "arp", "10.77.0.3")
		run(t, podNS, "python3", "../../test/testdata/spoof.py", "na", "fd77::1")
		run(t, podNS, "python3", "../../test/testdata/spoof.py", "ra")
		run(t, podNS, "python3", "../../test/testdata/spoof.py", "ns", "fd77::1", victimMAC)
		time.Sleep(200 * time.Millisecond)
		if strings.Contains(neighbour(victimNS, "10.77.0.1"), podMAC) {
			got = append(got, "the neighbour's gateway, by ARP")
		}
		if strings.Contains(neighbour(nodeNS, "10.77.0.3"), podMAC) {
			got = append(got, "the neighbour, to the node, by ARP")
		}
		if strings.Contains(neighbour(victimNS, "fd77::1"), podMAC) {
			got = append(got, "the neighbour's IPv6 gateway, by a neighbour advertisement")
		}
		if strings.Contains(neighbour(nodeNS, podLinkLocal.String()), victimMAC) {
			got = append(got, "itself at the neighbour's MAC address, to the node, by a neighbour solicitation")
		}
		if strings.Contains(output(victimNS, "ip", "-6", "route", "show", "proto", "ra"), "default") {
			got = append(got, "a default router, by a router advertisement")
		}
		return got
	}
	if got := posed(); len(got) != 6 {
		t.Fatalf("unguarded, the pod posed only as %q: the probes show nothing", got)
	}
	target := nodeNetns(t)
	guards := Guards{Dir: t.TempDir()}
	err := target.Do(func(ns.NetNS) error {
		return guards.Install(HostGuard{
			ID: "0123456789abcdef", HostIf: hostIf, MAC: podMAC,
			Pod:       []netip.Addr{netip.MustParseAddr("10.77.0.2"), netip.MustParseAddr("fd77::2")},
			LinkLocal: []netip.Addr{podLinkLocal},
			Keep:      []netip.Prefix{netip.MustParsePrefix("10.77.0.0/24"), netip.MustParsePrefix("fd77::/64")},
		})
	})
	if err != nil {
		t.Fatal(err)
	}
	if got := posed(); len(got) != 0 {
		out, _ := exec.Command("ip", "netns", "exec", nodeNS, "nft", "list", "table", "bridge", GuardTable).CombinedOutput()
		t.Errorf("guarded, the pod posed as %q\n%s", got, out)
	}
	// Its own addresses still resolve, both ways, and its neighbours reach it.
	output(podNS, "ip", "neigh", "flush", "all")
	output(nodeNS, "ip", "neigh", "flush", "dev", "hg-br")
	for _, c := range []struct{ what, netns, addr string }{
		{"the pod to the node", podNS, "10.77.0.1:7"},
		{"the pod to the node over IPv6", podNS, "[fd77::1]:7"},
		{"the remote host to the pod", remoteNS, "10.77.0.2:9000"},
		{"the remote host to the pod over IPv6", remoteNS, "[fd77::2]:9000"},
		{"the neighbour to the pod", victimNS, "10.77.0.2:9000"},
		{"the neighbour to the pod over IPv6", victimNS, "[fd77::2]:9000"},
	} {
		if !echoed(c.netns, c.addr, "") {
			t.Errorf("guarded, no answer from %s", c.what)
		}
	}
}

// neighbourPod adds an unguarded pod (10.77.0.3, fd77::3) beside the
// topology's on its bridge and names its namespace.
func neighbourPod(t *testing.T) string {
	t.Helper()
	const netns = "cfhg-pod2"
	exec.Command("ip", "netns", "del", netns).Run()
	t.Cleanup(func() { exec.Command("ip", "netns", "del", netns).Run() })
	for _, args := range [][]string{
		{"netns", "add", netns},
		{"-n", nodeNS, "link", "add", "hg-pod2", "master", "hg-br", "type", "veth", "peer", "name", "eth0", "netns", netns},
		{"-n", nodeNS, "link", "set", "hg-pod2", "up"},
		{"-n", netns, "addr", "add", "10.77.0.3/24", "dev", "eth0"},
		{"-n", netns, "addr", "add", "fd77::3/64", "dev", "eth0", "nodad"},
		{"-n", netns, "link", "set", "eth0", "up"},
	} {
		if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
			t.Fatalf("ip %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	return netns
}

// experimentalProto is an IP protocol number for experiments (RFC 3692):
// no kernel handles it, only raw sockets see it, as they would SCTP, GRE
// or ESP.
const experimentalProto = 253

// protoReaches reports whether a packet of experimentalProto sent from
// netns from to addr arrives in netns to.
func protoReaches(t *testing.T, from, to, addr string) bool {
	t.Helper()
	network, wildcard := fmt.Sprintf("ip4:%d", experimentalProto), "0.0.0.0"
	if strings.Contains(addr, ":") {
		network, wildcard = fmt.Sprintf("ip6:%d", experimentalProto), "::"
	}
	listen := func(netns string) (conn net.PacketConn) {
		// The namespace is needed only while the socket is made.
		if err := ns.WithNetNSPath("/run/netns/"+netns, func(ns.NetNS) (err error) { conn, err = net.ListenPacket(network, wildcard); return err }); err != nil {
			t.Fatal(err)
		}
		return conn
	}
	receiver, sender := listen(to), listen(from)
	defer receiver.Close()
	defer sender.Close()
	msg := fmt.Appendf(nil, "from %s to %s at %d", from, addr, time.Now().UnixNano())
	buf := make([]byte, 2048)
	for range 3 { // the first packet may wait for neighbour discovery
		if _, err := sender.WriteTo(msg, &net.IPAddr{IP: net.ParseIP(addr)}); err != nil {
			t.Fatalf("sending %s to %s: %v", network, addr, err)
		}
		receiver.SetReadDeadline(time.Now().Add(time.Second))
		for {
			n, _, err := receiver.ReadFrom(buf)
			if err != nil {
				break
			}
			if bytes.Contains(buf[:n], msg) {
				return true
			}
		}
	}
	return false
}

// A bridged pod sends a neighbour pod that reached it answers alone, UDP
// and other protocols too: with br_netfilter, what the bridge forwards
// from port to port also passes the host's forward hook and conntrack;
// without it nothing but the bridge table sees it, which keeps the UDP
// datagrams the pod was sent for that, and who sent it what protocol.
func TestABridgedPodOnlyAnswersItsNeighbour(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root: namespaces, a bridge and nftables")
	}
	withAndWithoutBrNetfilter(t, onlyAnswersItsNeighbour)
}

func onlyAnswersItsNeighbour(t *testing.T, brNetfilter string) {
	hostIf, _ := guardTopology(t, true)
	neighbour := neighbourPod(t)
	nodeBrNetfilter(t, brNetfilter)
	serve(t, neighbour, "7")
	peers := []string{"10.77.0.3:7", "[fd77::3]:7"}
	for _, a := range peers {
		if !echoed(podNS, a, "") {
			t.Fatalf("unguarded, the pod's datagram to its neighbour %s got no echo: the test shows nothing", a)
		}
	}
	addrs := []struct{ pod, neighbour string }{{"10.77.0.2", "10.77.0.3"}, {"fd77::2", "fd77::3"}}
	for _, a := range addrs {
		if !protoReaches(t, podNS, neighbour, a.neighbour) {
			t.Fatalf("unguarded, the pod's packet of protocol %d to its neighbour %s did not arrive: the test shows nothing", experimentalProto, a.neighbour)
		}
	}
	guardPod(t, hostIf)
	for _, v := range []struct{ pod, addr string }{{"10.77.0.2:9000", "10.77.0.3"}, {"[fd77::2]:9000", "fd77::3"}} {
		if !echoed(neighbour, v.pod, "") {
			t.Fatalf("guarded, the pod does not answer its neighbour's datagram to %s", v.pod)
		}
		if !knows(t, v.addr) {
			t.Fatalf("guarded, the pod's guard does not know its neighbour %s, which reached it", v.addr)
		}
	}
	// From a port of its own the neighbour hears the pod's answer; the
	// pod's datagram to that port from another of its ports is no answer.
	for _, pod := range []string{"10.77.0.2:9000", "[fd77::2]:9000"} {
		if !echoed(neighbour, pod, "40001") {
			t.Fatalf("guarded, the pod does not answer its neighbour's datagram from port 40001 to %s", pod)
		}
	}
	serve(t, neighbour, "40001")
	for _, a := range append(peers, "10.77.0.3:40001", "[fd77::3]:40001") {
		if echoed(podNS, a, "") {
			t.Errorf("guarded, the pod sent its neighbour %s a datagram of its own", a)
		}
	}
	// Another protocol, which only raw sockets speak (SCTP, GRE, ESP):
	// the pod answers in it only a host that sent it one.
	for _, a := range addrs {
		if protoReaches(t, podNS, neighbour, a.neighbour) {
			t.Errorf("guarded, the pod sent its neighbour %s a packet of protocol %d, which it was never sent", a.neighbour, experimentalProto)
		}
		if !protoReaches(t, neighbour, podNS, a.pod) {
			t.Errorf("guarded, the neighbour's packet of protocol %d did not reach the pod at %s", experimentalProto, a.pod)
		}
		if !protoReaches(t, podNS, neighbour, a.neighbour) {
			t.Errorf("guarded, the pod does not answer its neighbour %s in the protocol (%d) it was sent", a.neighbour, experimentalProto)
		}
	}
}

// The eBPF data planes' hooks on the host end run before netfilter and
// can send the pod's frames anywhere: a veth with an XDP or a tcx
// program cannot be guarded (a program that passes every frame will do:
// the guard cannot know what a program does).
func TestHostGuardRefusesAVethWithAnXDPOrTcxProgram(t *testing.T) {
	if os.Getuid() != 0 {
		t.Skip("needs root: namespaces, veths, BPF and nftables")
	}
	hostIf, _ := guardTopology(t, false)
	guard := HostGuard{
		ID: "0123456789abcdef", HostIf: hostIf,
		Pod:  []netip.Addr{netip.MustParseAddr("10.77.0.2")},
		Keep: []netip.Prefix{netip.MustParsePrefix("10.77.0.0/24")},
	}
	target := nodeNetns(t)
	in := func(f func() error) error { return target.Do(func(ns.NetNS) error { return f() }) }
	guards := Guards{Dir: t.TempDir()}
	install := func() error { return in(func() error { return guards.Install(guard) }) }
	link, err := func() (l netlink.Link, err error) {
		err = in(func() error { l, err = netlink.LinkByName(hostIf); return err })
		return l, err
	}()
	if err != nil {
		t.Fatal(err)
	}

	xdp := loadBPF(t, unix.BPF_PROG_TYPE_XDP, 2) // XDP_PASS
	if err := in(func() error { return netlink.LinkSetXdpFd(link, xdp) }); err != nil {
		t.Fatalf("attaching an XDP program: %v", err)
	}
	if err := install(); err == nil || !strings.Contains(err.Error(), "an XDP program") {
		t.Errorf("guarding a veth with an XDP program: %v", err)
	}
	if err := in(func() error { return netlink.LinkSetXdpFd(link, -1) }); err != nil {
		t.Fatal(err)
	}
	if err := install(); err != nil {
		t.Errorf("guarding the veth once its XDP program went: %v", err)
	}
	if err := in(func() error { return guards.Remove(guard.ID) }); err != nil {
		t.Fatal(err)
	}

	tc := loadBPF(t, unix.BPF_PROG_TYPE_SCHED_CLS, 0) // TC_ACT_OK
	var tcx int
	err = in(func() error {
		var attr [64]byte // union bpf_attr's link_create: prog_fd, target_ifindex, attach_type
		binary.NativeEndian.PutUint32(attr[0:], uint32(tc))
		binary.NativeEndian.PutUint32(attr[4:], uint32(link.Attrs().Index))
		binary.NativeEndian.PutUint32(attr[8:], unix.BPF_TCX_INGRESS)
		fd, _, errno := unix.Syscall(unix.SYS_BPF, unix.BPF_LINK_CREATE, uintptr(unsafe.Pointer(&attr[0])), uintptr(len(attr)))
		if errno != 0 {
			return fmt.Errorf("attaching a tcx program: %w", errno)
		}
		tcx = int(fd)
		return nil
	})
	if errors.Is(err, unix.EINVAL) && !kernelAtLeast(t, 6, 6) {
		t.Log("no tcx before Linux 6.6: a veth here has no tcx program to refuse")
		return
	}
	if err != nil {
		t.Fatal(err)
	}
	if err := install(); err == nil || !strings.Contains(err.Error(), "a tcx program") {
		t.Errorf("guarding a veth with a tcx program: %v", err)
	}
	unix.Close(tcx) // the link's last reference: the program is detached
	if err := install(); err != nil {
		t.Errorf("guarding the veth once its tcx program went: %v", err)
	}
}

// kernelAtLeast reports whether the running kernel is major.minor or later.
func kernelAtLeast(t *testing.T, major, minor int) bool {
	t.Helper()
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		t.Fatal(err)
	}
	var got [2]int
	if _, err := fmt.Sscanf(unix.ByteSliceToString(u.Release[:]), "%d.%d", &got[0], &got[1]); err != nil {
		t.Fatalf("kernel release %q: %v", u.Release[:], err)
	}
	return got[0] > major || got[0] == major && got[1] >= minor
}

// loadBPF loads a program of the type that returns ret and does nothing
// else.
func loadBPF(t *testing.T, progType uint32, ret int32) int {
	t.Helper()
	// mov64 r0, ret; exit
	insns := make([]byte, 16)
	insns[0], insns[8] = 0xb7, 0x95
	binary.NativeEndian.PutUint32(insns[4:], uint32(ret))
	license := []byte("GPL\x00")
	var attr [128]byte // union bpf_attr's prog_load: prog_type, insn_cnt, insns, license
	binary.NativeEndian.PutUint32(attr[0:], progType)
	binary.NativeEndian.PutUint32(attr[4:], uint32(len(insns)/8))
	binary.NativeEndian.PutUint64(attr[8:], uint64(uintptr(unsafe.Pointer(&insns[0]))))
	binary.NativeEndian.PutUint64(attr[16:], uint64(uintptr(unsafe.Pointer(&license[0]))))
	fd, _, errno := unix.Syscall(unix.SYS_BPF, unix.BPF_PROG_LOAD, uintptr(unsafe.Pointer(&attr[0])), uintptr(len(attr)))
	runtime.KeepAlive(insns)
	runtime.KeepAlive(license)
	if errno != 0 {
		t.Fatalf("loading a BPF program of type %d: %v", progType, errno)
	}
	t.Cleanup(func() { unix.Close(int(fd)) })
	return int(fd)
}

// held names the interfaces Hold holds.
func held() (map[string]bool, error) {
	c, err := nftables.New()
	if err != nil {
		return nil, err
	}
	held := map[string]bool{}
	for _, f := range guardFamilies {
		holds, err := c.GetSetByName(&nftables.Table{Family: f, Name: GuardTable}, holdSet)
		if err != nil {
			continue // no table, or no hold yet
		}
		elems, err := c.GetSetElements(holds)
		if err != nil {
			return nil, err
		}
		for _, e := range elems {
			held[unix.ByteSliceToString(e.Key)] = true
		}
	}
	return held, nil
}

func TestSolicitedNode(t *testing.T) {
	if got := solicitedNode(netip.MustParseAddr("2001:db8::12:3456:789a")); got != netip.MustParseAddr("ff02::1:ff56:789a") {
		t.Errorf("solicited-node address of 2001:db8::12:3456:789a: %v", got)
	}
}
