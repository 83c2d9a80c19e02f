//go:build e2e

package e2e

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// rootArgs runs childflow's rootful backend.
var rootArgs = []string{"--root"}

func TestRootPolicy(t *testing.T) {
	requireRoot(t)
	before := rootHostState(t)
	for _, tc := range policyCases(hostServer(t)) {
		t.Run(tc.name, func(t *testing.T) {
			r := sh(t, root, append(rootArgs, tc.flags...), tc.shell())
			if r.code != 0 {
				t.Fatal(r)
			}
		})
	}
	if after := rootHostState(t); after != before {
		t.Fatalf("host state changed:\nbefore:\n%s\nafter:\n%s", before, after)
	}
}

// Debian and Ubuntu filter by reverse path (rp_filter 2, loose, on every
// link), some hosts strictly (1). The kernel checks a reply to the
// sandbox with a lookup as from the sandbox's link, which the routing
// backstop refused: every reply was dropped, and nothing the sandbox was
// allowed to reach answered (curl timed out). The replies now carry the
// slot's mark, which that lookup reads while src_valid_mark is on (set
// back after the run), and TPROXY's table has the way back.
func TestRootRepliesPassReversePathFiltering(t *testing.T) {
	requireRoot(t)
	for _, mode := range []string{"2", "1"} {
		t.Run("rp_filter="+mode, func(t *testing.T) {
			setForTheTest(t, "/proc/sys/net/ipv4/conf/all/rp_filter", mode)
			before := rootHostState(t)
			r := sh(t, root, append(rootArgs, "--allow-cidr", "203.0.113.0/24"), `
curl -sS -m3 -o /dev/null http://203.0.113.10/ && echo tcp
echo probe | socat -t2 - UDP:203.0.113.10:7 | grep -q probe && echo udp
ping -c1 -W2 203.0.113.10 >/dev/null && echo icmp`)
			wantLines(t, r.stdout, "tcp", "udp", "icmp")
			// Through the proxy: TPROXY hands the sandbox's connections to
			// childflow, and the check of their source reads their mark.
			// Three times: the end of each run once warned, 6 runs in 10,
			// that the routes copied for TPROXY (gone with the sandbox's
			// link) could not be put back.
			for range 3 {
				r = sh(t, root, append(rootArgs, "-p", squidAuth, "-U", "alice", "-P", "s3cret"), `curl -sS -m3 -o /dev/null http://203.0.113.10/ && echo proxied`)
				wantLines(t, r.stdout, "proxied")
				if r.stderr != "" {
					t.Errorf("stderr: %s", r.stderr)
				}
			}
			if after := rootHostState(t); after != before {
				t.Fatalf("host state changed:\nbefore:\n%s\nafter:\n%s", before, after)
			}
		})
	}
}

// A host that turned IPv6 off for new links (net.ipv6.conf.default.
// disable_ipv6, as some hardening guides say) refused the sandbox's veth
// its IPv6 address, and --root did not start ("permission denied").
// IPv6 is on for that link only.
func TestRootStartsWhereTheHostTurnedIPv6Off(t *testing.T) {
	requireRoot(t)
	requireIPv6(t)
	setForTheTest(t, "/proc/sys/net/ipv6/conf/default/disable_ipv6", "1")
	r := sh(t, root, append(rootArgs, "--allow-cidr", "203.0.113.0/24", "--allow-cidr", "2001:db8::/32"), `
curl -sS -m3 -o /dev/null http://203.0.113.10/ && echo v4
curl -sS -m3 -o /dev/null 'http://[2001:db8::10]/' && echo v6`)
	if r.code != 0 {
		t.Fatal(r)
	}
	wantLines(t, r.stdout, "v4", "v6")
}

// A sandbox that reuses the slot and the addresses of one before it
// inherits none of its connections: conntrack's entries of the first,
// which carry the slot's mark, passed for the second's as established,
// past its policy (a UDP echo from the same port through a --deny-cidr
// for the echo server).
func TestRootSandboxInheritsNoConnections(t *testing.T) {
	requireRoot(t)
	const probe = `ip -4 -o addr show cf0 | awk '{ print $4 }'
echo udp-probe | socat -t1 - UDP:203.0.113.10:7,sourceport=40007 | grep -q udp-probe && echo udp
ping -c1 -W1 203.0.113.10 >/dev/null 2>&1 && echo icmp
exit 0`
	first := sh(t, root, rootArgs, probe)
	lines := strings.Fields(first.stdout)
	if first.code != 0 || len(lines) != 3 || lines[1] != "udp" || lines[2] != "icmp" {
		t.Fatalf("the first sandbox: %v", first)
	}
	second := sh(t, root, append(rootArgs, "--deny-cidr", "203.0.113.10/32"), probe)
	if second.code != 0 || strings.TrimSpace(second.stdout) != lines[0] {
		t.Fatalf("the second sandbox, at %s as the first, reached the denied host: %v", lines[0], second)
	}
}

