//go:build e2e

package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Kernels unlike this machine's: the distribution's packaged kernel
// (Debian 12's 6.1, Ubuntu's 6.8), booted by hack/kernel-vm.sh under
// QEMU with this host's files as its root. Each test's script prints
// key=value lines, which the test then checks.

// onPackagedKernel boots the packaged kernel with the kernel arguments
// and runs the script there as root, from this directory, with $CF the
// childflow under test and $HACK the repository's hack directory.
func onPackagedKernel(t *testing.T, kernelArgs, script string) map[string]string {
	t.Helper()
	requireRoot(t)
	hack, err := filepath.Abs("../../hack")
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "script.sh")
	script = fmt.Sprintf("CF=%s\nHACK=%s\n%s", bin, hack, script)
	if err := os.WriteFile(path, []byte(script), 0o644); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	cmd := exec.Command(filepath.Join(hack, "kernel-vm.sh"), "-a", kernelArgs, "run", path)
	// A boot and its script take 10-45 s under emulation: a stalled guest
	// fails its test in minutes, not the whole package at its deadline.
	cmd.Env = append(os.Environ(), "CHILDFLOW_VM_TIMEOUT=240")
	out, err := cmd.CombinedOutput()
	t.Logf("on the packaged kernel (%s, %.0f s):\n%s", kernelArgs, time.Since(start).Seconds(), out)
	if err != nil {
		t.Fatalf("kernel-vm.sh: %v", err)
	}
	kv := map[string]string{}
	for _, line := range strings.Split(string(out), "\n") {
		if k, v, ok := strings.Cut(line, "="); ok && !strings.ContainsAny(k, " \t") {
			kv[k] = v
		}
	}
	return kv
}

// want checks the script's values.
func want(t *testing.T, kv map[string]string, pairs ...string) {
	t.Helper()
	for i := 0; i < len(pairs); i += 2 {
		if got := kv[pairs[i]]; got != pairs[i+1] {
			t.Errorf("%s = %q, want %q", pairs[i], got, pairs[i+1])
		}
	}
}

// Before Linux 6.17 the kernel forwards IPv6 only with conf.all.forwarding
// (force_forwarding is 6.17's): `--root` turned on the latter alone, found
// it missing, and the sandbox's IPv6 went nowhere (curl timed out).
func TestRootForwardsIPv6OnKernelsBefore617(t *testing.T) {
	kv := onPackagedKernel(t, "", `
echo kernel=$(uname -r)
[ -e /proc/sys/net/ipv6/conf/all/force_forwarding ] && echo force_forwarding=present || echo force_forwarding=absent
$HACK/testnet.sh up vm >/tmp/testnet.log 2>&1 || { cat /tmp/testnet.log; exit 1; }
settings() { echo "$1=$(sysctl -n net.ipv6.conf.all.forwarding) $(sysctl -n net.ipv6.conf.vm-h.accept_ra) $(sysctl -n net.ipv6.conf.default.accept_ra) $(sysctl -n net.ipv4.ip_forward)"; }
settings before
for a in 203.0.113.10 '[2001:db8::10]'; do
	f=$(echo "$a" | tr -d '[]')
	echo "root_$f=$($CF --root -- curl -sS -m 10 -o /dev/null -w '%{http_code}' "http://$a/")"
	echo "rootless_$f=$(su nobody -s /bin/sh -c "$CF -- curl -sS -m 10 -o /dev/null -w '%{http_code}' 'http://$a/'")"
done
rm -f /tmp/running
$CF --root -- sh -c 'touch /tmp/running; sleep 30' &
while [ ! -e /tmp/running ]; do sleep 0.1; done
settings during
kill $!; wait
settings after
echo left=$(ls -A /run/childflow/root | tr '\n' ' ')$(ip -o link | grep -c cfr)
`)
	if kv["force_forwarding"] != "absent" {
		t.Fatalf("the packaged kernel (%s) has force_forwarding: this test wants one before Linux 6.17", kv["kernel"])
	}
	want(t, kv,
		"root_203.0.113.10", "200", "root_2001:db8::10", "200",
		"rootless_203.0.113.10", "200", "rootless_2001:db8::10", "200",
		// all.forwarding and ip_forward on, and accept_ra 2 where it was 1,
		// for the run only.
		"before", "0 1 1 0", "during", "1 2 2 1", "after", "0 1 1 0",
		"left", ".lock 0")
}