// A connection a conntrack helper expects is the policy's to decide, not
// passed as the sandbox's own: on a host that assigns ftp's helper to
// what its sandboxes send, an FTP server's PASV answer naming port 853
// of its address opened DNS over TLS there, which the policy refuses.
// One to a port the policy allows still works.
func TestRootHelpersOpenNothing(t *testing.T) {
	requireRoot(t)
	const table = "cfe2e-ftp-helper"
	helper := exec.Command("nft", "-f", "-")
	helper.Stdin = strings.NewReader(`table inet ` + table + ` {
	ct helper ftp { type "ftp" protocol tcp; }
	chain pre { type filter hook prerouting priority filter; iifname "cfr*" tcp dport 21 ct helper set "ftp"; }
}`)
	if out, err := helper.CombinedOutput(); err != nil {
		t.Fatalf("assigning ftp's helper: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("nft", "delete", "table", "inet", table).Run() })
	serveInTestnet(t, "python3", "../testdata/pasv.py", "203.0.113.10")
	cmd := exec.Command(bin, append(append([]string{}, rootArgs...), "--", "python3", "-c", `
import socket, sys
c = socket.create_connection(("203.0.113.10", 21), timeout=5)
f = c.makefile("rb")
f.readline()
c.sendall(b"PASV\r\n")
f.readline()
print("answered", flush=True)
sys.stdin.readline()
for port in 853, 2121:
    try:
        print(socket.create_connection(("203.0.113.10", port), timeout=3).recv(64).decode().strip())
    except OSError as e:
        print("refused:", e)
    c.sendall(b"PASV\r\n")
    f.readline()
c.sendall(b"QUIT\r\n")
`)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	stdin, _ := cmd.StdinPipe()
	stdout, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Wait()
	defer stdin.Close()
	lines := bufio.NewScanner(stdout)
	if !lines.Scan() || lines.Text() != "answered" {
		t.Fatalf("the sandbox's ftp client: %q, stderr %q", lines.Text(), stderr.String())
	}
	if expected, _ := os.ReadFile("/proc/net/nf_conntrack_expect"); !regexp.MustCompile(`dport=853 .*ftp`).Match(expected) {
		t.Fatalf("ftp's helper expects no connection to port 853 (the test proves nothing): %q", expected)
	}
	stdin.Write([]byte("go\n"))
	if !lines.Scan() || !strings.HasPrefix(lines.Text(), "refused:") {
		t.Fatalf("the connection the helper expected got past the policy: %q, stderr %q", lines.Text(), stderr.String())
	}
	// One the policy allows works: its answers are the sandbox's.
	if !lines.Scan() || lines.Text() != "reached the allowed port" {
		t.Fatalf("the allowed connection the helper expected: %q, stderr %q", lines.Text(), stderr.String())
	}
}

func TestRootProcessSemantics(t *testing.T) {
	requireRoot(t)
	if r := sh(t, root, rootArgs, "exit 7"); r.code != 7 {
		t.Fatal(r)
	}
	if r := sh(t, root, rootArgs, "kill -TERM $$"); r.code != 128+15 {
		t.Fatal(r)
	}
	// Through sudo the command runs as the invoking user, without
	// capabilities: it cannot change its network.
	r := execute(t, "env", "SUDO_UID=65534", "SUDO_GID=65534", bin, "--root", "--", "sh", "-c",
		"id -u; ip route add 10.9.9.0/24 dev cf0 2>/dev/null && echo routed; ip link set cf0 down 2>/dev/null && echo downed; exit 0")
	if r.code != 0 || strings.TrimSpace(r.stdout) != "65534" {
		t.Fatal(r)
	}
}

func TestRootFlowLogCaptureAndLeak(t *testing.T) {
	requireRoot(t)
	dir := t.TempDir()
	log, pcap := filepath.Join(dir, "flows.jsonl"), filepath.Join(dir, "child.pcapng")
	r := sh(t, root, append(rootArgs, "--deny-cidr", "203.0.113.20/32", "--flow-log", log, "-c", pcap, "--fail-on-leak", "--summary-format", "json", "--summary"), `
curl -sS -m4 -o /dev/null http://web.test/
curl -sS -m4 -o /dev/null http://203.0.113.20/ && exit 9
echo udp-probe | socat -t1 - UDP:203.0.113.10:7
ping -c2 -i0.5 -W1 203.0.113.10 >/dev/null || exit 8
ping -c7 -W1 203.0.113.20 >/dev/null && exit 9
exit 0`)
	if r.code != 3 || !strings.Contains(r.stderr, "--fail-on-leak: 2 flow(s) were blocked") {
		t.Fatal(r)
	}
	events := readFlowLog(t, log)
	find := func(event, dst string) map[string]any {
		for _, ev := range events {
			if ev["event"] == event && (dst == "" || ev["dst"] == dst) {
				return ev
			}
		}
		b, _ := os.ReadFile(log)
		t.Fatalf("no %s to %q in:\n%s", event, dst, b)
		return nil
	}
	if ev := find("dns_answer", ""); ev["qname"] != "web.test" {
		t.Fatalf("dns_answer %v", ev)
	}
	if ev := find("connect_attempt", "203.0.113.10:80"); ev["verdict"] != "allow" || ev["proto"] != "tcp" || ev["flow_id"] == nil {
		t.Fatalf("allowed attempt %v", ev)
	}
	// The kernel decides, the flow log follows: a process still holding
	// its socket then (socat waits a second) is named.
	if ev := find("connect_attempt", "203.0.113.10:7"); ev["proto"] != "udp" || ev["comm"] != "socat" || ev["pid"] == nil {
		t.Fatalf("udp attempt %v", ev)
	}
	if ev := find("policy_violation", "203.0.113.20:80"); ev["reason_code"] != "deny_cidr" || ev["control"] != "deny_cidrs" || ev["matched_cidr"] != "203.0.113.20/32" {
		t.Fatalf("violation %v", ev)
	}
	// A ping is one flow, found by its echo identifier, as in the
	// rootless engine, allowed or not: a denied one too, however long
	// its echoes are refused.
	for event, dst := range map[string]string{"connect_attempt": "203.0.113.10:0", "policy_violation": "203.0.113.20:0"} {
		if ev := find(event, dst); ev["proto"] != "icmp" || ev["comm"] != "ping" || ev["pid"] == nil || !strings.HasSuffix(fmt.Sprint(ev["src"]), ":0") {
			t.Errorf("%s of a ping: %v", event, ev)
		}
	}
	violations := 0
	for _, ev := range events {
		if ev["event"] == "policy_violation" && ev["dst"] == "203.0.113.20:0" {
			violations++
		}
	}
	if violations != 1 {
		t.Errorf("a ping refused for 6 s is %d policy violations, want one", violations)
	}
	if !strings.Contains(r.stderr, `"policy_violation"`) {
		t.Fatalf("summary: %s", r.stderr)
	}
	if d := tshark(t, pcap, "frame.number == 1", "frame.interface_description"); len(d) != 1 || !strings.Contains(d[0], "root backend") {
		t.Fatalf("interface description %q", d)
	}
	if get := tshark(t, pcap, `http.request.method == "GET" && ip.dst == 203.0.113.10`, "http.host"); len(get) != 1 || get[0] != "web.test" {
		t.Fatalf("GET requests in the capture: %v", get)
	}
	if rst := tshark(t, pcap, "tcp.flags.reset == 1 && ip.src == 203.0.113.20", "tcp.srcport"); len(rst) == 0 {
		t.Fatal("the denied connection was not refused with a reset")
	}
}

// TestRootProxy: TCP is intercepted with TPROXY and carried by squid,
// whatever the client does; with --proxy-only nothing else leaves.
func TestRootProxy(t *testing.T) {
	requireRoot(t)
	log := filepath.Join(t.TempDir(), "flows.jsonl")
	r := sh(t, root, append(rootArgs, "-p", squidAuth, "-U", "alice", "-P", "s3cret", "--proxy-only", "--flow-log", log), `set -e
curl -sS -m5 --noproxy '*' http://web.test/
(echo quit; sleep 1) | nc -w3 web.test 25
if echo udp-probe | socat -t1 - UDP:203.0.113.10:7 | grep -q udp-probe; then echo UDP-LEAK; fi`)
	if r.code != 0 || !strings.Contains(r.stdout, "hello from the test internet") || !strings.Contains(r.stdout, "220 banner.test ESMTP ready") || strings.Contains(r.stdout, "UDP-LEAK") {
		t.Fatal(r)
	}
	waitFor(t, squidLog, "CONNECT web.test:25 alice")
	b, _ := os.ReadFile(log)
	if !strings.Contains(string(b), `"proxy_host":"web.test"`) || !strings.Contains(string(b), `"reason_code":"proxy_only"`) {
		t.Fatalf("flow log:\n%s", b)
	}
	// A proxy that is down: the connection fails, nothing goes direct.
	r = sh(t, root, append(rootArgs, "-p", "http://203.0.113.30:3999"), "curl -sS -m5 -o /dev/null http://203.0.113.10/")
	if r.code == 0 {
		t.Fatal("reached the web server without the proxy")
	}
}

// Where TPROXY finds no socket for a connection the sandbox opens
// (childflow's listener is gone: at the end of a run, or destroyed, as
// here), the kernel lets the packet go on: to the policy and, allowed,
// straight to its destination, around the proxy. It is refused.
func TestRootProxyFailsClosedWithoutItsListener(t *testing.T) {
	requireRoot(t)
	dir := logDir(t)
	ready, proceed := filepath.Join(dir, "ready"), filepath.Join(dir, "go")
	cmd := exec.Command(bin, append(append([]string{}, rootArgs...), "--dns", "203.0.113.53", "-p", squidOpen, "--", "sh", "-c", `
curl -sS -m5 -o /dev/null http://203.0.113.10/ || exit 11
ip -4 route show default | awk '{ print $3 }' > `+ready+`.tmp && mv `+ready+`.tmp `+ready+`
while [ ! -e `+proceed+` ]; do sleep 0.05; done
curl -sS -m3 http://203.0.113.10/ || exit 0`)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Wait()
	defer os.WriteFile(proceed, nil, 0o644)
	var gw []byte
	for deadline := time.Now().Add(10 * time.Second); len(gw) == 0; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the sandbox never got through the proxy: stdout %q, stderr %q", stdout.String(), stderr.String())
		}
		gw, _ = os.ReadFile(ready)
	}
	// Stops childflow's listener for the proxy (on the gateway, not port
	// 53): shut down for reading, a listening socket listens no more.
	out, _ := exec.Command("ss", "-Htlnp", "src", strings.TrimSpace(string(gw))).Output()
	stopped := 0
	for _, m := range regexp.MustCompile(`:(\d+) .*pid=(\d+),fd=(\d+)`).FindAllStringSubmatch(string(out), -1) {
		if m[1] == "53" {
			continue
		}
		pid, _ := strconv.Atoi(m[2])
		fd, _ := strconv.Atoi(m[3])
		pidfd, err := unix.PidfdOpen(pid, 0)
		if err != nil {
			t.Fatal(err)
		}
		ln, err := unix.PidfdGetfd(pidfd, fd, 0)
		unix.Close(pidfd)
		if err != nil {
			t.Fatal(err)
		}
		if err := unix.Shutdown(ln, unix.SHUT_RD); err != nil {
			t.Fatal(err)
		}
		unix.Close(ln)
		stopped++
	}
	if stopped == 0 {
		t.Fatalf("no listener of childflow's for the proxy on %s: %q", gw, out)
	}
	os.WriteFile(proceed, nil, 0o644)
	cmd.Wait()
	if code := cmd.ProcessState.ExitCode(); code != 0 || strings.Contains(stdout.String(), "hello from the test internet") {
		t.Fatalf("exit %d, stdout %q, stderr %q", code, stdout.String(), stderr.String())
	}
}

// The rootful backend's listeners (DNS over TCP, the proxy's intercepted
// connections) accept in childflow itself: a sandbox that holds more
// connections than childflow may open files made the accept loop fail
// with EMFILE and end, and DNS over TCP answered nothing for the rest of
// the run. Here childflow (and the sandbox) may open 256 files, and the
// sandbox holds 240 connections to its resolver, then lets them go.
func TestRootListenersOutliveRunningOutOfFiles(t *testing.T) {
	requireRoot(t)
	r := execute(t, append(append([]string{"prlimit", "--nofile=256:256", bin}, rootArgs...), "--dns", "203.0.113.53", "--", "sh", "-c", `
gw=$(awk '/^nameserver/ { print $2; exit }' /etc/resolv.conf)
perl -MIO::Socket::INET -e 'for (1..240) { push @c, (IO::Socket::INET->new("$ARGV[0]:53") or die "connect $_: $!") } sleep 1' "$gw" || exit 99
dig +short +tcp +time=3 +tries=2 @"$gw" web.test A`)...)
	if r.code != 0 || strings.TrimSpace(r.stdout) != "203.0.113.10" {
		t.Fatal(r)
	}
}

// The rootful backend holds at most 8192 of the sandbox's connections to
// the host (as the engine holds 8192 flows): the sandbox opens 8300 to
// its resolver and holds them until the last is reset, the ones over are
// logged once, and once it lets them go DNS over TCP answers again.
func TestRootLimitsTheConnectionsToTheHost(t *testing.T) {
	requireRoot(t)
	log := filepath.Join(t.TempDir(), "flows.jsonl")
	r := sh(t, root, append(rootArgs, "--flow-log", log), `ulimit -n 9000
gw=$(awk '/^nameserver/ { print $2; exit }' /etc/resolv.conf)
perl -MIO::Socket::INET -e 'for my $i (1..8300) {
	# One over the limit may be reset before connect returns, where the
	# process wakes up late (a busy or slow machine).
	my $c = IO::Socket::INET->new("$ARGV[0]:53") or $i > 8192 && $!{ECONNRESET} ? next : die "connect $i: $!";
	push @c, $c; $last = $i }
exit if $last < 8300; alarm 10; defined(sysread($c[-1], my $b, 1)) and die "the last connection was not reset\n"; print STDERR "reset: $!\n"' "$gw" || exit 99
dig +short +tcp +time=3 +tries=2 @"$gw" web.test A`)
	if r.code != 0 || strings.TrimSpace(r.stdout) != "203.0.113.10" {
		t.Fatal(r)
	}
	var failures []string
	for _, ev := range readFlowLog(t, log) {
		if ev["event"] == "runtime_failure" {
			failures = append(failures, fmt.Sprint(ev["error"]))
		}
	}
	if len(failures) != 1 || !strings.Contains(failures[0], "holds 8192 connections to the host") {
		t.Fatalf("runtime failures %q, want one about the limit", failures)
	}
}

// A sandbox flooding the rootful gateway's resolver with queries that
// wait for the upstream resolver (which never answers) makes at most 128
// wait at once; the rest are dropped, with one runtime_failure, where
// each used to hold a goroutine and a socket (20,000 descriptors, 364 MB
// in 4 s of such a flood).
func TestRootQueriesWaitWithinALimit(t *testing.T) {
	requireRoot(t)
	log := filepath.Join(t.TempDir(), "flows.jsonl")
	r := run(t, root, append(append([]string{"--dns", silentResolver(t), "--flow-log", log}, rootArgs...), "--", "sh", "-c",
		`gw=$(awk '/^nameserver/ { print $2; exit }' /etc/resolv.conf)
perl -MIO::Socket::INET -e '$s = IO::Socket::INET->new(PeerAddr => "$ARGV[0]:53", Proto => "udp") or die "socket: $!";
for my $i (1..2000) { send($s, pack("n6", $i, 0x100, 1, 0, 0, 0) . pack("C/a* C/a* x n2", "q$i", "test", 1, 1), 0) or die "send: $!" }
sleep 1' "$gw" || exit 99
exit 3`)...)
	if r.code != 3 {
		t.Fatal(r)
	}
	queries, failures := 0, []string{}
	for _, ev := range readFlowLog(t, log) {
		switch ev["event"] {
		case "dns_query":
			queries++
		case "runtime_failure":
			failures = append(failures, fmt.Sprint(ev["error"]))
		}
	}
	if queries != 128 {
		t.Errorf("%d queries logged, want the 128 that may wait", queries)
	}
	if len(failures) != 1 || !strings.Contains(failures[0], "128 DNS queries wait") {
		t.Errorf("runtime failures %q, want one about the limit", failures)
	}
}

// TestRootSandboxTakesNoCallsFromTheHost: the host cannot open a flow
// into a --root sandbox any more than into a rootless one. An --offline
// sandbox listening on TCP and UDP hears nothing from a host process, and
// sends nothing back: its answers would have left as established traffic,
// around its policy.
func TestRootSandboxTakesNoCallsFromTheHost(t *testing.T) {
	requireRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	addrFile := filepath.Join(t.TempDir(), "addr")
	cmd := command(ctx, root, append(append([]string{"--offline"}, rootArgs...), "--", "sh", "-c",
		`socat -u UDP-RECV:8001 OPEN:/dev/stdout & socat TCP-LISTEN:8000,reuseaddr SYSTEM:'echo called; echo answered >&2' &
until ss -Hln 'sport = :8000 or sport = :8001' | grep -c . | grep -qx 2; do sleep 0.02; done
ip -4 -o addr show scope global | awk '{print $4}' | cut -d/ -f1 > `+addrFile+`
sleep 4; kill %1 %2; exit 3`)...)
	var out, errb strings.Builder
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var addr string
	for deadline := time.Now().Add(10 * time.Second); addr == ""; time.Sleep(50 * time.Millisecond) {
		b, _ := os.ReadFile(addrFile)
		addr = strings.TrimSpace(string(b))
		if time.Now().After(deadline) {
			t.Fatal("the sandbox did not say its address, its listeners up")
		}
	}
	got, err := exec.Command("curl", "-sS", "-m2", "--http0.9", "http://"+addr+":8000/").CombinedOutput()
	if err == nil || strings.Contains(string(got), "called") {
		t.Errorf("the host's connection into the sandbox: %v, %q", err, got)
	}
	exec.Command("sh", "-c", "echo from-the-host | socat -u - UDP:"+addr+":8001").Run()
	cmd.Wait()
	if code := cmd.ProcessState.ExitCode(); code != 3 || strings.Contains(out.String(), "from-the-host") || strings.Contains(errb.String(), "answered") {
		t.Errorf("exit %d, the sandbox heard:\n%s\n%s", code, out.String(), errb.String())
	}
}

// A long deny list is enforced whole: with 1500 IPv6 ranges before the
// testnet's, the table used to hold part of the list without an error
// and the testnet's range was not in it; 3000 IPv4 ranges used to stop
// --root from starting.
func TestRootLongDenyLists(t *testing.T) {
	requireRoot(t)
	for _, tc := range []struct {
		name, dst string
		deny      func(i int) string
	}{
		{"ipv6", "[2001:db8::10]", func(i int) string { return fmt.Sprintf("2000:%x::/32", 2*i) }},
		{"ipv4", "203.0.113.10", func(i int) string { return fmt.Sprintf("100.%d.%d.0/24", i/128, i%128*2) }},
	} {
		if tc.name == "ipv6" && !hasIPv6 {
			continue // the IPv4 half alone, as elsewhere
		}
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{}, rootArgs...)
			for i := range map[string]int{"ipv6": 1500, "ipv4": 3000}[tc.name] {
				args = append(args, "--deny-cidr", tc.deny(i))
			}
			log := filepath.Join(t.TempDir(), "flows.jsonl")
			args = append(args, "--deny-cidr", "203.0.113.10/32", "--deny-cidr", "2001:db8::10/128", "--flow-log", log)
			r := sh(t, root, args, "curl -sS -m5 -o /dev/null http://"+tc.dst+"/ && exit 8; socat -u /dev/null TCP:203.0.113.53:53 || exit 9")
			if r.code != 0 {
				t.Fatal(r)
			}
			if !hasEvent(readFlowLog(t, log), map[string]any{"event": "policy_violation", "dst": tc.dst + ":80", "reason_code": "deny_cidr"}) {
				t.Errorf("no deny_cidr violation for %s:80", tc.dst)
			}
		})
	}
}

// TestRootIface: a second path to 203.0.113.0/26 through another veth,
// less preferred by the host's routes; --iface makes the sandbox take it,
// and its far end counts the packets.
func TestRootIface(t *testing.T) {
	requireRoot(t)
	const ns = "cfe2e-alt"
	setup := func(script string) {
		t.Helper()
		if out, err := exec.Command("sh", "-ec", script).CombinedOutput(); err != nil {
			t.Fatalf("%s: %v\n%s", script, err, out)
		}
	}
	setup(fmt.Sprintf(`ip netns add %[1]s
ip link add cfe2e-alt type veth peer name alt0 netns %[1]s
ip addr add 192.0.2.2/24 dev cfe2e-alt; ip link set cfe2e-alt up
ip -n %[1]s addr add 192.0.2.1/24 dev alt0; ip -n %[1]s link set alt0 up; ip -n %[1]s link set lo up
ip -n %[1]s addr add 203.0.113.10/32 dev lo
ip route add 203.0.113.0/26 via 192.0.2.1 dev cfe2e-alt metric 900
ip netns exec %[1]s nft add table inet count
ip netns exec %[1]s nft add chain inet count in '{ type filter hook input priority 0; }'
ip netns exec %[1]s nft add rule inet count in iifname alt0 tcp dport 80 counter`, ns))
	t.Cleanup(func() {
		exec.Command("ip", "route", "del", "203.0.113.0/26", "via", "192.0.2.1").Run()
		exec.Command("ip", "link", "del", "cfe2e-alt").Run()
		exec.Command("ip", "netns", "del", ns).Run()
	})
	// busybox httpd as the testnet's: socat's SYSTEM answered 2% of
	// requests with nothing on a busy host (its shell gone before the
	// request was written to it).
	www := logDir(t)
	if err := os.WriteFile(filepath.Join(www, "index.html"), []byte("alternate path\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	srv := exec.Command("ip", "netns", "exec", ns, "busybox", "httpd", "-f", "-p", "203.0.113.10:80", "-h", www)
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { srv.Process.Kill(); srv.Wait() })
	eventually(t, "the alternate path's web server to listen", func() bool {
		out, _ := exec.Command("ip", "netns", "exec", ns, "ss", "-Hltn", "sport = :80").Output()
		return len(out) > 0
	})
	counted := func() int {
		out, _ := exec.Command("ip", "netns", "exec", ns, "nft", "list", "table", "inet", "count").Output()
		m := regexp.MustCompile(`packets (\d+)`).FindStringSubmatch(string(out))
		if m == nil {
			t.Fatalf("counter: %s", out)
		}
		var n int
		fmt.Sscan(m[1], &n)
		return n
	}
	if r := sh(t, root, rootArgs, "curl -sS -m4 http://203.0.113.10/"); r.code != 0 || !strings.Contains(r.stdout, "hello from the test internet") || counted() != 0 {
		t.Fatalf("without --iface: %s (counted %d)", r, counted())
	}
	r := sh(t, root, append(rootArgs, "--iface", "cfe2e-alt"), "curl -sS -m4 http://203.0.113.10/")
	if r.code != 0 || !strings.Contains(r.stdout, "alternate path") || counted() == 0 {
		t.Fatalf("with --iface: %s (counted %d)", r, counted())
	}
	// Where the host filters by reverse path, strictly: the check of what
	// the sandbox sends and that of each reply look up by the mark, in
	// --iface's table (TestRootRepliesPassReversePathFiltering).
	t.Run("rp_filter=1", func(t *testing.T) {
		setForTheTest(t, "/proc/sys/net/ipv4/conf/all/rp_filter", "1")
		before := counted()
		r := sh(t, root, append(rootArgs, "--iface", "cfe2e-alt"), "curl -sS -m4 http://203.0.113.10/")
		if r.code != 0 || !strings.Contains(r.stdout, "alternate path") || counted() == before {
			t.Fatalf("with --iface: %s (counted %d, %d before)", r, counted(), before)
		}
	})
	// Its routing rule removed while the sandbox runs (networkd removes
	// rules it did not make), and childflow stopped so that it cannot put
	// it back: the packets do not leave by the host's other routes. Let
	// go, childflow puts the rule back, and they leave by --iface again.
	dir := logDir(t)
	ready, gone, tried, back := filepath.Join(dir, "ready"), filepath.Join(dir, "gone"), filepath.Join(dir, "tried"), filepath.Join(dir, "back")
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := command(ctx, root, append(rootArgs, "--iface", "cfe2e-alt", "--", "sh", "-c", "touch "+ready+"; "+shWaitFor(gone)+
		"curl -sS -m3 http://203.0.113.10/ >/dev/null 2>&1 && echo first-reached || echo first-failed; touch "+tried+"; "+
		shWaitFor(back)+"curl -sS -m3 http://203.0.113.10/")...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Wait()
	defer os.WriteFile(back, nil, 0o644)
	defer os.WriteFile(gone, nil, 0o644)
	defer cmd.Process.Signal(syscall.SIGCONT)
	ifaceRule := func() string {
		out, _ := exec.Command("ip", "rule").Output()
		if m := regexp.MustCompile(`fwmark (0xcf[0-9a-f]*2) lookup`).FindStringSubmatch(string(out)); m != nil {
			return m[1]
		}
		return ""
	}
	waitFor := func(what string, ok func() bool) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); !ok(); time.Sleep(20 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("%s:\n%s", what, out.String())
			}
		}
	}
	waitFor("the sandbox did not start", func() bool { return exists(ready) })
	mark := ifaceRule()
	if mark == "" {
		t.Fatal("no --iface rule")
	}
	cmd.Process.Signal(syscall.SIGSTOP)
	for _, fam := range append([]string{"-4"}, ipv6Only([]string{"-6"})...) {
		if out, err := exec.Command("ip", fam, "rule", "del", "pref", "3312", "fwmark", mark).CombinedOutput(); err != nil {
			t.Fatalf("deleting the --iface rule: %v\n%s", err, out)
		}
	}
	os.WriteFile(gone, nil, 0o644)
	waitFor("the sandbox did not try", func() bool { return exists(tried) })
	cmd.Process.Signal(syscall.SIGCONT)
	waitFor("the --iface rule was not put back", func() bool { return ifaceRule() == mark })
	os.WriteFile(back, nil, 0o644)
	cmd.Wait()
	if got := out.String(); !strings.Contains(got, "first-failed") || !strings.Contains(got, "alternate path") || strings.Contains(got, "hello from the test internet") {
		t.Errorf("with --iface, its rule gone, then back:\n%s", got)
	}
	if r := sh(t, root, append(rootArgs, "--iface", "nosuchif0"), "true"); r.code != 2 || !strings.Contains(r.stderr, `--iface "nosuchif0"`) {
		t.Fatal(r)
	}
}