// A kernel booted with ipv6.disable=1 refuses every IPv6 address, route
// and rule: childflow failed to start, rootless ("adding address
// fd00:cf::2/64 to cf0: operation not supported") and with --root
// ("adding ip rule ...: address family not supported by protocol").
func TestAKernelWithoutIPv6(t *testing.T) {
	// A container too, under runc, its hook starting an engine of its own.
	n := &node{dir: shortTempDir(t, "cfvm")}
	n.socket, n.state = filepath.Join(n.dir, "engine.sock"), filepath.Join(n.dir, "state")
	ann := map[string]string{"childflow.dev/default-policy": "deny", "childflow.dev/allow-domains": "web.test", "childflow.dev/dns": "203.0.113.53"}
	container := bundle(t, ann, n.hooks(), `printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 3 web.test 80 | grep -q hello && echo reach-web
echo "$(ip -o addr show cf0 | grep -c inet6) IPv6 addresses"`)
	kv := onPackagedKernel(t, "ipv6.disable=1", "BUNDLE="+container+`
[ -e /proc/sys/net/ipv6 ] && echo ipv6=present || echo ipv6=absent
# The testnet's servers want IPv6: a web server and a resolver of its own.
ip netns add inet
ip link add vm-h type veth peer name eth0 netns inet
ip addr add 203.0.113.1/26 dev vm-h; ip link set vm-h up
ip -n inet addr add 203.0.113.10/26 dev eth0; ip -n inet addr add 203.0.113.53/26 dev eth0
ip -n inet link set eth0 up; ip -n inet link set lo up; ip -n inet route add default via 203.0.113.1
mkdir -p /tmp/www; echo hello >/tmp/www/index.html
ip netns exec inet busybox httpd -p 80 -h /tmp/www
ip netns exec inet dnsmasq --no-resolv --no-hosts --listen-address=203.0.113.53 --bind-interfaces \
	--host-record=web.test,203.0.113.10 --pid-file=/run/dnsmasq.pid
# A link that forwards where the host does not: --root turns ip_forward on,
# which sets every link's value, and off again, which clears them.
sysctl -qw net.ipv4.conf.vm-h.forwarding=1
script='echo nameservers=$(grep -c ^nameserver /etc/resolv.conf)
echo web=$(curl -sS -m 10 http://web.test/)
curl -6 -sS -m 5 http://web.test/ 2>/dev/null; echo ipv6_curl=$?'
su nobody -s /bin/sh -c "$CF -d 203.0.113.53 -- sh -c '$script'" | sed 's/^/rootless_/'
$CF --root -d 203.0.113.53 -- sh -c "$script" | sed 's/^/root_/'
runc --root /run/runc-vm run --bundle $BUNDLE cf-vm >/tmp/container.out 2>&1
echo container_exit=$?
echo container=$(tr '\n' ' ' </tmp/container.out)
echo ip_forward=$(sysctl -n net.ipv4.ip_forward)
echo vm_h_forwarding=$(sysctl -n net.ipv4.conf.vm-h.forwarding)
echo rules=$(ip rule | wc -l)
echo left=$(ls -A /run/childflow/root | tr '\n' ' ')$(ip -o link | grep -c cfr)
`)
	want(t, kv, "ipv6", "absent",
		// One nameserver, the IPv4 gateway; no IPv6 to try, nor to leak
		// through: no name is resolved for it (curl's 6).
		"rootless_nameservers", "1", "rootless_web", "hello", "rootless_ipv6_curl", "6",
		"root_nameservers", "1", "root_web", "hello", "root_ipv6_curl", "6",
		"container_exit", "0", "container", "reach-web 0 IPv6 addresses",
		// Put back as found.
		"ip_forward", "0", "vm_h_forwarding", "1",
		"rules", "3", "left", ".lock 0")
}

// A device of the node's moved into a sandbox's namespace (the
// host-device plugin moves a NIC or a VF into a pod for Multus) has no
// kind, as an interface made in a namespace always has, and nothing on
// the host can guard it: a process with CAP_NET_RAW would write frames
// onto the node's network from it. The daemon keeps it down. Only a VM
// has a NIC to spare (QEMU's, which reaches nothing). The hook is run by
// hand, as a runtime runs it: runc stalled the emulator (soft lockups).
func TestADeviceMovedIntoASandboxIsKeptDown(t *testing.T) {
	n := &node{dir: shortTempDir(t, "cfvm")}
	n.socket, n.state = filepath.Join(n.dir, "engine.sock"), filepath.Join(n.dir, "state")
	container := bundle(t, sandboxedAnn, nil, "")
	kv := onPackagedKernel(t, "", "BUNDLE="+container+" SOCK="+n.socket+" STATE="+n.state+" HOOK="+filepath.Join(filepath.Dir(bin), "childflow-hook")+`
modprobe virtio_net
nic=$(ls /sys/class/net | grep -vx lo | head -1)
echo nic=$nic
$CF daemon --socket $SOCK --state-dir $STATE --flow-log-dir /tmp/flows --dns 203.0.113.53 >/tmp/daemon.log 2>&1 &
while [ ! -S $SOCK ]; do sleep 0.1; done
unshare -n sleep 120 &
pid=$!
echo '{"ociVersion": "1.0.2", "id": "cf-nic", "status": "creating", "pid": '$pid', "bundle": "'$BUNDLE'"}' | $HOOK --socket $SOCK --state-dir $STATE createRuntime
echo hook=$?
ip link set $nic netns $pid
nsenter -t $pid -n ip link set $nic up
up() { nsenter -t $pid -n ip -o link show $nic | grep -qE '<([^>]*,)?UP[,>]' && echo up || echo down; }
for i in $(seq 50); do [ "$(up)" = down ] && break; sleep 0.1; done
echo after_up=$(up)
nsenter -t $pid -n ip link set $nic up
sleep 0.5
echo after_second_up=$(up)
echo logged=$(grep -c "device $nic was moved into its namespace and brought up: set down" /tmp/daemon.log)
`)
	if kv["nic"] == "" {
		t.Fatal("the VM has no NIC")
	}
	want(t, kv, "hook", "0", "after_up", "down", "after_second_up", "down", "logged", "2")
}