// rootHostState is what a rootful run could leave behind: nftables,
// links, ip rules, routes, forwarding sysctls and its state directory
// (but its lock file).
// rootfulLeftovers lists what rootful sandboxes leave on the host when
// none runs: every one removes its record, veth, table, ip rules and
// the shared guard table before it exits, killed runs aside (their
// tests run `childflow cleanup`).
func rootfulLeftovers() string {
	var b strings.Builder
	records, _ := filepath.Glob("/run/childflow/root/*.json")
	for _, r := range records {
		fmt.Fprintln(&b, "record", r)
	}
	for _, argv := range [][]string{{"ip", "rule"}, {"ip", "-6", "rule"}, {"ip", "-o", "link", "show"}, {"nft", "list", "tables"}} {
		out, _ := exec.Command(argv[0], argv[1:]...).Output()
		for _, l := range strings.Split(string(out), "\n") {
			if strings.Contains(l, "cfr") || strings.Contains(l, "0xcf0") || strings.Contains(l, "childflow-root") {
				fmt.Fprintln(&b, strings.Join(argv, " ")+":", strings.TrimSpace(l))
			}
		}
	}
	return b.String()
}

func rootHostState(t *testing.T) string {
	t.Helper()
	var b strings.Builder
	for _, argv := range append([][]string{{"nft", "list", "ruleset"}, {"ip", "-o", "link", "show"}, {"ip", "rule"}, {"ip", "route", "show", "table", "all"}},
		ipv6Only([][]string{{"ip", "-6", "rule"}, {"ip", "-6", "route", "show", "table", "all"}})...) {
		out, err := exec.Command(argv[0], argv[1:]...).Output()
		if err != nil {
			t.Fatalf("%v: %v", argv, err)
		}
		// Link counters and ids change by themselves; names do not.
		for _, l := range strings.Split(string(out), "\n") {
			if strings.Contains(l, "fe80::") {
				continue // link-local addresses come when DAD ends, childflow or not
			}
			if argv[1] == "-o" {
				if f := strings.Fields(l); len(f) > 1 {
					l = f[1]
				}
			}
			fmt.Fprintln(&b, l)
		}
	}
	var sysctls []string
	for _, pat := range []string{"/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv4/conf/*/forwarding", "/proc/sys/net/ipv6/conf/*/forwarding", "/proc/sys/net/ipv6/conf/*/force_forwarding",
		"/proc/sys/net/ipv4/conf/*/src_valid_mark"} {
		files, _ := filepath.Glob(pat)
		for _, f := range files {
			v, _ := os.ReadFile(f)
			sysctls = append(sysctls, f+"="+strings.TrimSpace(string(v)))
		}
	}
	sort.Strings(sysctls)
	b.WriteString(strings.Join(sysctls, "\n"))
	entries, _ := os.ReadDir("/run/childflow/root")
	for _, e := range entries {
		if e.Name() != ".lock" {
			fmt.Fprintln(&b, "\nstate", e.Name())
		}
	}
	// Conntrack's entries with a slot's mark (0xcf......): a sandbox's
	// connections, which outlived it for up to 120 s (5 days established).
	ct, err := os.ReadFile("/proc/net/nf_conntrack")
	if err != nil && !os.IsNotExist(err) { // not loaded: no entries
		t.Fatal(err)
	}
	marked := 0
	for _, m := range regexp.MustCompile(`mark=(\d+)`).FindAllStringSubmatch(string(ct), -1) {
		if v, _ := strconv.ParseUint(m[1], 10, 32); v>>24 == 0xcf {
			marked++
		}
	}
	fmt.Fprintf(&b, "\nconntrack entries of childflow's: %d", marked)
	return b.String()
}

// A sandbox holds at most 8192 flows beyond the host, as the engine
// holds 8192: conntrack's table is the host's, and one that held
// connections open to a server of its own filled it for everyone. The
// 8193rd TCP connection is refused, logged once, and once the sandbox
// closes them a new one goes.
func TestRootLimitsItsConnections(t *testing.T) {
	requireRoot(t)
	serveInTestnet(t, "prlimit", "--nofile=20000:20000", "python3", "../testdata/holder.py", "203.0.113.10", "9102")
	log := filepath.Join(t.TempDir(), "flows.jsonl")
	// Under an emulated CPU (make e2e-vm) the connections take more than
	// run's minute.
	r := runWithin(t, 5*time.Minute, root, append(rootArgs, "--flow-log", log, "--", "sh", "-c", `ulimit -n 9000
perl -MIO::Socket::INET -e 'for (1..8300) { push @c, (IO::Socket::INET->new(PeerAddr => "203.0.113.10:9102", Timeout => 5) or last) } print scalar(@c), "\n"'
for i in 1 2 3 4 5 6 7 8 9 10; do curl -sS -m2 -o /dev/null http://203.0.113.10/ 2>/dev/null && echo again && exit 0; sleep 0.5; done`)...)
	if held := strings.Fields(r.stdout); r.code != 0 || len(held) == 0 || held[0] != "8192" || !strings.Contains(r.stdout, "again") {
		t.Fatalf("want 8192 connections held, then one more once they closed: %v", r)
	}
	failures := 0
	for _, ev := range readFlowLog(t, log) {
		if ev["event"] == "runtime_failure" && strings.Contains(fmt.Sprint(ev["error"]), "8192 flows beyond the host") {
			failures++
		}
	}
	if failures != 1 {
		t.Errorf("%d runtime_failure events for the limit, want 1", failures)
	}
}

// UDP flows count too: each answered once, they stay in conntrack's table
// 30 s after their last datagram (12000 from one sandbox, before). What
// the policy refused does not: 30000 datagrams to a denied host first.
// childflow is stopped meanwhile, so that the kernel drops the verdicts
// its log socket has no room for, the limit's last among them: the limit
// rule's counter still tells of it.
func TestRootLimitsItsUDPFlows(t *testing.T) {
	requireRoot(t)
	dir := logDir(t)
	file := func(name string) string { return filepath.Join(dir, name) }
	log := file("flows.jsonl")
	script, _ := filepath.Abs("../testdata/udpflows.py")
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	cmd := command(ctx, root, append(append([]string{}, rootArgs...), "--flow-log", log, "--deny-cidr", "203.0.113.20/32", "--", "sh", "-c",
		"ulimit -n 9000; touch "+file("ready")+"; "+shWaitFor(file("go"))+`
python3 -c 'import socket
for _ in range(30000): socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("203.0.113.20", 7))'
python3 `+script+" 203.0.113.10 7 8300 > "+file("out")+"; touch "+file("done")+"; "+shWaitFor(file("end")))...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Wait()
	defer cmd.Process.Signal(syscall.SIGCONT)
	touch := func(name string) {
		if err := os.WriteFile(file(name), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	eventually(t, "the sandbox to start", func() bool { return exists(file("ready")) })
	cmd.Process.Signal(syscall.SIGSTOP)
	touch("go")
	for deadline := time.Now().Add(90 * time.Second); !exists(file("done")); time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			touch("end")
			t.Fatal("the sandbox's flows did not end within 90 s")
		}
	}
	cmd.Process.Signal(syscall.SIGCONT)
	touch("end")
	if err := cmd.Wait(); err != nil {
		t.Fatalf("childflow: %v\n%s", err, out.String())
	}
	if got, _ := os.ReadFile(file("out")); strings.TrimSpace(string(got)) != "8192 0" {
		t.Fatalf("want 8192 UDP flows echoed, then none of three more: %q\n%s", got, out.String())
	}
	events := readFlowLog(t, log)
	dropped := false
	for _, ev := range events {
		dropped = dropped || ev["event"] == "runtime_failure" && strings.Contains(fmt.Sprint(ev["error"]), "the kernel dropped the verdicts")
	}
	if !dropped {
		t.Error("no verdicts dropped while childflow was stopped: the test proves nothing")
	}
	if !hasEvent(events, map[string]any{"event": "runtime_failure", "error": "the sandbox holds 8192 flows beyond the host (TCP connections, UDP and other flows), the limit: new ones are refused until some end"}) {
		t.Error("no runtime_failure event for the limit")
	}
}

// TestRootStress starts 50 rootful sandboxes, ten at a time, kills half
// of them with SIGKILL at random points of their life (setup included),
// runs `childflow cleanup`, and expects the host exactly as before.
func TestRootStress(t *testing.T) {
	requireRoot(t)
	before := rootHostState(t)
	rng := rand.New(rand.NewSource(time.Now().UnixNano()))
	delays := make([]time.Duration, 50)
	for i := range delays {
		if i%2 == 0 {
			delays[i] = time.Duration(rng.Intn(1500)) * time.Millisecond
		}
	}
	var wg sync.WaitGroup
	sem := make(chan struct{}, 10)
	var mu sync.Mutex
	var failures []string
	for i, delay := range delays {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			cmd := command(ctx, root, "--root", "--dns", "203.0.113.53", "--deny-cidr", "203.0.113.20/32", "--", "sh", "-c",
				"curl -sS -m5 -o /dev/null http://web.test/ && sleep 1")
			out := &strings.Builder{}
			cmd.Stdout, cmd.Stderr = out, out
			if err := cmd.Start(); err != nil {
				t.Error(err)
				return
			}
			if delay > 0 {
				time.Sleep(delay)
				cmd.Process.Kill()
				cmd.Wait()
				return
			}
			if err := cmd.Wait(); err != nil {
				mu.Lock()
				failures = append(failures, fmt.Sprintf("sandbox %d: %v: %s", i, err, out))
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	if len(failures) > 0 {
		t.Errorf("%d of the 25 sandboxes left to run failed:\n%s", len(failures), strings.Join(failures, "\n"))
	}
	r := run(t, root, "cleanup")
	if r.code != 0 {
		t.Fatal(r)
	}
	var after string
	for i := 0; i < 30; i++ {
		if after = rootHostState(t); after == before {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("host state changed:\nbefore:\n%s\nafter:\n%s\ncleanup said:\n%s", before, after, r)
}

// TestRootTeardownFailureIsReported: a `--root` run whose end cannot
// remove all it made (here its record, made immutable while it ran) says
// what failed and how the rest goes, keeps the command's exit status,
// and `childflow cleanup` then removes what is left.
func TestRootTeardownFailureIsReported(t *testing.T) {
	requireRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := command(ctx, root, "--root", "--", "sh", "-c", "echo running; head -c1 >/dev/null; exit 5")
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// The command runs: its record is written whole.
	line, _ := bufio.NewReader(stdout).ReadString('\n')
	found, _ := filepath.Glob("/run/childflow/root/[^.]*.json")
	if line != "running\n" || len(found) != 1 {
		cmd.Process.Kill()
		cmd.Wait()
		t.Fatalf("command said %q, records %q; stderr %q", line, found, stderr.String())
	}
	record := found[0]
	if out, err := exec.Command("chattr", "+i", record).CombinedOutput(); err != nil {
		t.Fatalf("chattr +i %s: %v: %s", record, err, out)
	}
	t.Cleanup(func() { exec.Command("chattr", "-i", record).Run() })
	stdin.Write([]byte("x"))
	stdin.Close()
	cmd.Wait()
	want := "childflow: --root: removing the sandbox's objects: remove " + record + ": operation not permitted (the next --root run or `childflow cleanup` removes what is left)\n"
	if code := cmd.ProcessState.ExitCode(); code != 5 || stderr.String() != want {
		t.Errorf("exit %d, stderr %q; want 5 and %q", code, stderr.String(), want)
	}
	if left := rootfulLeftovers(); left != "record "+record+"\n" {
		t.Errorf("left after the failed teardown, want the record alone:\n%s", left)
	}
	if out, err := exec.Command("chattr", "-i", record).CombinedOutput(); err != nil {
		t.Fatalf("chattr -i %s: %v: %s", record, err, out)
	}
	if r := run(t, root, "cleanup"); r.code != 0 {
		t.Errorf("cleanup: %s", r)
	}
	if _, err := os.Stat(record); !os.IsNotExist(err) {
		t.Errorf("the record is still there after cleanup: %v", err)
	}
}

// TestRootCleanupRemovesStrayBackstops: the routing backstop of a link
// no record names (a record removed by hand) goes with `childflow
// cleanup`, and a rule of the same priorities that is not childflow's
// stays.
func TestRootCleanupRemovesStrayBackstops(t *testing.T) {
	requireRoot(t)
	ipAll(t, [][]string{
		{"rule", "add", "pref", "3310", "iif", "cfrdeadbeef", "fwmark", "0xcf000010/0xfffffff0", "goto", "3312"},
		{"rule", "add", "pref", "3311", "iif", "cfrdeadbeef", "prohibit"},
		{"rule", "add", "pref", "3312", "iif", "cfrdeadbeef", "nop"},
		{"rule", "add", "pref", "3311", "iif", "other0", "prohibit"},
	}, [][]string{
		{"-6", "rule", "add", "pref", "3311", "iif", "cfrdeadbeef", "prohibit"},
	})
	t.Cleanup(func() { exec.Command("ip", "rule", "del", "pref", "3311", "iif", "other0", "prohibit").Run() })
	removed := fmt.Sprintf("%d ip rule", 3+ipv6Only(1))
	if r := run(t, root, "cleanup"); r.code != 0 || !strings.Contains(r.stdout+r.stderr, removed) {
		t.Errorf("cleanup: %s", r)
	}
	out, _ := exec.Command("sh", "-c", "ip rule; ip -6 rule").Output()
	if strings.Contains(string(out), "cfrdeadbeef") || !strings.Contains(string(out), "other0") {
		t.Errorf("rules after cleanup:\n%s", out)
	}
}
