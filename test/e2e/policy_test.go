//go:build e2e

package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// assertions for sandbox scripts: ok CMD must succeed, no CMD must fail.
const assertions = `
ok() { "$@" >/dev/null 2>&1 || { echo "FAIL ok: $*"; exit 1; }; }
no() { if "$@" >/dev/null 2>&1; then echo "FAIL no: $*"; exit 1; fi; }
get() { curl -sS -m4 -o /dev/null "$@"; }
udp() { echo udp-probe | socat -t1 - "$1" | grep -q udp-probe; }
resolves() { dig +short +time=2 +tries=1 "$@" | grep -q .; }
GW=$(ip -4 route show default | cut -d' ' -f3)
GW6=$(ip -6 route show default | cut -d' ' -f3)
`

// policyCase is one policy and a script of what it lets through; the
// rootless and the rootful (--root) backends run the same table.
type policyCase struct {
	name   string
	flags  []string
	script string
}

// hostServer answers HTTP on every address of the host: the sandbox must
// not reach it through the gateway or the host's own addresses.
func hostServer(t *testing.T) int {
	return tcpServer(t, "tcp", ":0", func(c net.Conn) {
		// Read the request first: closing with it unread would reset
		// the connection under the response.
		c.SetReadDeadline(time.Now().Add(2 * time.Second))
		c.Read(make([]byte, 4096))
		c.Write([]byte("HTTP/1.0 200 OK\r\n\r\nhost\n"))
		c.Close()
	})
}

// The gateways: rootless 10.87.0.1, 172.29.87.1, 192.168.187.1 (and
// fd00:cf::1, fd87:cf::1); rootful in 10.88.0.0/16 and fd87:cf88::/48.
func policyCases(hostPort int) []policyCase {
	return []policyCase{
		{"deny-cidr v4 v6 tcp udp icmp mapped", []string{"--deny-cidr", "203.0.113.20/32", "--deny-cidr", "2001:db8::20/128"}, `
ok get http://203.0.113.10/
no get http://203.0.113.20/
no get 'http://[::ffff:203.0.113.20]/'
no get -6 'http://[2001:db8::20]/'
ok get -6 'http://[2001:db8::10]/'
ok udp UDP:203.0.113.10:7
no udp UDP:203.0.113.20:7
no udp 'UDP6:[2001:db8::20]:7'
no ping -c1 -W2 203.0.113.20
no get http://denied.test/`},
		{"a rule in a tunnelled IPv6 form names the IPv4 inside", []string{"--deny-cidr", "64:ff9b::cb00:7114/128", "--deny-cidr", "2002:cb00:711e::/48"}, `
no get http://203.0.113.20/
no udp UDP:203.0.113.20:7
no nc -z -w3 203.0.113.30 3128
ok get http://203.0.113.10/`},
		{"an allow in NAT64 form opens the IPv4 inside, not the whole tunnel", []string{"--default-policy", "deny", "--allow-cidr", "64:ff9b::cb00:710a/128", "--allow-cidr", "64:ff9b::/96"}, `
ok get http://203.0.113.10/
no get http://203.0.113.20/`},
		{"default deny with allow-domain", []string{"--default-policy", "deny", "--allow-domain", "allowed.test"}, `
no get http://203.0.113.10/
ok get http://allowed.test/
ok get http://sub.allowed.test/
ok get -6 http://allowed.test/
no get http://badallowed.test/
no get http://denied.test/
no get http://web.test/
no resolves web.test
no resolves @203.0.113.53 web.test
no resolves +tcp @203.0.113.44 web.test
no get http://203.0.113.20/
no udp UDP:203.0.113.20:7
ok getent hosts allowed.test
ok get http://203.0.113.10/
no resolves shared.test`},
		{"allow-domain-exact", []string{"--default-policy", "deny", "--allow-domain-exact", "allowed.test"}, `
ok get http://allowed.test/
no get http://sub.allowed.test/`},
		{"deny-domain and resolver bypasses", []string{"--deny-domain", "denied.test"}, `
ok get http://web.test/
no get http://denied.test/
no resolves denied.test
no resolves @203.0.113.53 denied.test
no resolves +tcp @203.0.113.53 denied.test
no resolves @203.0.113.44 denied.test
no resolves tracker.test
ok resolves @203.0.113.44 web.test
no nc -z -w3 203.0.113.10 853`},
		{"deny-domain-exact", []string{"--deny-domain-exact", "allowed.test"}, `
no get http://allowed.test/
ok get http://sub.allowed.test/`},
		{"offline", []string{"--offline"}, `
no get http://203.0.113.10/
no resolves web.test
no udp UDP:203.0.113.10:7
no ping -c1 -W2 203.0.113.10`},
		{"host loopback and addresses", nil, fmt.Sprintf(`
no get http://$GW:%[1]d/
no get -6 "http://[$GW6]:%[1]d/"
no get http://203.0.113.1:%[1]d/
no get -6 'http://[2001:db8::1]:%[1]d/'
no get http://loopback.test:%[1]d/`, hostPort)},
		{"allow-cidr opens the gateway", []string{"--allow-cidr", "10.87.0.1/32", "--allow-cidr", "172.29.87.1/32", "--allow-cidr", "192.168.187.1/32", "--allow-cidr", "10.88.0.0/16"}, fmt.Sprintf(`
ok get http://$GW:%[1]d/
no get http://203.0.113.1:%[1]d/`, hostPort)},
		{"a wide allow-cidr does not open the gateway", []string{"--default-policy", "deny", "--allow-cidr", "10.0.0.0/8", "--allow-cidr", "172.16.0.0/12",
			"--allow-cidr", "192.168.0.0/16", "--allow-cidr", "100.64.0.0/10", "--allow-cidr", "fc00::/7", "--allow-cidr", "203.0.113.0/24"}, fmt.Sprintf(`
no get http://$GW:%[1]d/
no get -6 "http://[$GW6]:%[1]d/"
ok get http://203.0.113.1:%[1]d/
ok get http://203.0.113.10/`, hostPort)},
		{"block-private beats allow-cidr", []string{"--block-private", "--allow-cidr", "10.87.0.1/32", "--allow-cidr", "172.29.87.1/32",
			"--allow-cidr", "192.168.187.1/32", "--allow-cidr", "fd00:cf::1/128", "--allow-cidr", "fd87:cf::1/128",
			"--allow-cidr", "10.88.0.0/16", "--allow-cidr", "fd87:cf88::/48"}, fmt.Sprintf(`
no get http://$GW:%[1]d/
no get -6 "http://[$GW6]:%[1]d/"
ok get http://203.0.113.10/`, hostPort)},
		{"block-metadata", []string{"--block-metadata"}, `
no get http://169.254.169.254/
no get -6 'http://[fd00:ec2::254]/'
ok get http://203.0.113.10/`},
	}
}

func TestPolicy(t *testing.T) {
	requireRoot(t)
	for _, tc := range policyCases(hostServer(t)) {
		t.Run(tc.name, func(t *testing.T) {
			users(t, func(t *testing.T, u as) {
				r := sh(t, u, tc.flags, tc.shell())
				if r.code != 0 {
					t.Fatal(r)
				}
			})
		})
	}
}

// shell is the case's script with its assertions' functions: on a
// kernel without IPv6, without the lines that need it (a curl -6, an
// IPv6 address in brackets, a UDP6 socket).
func (c policyCase) shell() string {
	script := c.script
	if !hasIPv6 {
		var kept []string
		for _, l := range strings.Split(script, "\n") {
			if !strings.Contains(l, " -6 ") && !strings.Contains(l, "UDP6") && !strings.Contains(l, "[") {
				kept = append(kept, l)
			}
		}
		script = strings.Join(kept, "\n")
	}
	return assertions + script
}

// Without a flow log or a summary too: under --root the verdicts are
// read for --fail-on-leak alone.
func TestFailOnLeak(t *testing.T) {
	requireRoot(t)
	for _, backend := range [][]string{nil, rootArgs} {
		deny := append([]string{"--fail-on-leak", "--deny-cidr", "203.0.113.20/32"}, backend...)
		for _, tc := range []struct {
			script string
			want   int
		}{
			{"curl -sS -m3 http://203.0.113.20/; exit 0", 3},
			{"curl -sS -m3 http://203.0.113.10/ >/dev/null", 0},
			{"curl -sS -m3 http://203.0.113.20/; exit 5", 5},
		} {
			if r := sh(t, root, deny, tc.script); r.code != tc.want {
				t.Errorf("%v %q: exit %d, want %d\n%s", backend, tc.script, r.code, tc.want, r)
			}
		}
	}
}

// TestParallelFlowsAreAttributed: a burst of connections from many
// processes at once (make -j, a test runner's workers) has each
// connection attributed to its own process, without a walk of the
// process tree per connection: 400 parallel curls took ten times as long
// with a flow log as without.
func TestParallelFlowsAreAttributed(t *testing.T) {
	users(t, func(t *testing.T, u as) {
		log := filepath.Join(logDir(t), "flows.jsonl")
		const n = 60
		r := sh(t, u, []string{"--flow-log", log},
			fmt.Sprintf(`for i in $(seq %d); do curl -s -m10 -o /dev/null -w '%%{http_code}\n' http://203.0.113.10/ & done; wait`, n))
		if got := strings.Count(r.stdout, "200\n"); r.code != 0 || got != n {
			t.Fatalf("%d of %d curls got 200: %v", got, n, r)
		}
		pids := map[any]bool{}
		for _, ev := range readFlowLog(t, log) {
			if ev["event"] != "connect_attempt" {
				continue
			}
			if ev["comm"] != "curl" || ev["pid"] == nil {
				t.Errorf("connect_attempt not attributed to its curl: %v", ev)
			}
			pids[ev["pid"]] = true
		}
		if len(pids) != n {
			t.Errorf("%d distinct pids among the connections of %d curls", len(pids), n)
		}
	})
}

func TestFlowLogRecordsViolations(t *testing.T) {
	users(t, func(t *testing.T, u as) {
		dir, _ := os.MkdirTemp("", "cfflowlog")
		os.Chmod(dir, 0o777)
		t.Cleanup(func() { os.RemoveAll(dir) })
		log := filepath.Join(dir, "flows.jsonl")
		if u == rootless {
			withPingSockets(t)
		}
		r := sh(t, u, []string{"--flow-log", log, "--deny-cidr", "203.0.113.20/32", "--deny-domain", "denied.test"},
			"curl -s -m3 -o /dev/null http://203.0.113.20/; curl -s -m3 -o /dev/null http://denied.test/; curl -s -m3 -o /dev/null http://web.test/; "+
				"echo probe | socat -t1 - UDP:203.0.113.10:7 >/dev/null; "+ipv6Only("curl -s -m3 -o /dev/null 'http://[2001:db8::10]/'; ")+
				"ping -c2 -i0.2 -W2 203.0.113.10 >/dev/null; ping -c3 -i0.2 -W1 203.0.113.20 >/dev/null")
		if r.code == 127 {
			t.Fatal(r)
		}
		st, err := os.Stat(log)
		if err != nil || st.Mode().Perm() != 0o600 {
			t.Fatalf("flow log %v mode %v, want 0600", err, st.Mode())
		}
		events := readFlowLog(t, log)
		wants := []map[string]any{
			{"event": "policy_violation", "reason_code": "deny_cidr", "control": "deny_cidrs", "matched_cidr": "203.0.113.20/32", "dst": "203.0.113.20:80"},
			{"event": "policy_violation", "reason_code": "deny_domain", "matched_domain": "denied.test", "qname": "denied.test"},
			{"event": "dns_query", "qname": "web.test"},
			{"event": "dns_answer", "qname": "web.test", "rcode": "NOERROR"},
			{"event": "connect_attempt", "dst": "203.0.113.10:80", "verdict": "allow", "comm": "curl"},
			{"event": "policy_violation", "dst": "203.0.113.20:80", "comm": "curl"},
			{"event": "connect_result", "dst": "203.0.113.10:80", "ok": true},
			{"event": "flow_end", "dst": "203.0.113.10:80"},
			// The owner is found for UDP sockets too (and IPv6's, below).
			{"event": "connect_attempt", "proto": "udp", "dst": "203.0.113.10:7", "comm": "socat"},
			// A ping is one flow, its owner found, with the echo data
			// relayed each way (2 x 56 bytes) at its end.
			{"event": "connect_attempt", "proto": "icmp", "src": "10.87.0.2:0", "dst": "203.0.113.10:0", "comm": "ping"},
			{"event": "connect_result", "proto": "icmp", "dst": "203.0.113.10:0", "ok": true, "upstream": "203.0.113.10"},
			{"event": "flow_end", "proto": "icmp", "dst": "203.0.113.10:0", "bytes_up": float64(112), "bytes_down": float64(112)},
			{"event": "policy_violation", "proto": "icmp", "dst": "203.0.113.20:0", "comm": "ping"},
		}
		if hasIPv6 {
			wants = append(wants, map[string]any{"event": "connect_attempt", "dst": "[2001:db8::10]:80", "comm": "curl"})
		}
		for _, want := range wants {
			if !hasEvent(events, want) {
				b, _ := os.ReadFile(log)
				t.Errorf("no event matching %v in:\n%s", want, strings.TrimSpace(string(b)))
			}
		}
		// One flow per ping, not one per echo: one attempt each, and the
		// three denied echoes are one violation.
		for _, dst := range []string{"203.0.113.10:0", "203.0.113.20:0"} {
			n := 0
			for _, ev := range events {
				if ev["event"] == "connect_attempt" && ev["dst"] == dst {
					n++
				}
			}
			if n != 1 {
				t.Errorf("%d connect_attempt events to %s, want 1", n, dst)
			}
		}
	})
}

// TestFlowsOpenAtExitEnd: a flow still open when the command exits is
// ended by childflow, in the flow log, before the log is closed. (A UDP
// flow's handler used to log its end after: a crash, exit code 2, one
// run in three.)
func TestFlowsOpenAtExitEnd(t *testing.T) {
	users(t, func(t *testing.T, u as) {
		dir := logDir(t)
		for i := range 5 {
			log := filepath.Join(dir, strconv.Itoa(i)+".jsonl")
			r := sh(t, u, []string{"--flow-log", log, "--summary", "--summary-format", "json"},
				// The echo's answer came: the flow is the engine's.
				"echo probe | socat -t0.3 - UDP4:203.0.113.10:7 | grep -q probe || exit 9; exit 3")
			if r.code != 3 {
				t.Fatalf("run %d: %s", i, r)
			}
			if !hasEvent(readFlowLog(t, log), map[string]any{"event": "flow_end", "proto": "udp", "dst": "203.0.113.10:7", "bytes_up": float64(6)}) {
				b, _ := os.ReadFile(log)
				t.Fatalf("run %d: no flow_end for the UDP flow in:\n%s", i, b)
			}
			var sum struct{ Flows int }
			if err := json.Unmarshal([]byte(r.stderr), &sum); err != nil || sum.Flows != 1 {
				t.Fatalf("run %d: summary %+v, %v\n%s", i, sum, err, r.stderr)
			}
		}
	})
}

// A connection whose server stopped reading holds the relay's copies in
// the host's socket when the command exits; childflow still ends it and
// exits with the command's code instead of waiting for it. The engine
// relays it in root and rootless mode; --root relays only proxied flows.
func TestStuckFlowsEndAtExit(t *testing.T) {
	requireRoot(t)
	// On every address: the engine reaches it on the host's loopback,
	// squid in the testnet on the host's testnet address.
	port := tcpServer(t, "tcp4", ":0", func(net.Conn) {}) // never reads
	for _, tc := range []struct {
		name  string
		u     as
		flags []string
		dst   string
	}{
		{"root", root, []string{"--allow-cidr", "10.87.0.1/32"}, "10.87.0.1"},
		{"rootless", rootless, []string{"--allow-cidr", "10.87.0.1/32"}, "10.87.0.1"},
		{"--root via proxy", root, []string{"--root", "--proxy", "http://203.0.113.30:3128"}, "203.0.113.1"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if tc.u == rootless {
				withRootlessAllowed(t)
			}
			log := filepath.Join(logDir(t), "flows.jsonl")
			start := time.Now()
			r := sh(t, tc.u, append(tc.flags, "--flow-log", log),
				fmt.Sprintf("timeout 2 socat -u /dev/zero TCP:%s:%d; exit 3", tc.dst, port))
			if took := time.Since(start); r.code != 3 || took > 15*time.Second {
				t.Fatalf("took %v: %s", took.Round(time.Millisecond), r)
			}
			for _, ev := range readFlowLog(t, log) {
				if ev["event"] == "flow_end" && ev["proto"] == "tcp" && ev["bytes_up"].(float64) > 0 {
					return
				}
			}
			b, _ := os.ReadFile(log)
			t.Fatalf("no flow_end with the bytes sent in:\n%s", b)
		})
	}
}

// A sandbox that opens many downloads and never reads them makes every
// buffer on their way fill; the engine keeps what it holds for them
// within its buffer budget (128 MiB) plus a small floor per flow, where
// it held up to megabytes per flow (599 MiB for 400 such flows).
func TestStuckFlowsStayWithinTheBufferBudget(t *testing.T) {
	requireRoot(t)
	port := tcpServer(t, "tcp4", "127.0.0.1:0", func(c net.Conn) { // floods
		chunk := make([]byte, 64<<10)
		for {
			if _, err := c.Write(chunk); err != nil {
				return
			}
		}
	})
	const flows = 300
	users(t, func(t *testing.T, u as) {
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		cmd := command(ctx, u, "--allow-cidr", "10.87.0.1/32", "--", "perl", "-MIO::Socket::INET", "-e",
			fmt.Sprintf(`$| = 1; for (1..%d) { push @c, (IO::Socket::INET->new("10.87.0.1:%d") or die "connect: $!") } print "open\n"; <STDIN>`,
				flows, port))
		stdin, _ := cmd.StdinPipe()
		stdout, _ := cmd.StdoutPipe()
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		defer cmd.Wait()
		defer stdin.Close()
		if line, err := bufio.NewReader(stdout).ReadString('\n'); line != "open\n" {
			t.Fatalf("%q, %v: %s", line, err, stderr.String())
		}
		// Until the buffers stop filling.
		var rss, last int
		for rss == 0 || rss != last {
			time.Sleep(time.Second)
			last = rss
			rss = statusKiB(t, cmd.Process.Pid, "VmRSS")
		}
		const budget, floor, base = 128 << 10, 160, 64 << 10 // KiB
		if limit := budget + flows*floor + base; rss > limit {
			t.Errorf("childflow holds %d MiB with %d stuck downloads, want at most %d", rss>>10, flows, limit>>10)
		}
		t.Logf("%d MiB with %d stuck downloads", rss>>10, flows)
	})
}

// A ping flood of 60,000-byte echoes to a testnet address that never
// answers: each echo waiting for its answer held a host socket and its
// payload (eight pings every 2 ms: 718 MB after 5 s); now at most 256
// wait, the rest are dropped with one runtime_failure.
func TestPingFloodStaysBounded(t *testing.T) {
	users(t, func(t *testing.T, u as) {
		// Without them every echo failed at once, and only a host fast
		// enough to start 256 attempts at a time reached the limit.
		if u == rootless {
			withPingSockets(t)
		}
		log := filepath.Join(logDir(t), "flows.jsonl")
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		// From a ping socket, as ping uses, without ping's pacing.
		cmd := command(ctx, u, "--dns", "203.0.113.53", "--flow-log", log, "--", "perl", "-MSocket", "-e",
			`socket(my $s, PF_INET, SOCK_DGRAM, 1) or die "ping socket: $!"; my $to = sockaddr_in(0, inet_aton("203.0.113.60"));
for (my ($n, $end) = (0, time + 3); time < $end; $n++) { send($s, pack("CCnnn", 8, 0, 0, 0, $n & 0xffff) . ("x" x 60000), 0, $to) or select(undef, undef, undef, 0.001) }`)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		exited := make(chan error, 1)
		go func() { exited <- cmd.Wait() }()
		peak := 0
		for done := false; !done; {
			select {
			case err := <-exited:
				if err != nil {
					t.Fatal(err)
				}
				done = true
			case <-time.After(200 * time.Millisecond):
				if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", cmd.Process.Pid)); err == nil {
					for _, line := range strings.Split(string(b), "\n") {
						var kib int
						if _, err := fmt.Sscanf(line, "VmRSS: %d kB", &kib); err == nil {
							peak = max(peak, kib)
						}
					}
				}
			}
		}
		t.Logf("childflow peaked at %d MiB", peak>>10)
		if peak > 200<<10 {
			t.Errorf("childflow peaked at %d MiB under a ping flood, want at most 200", peak>>10)
		}
		events := readFlowLog(t, log)
		if !hasEvent(events, map[string]any{"event": "runtime_failure", "error": "256 echo requests wait for their answers, the engine's limit: more are dropped"}) {
			t.Error("no runtime_failure about the echo limit")
		}
		for _, ev := range events {
			if ev["event"] == "runtime_failure" && strings.Contains(fmt.Sprint(ev["error"]), "cannot relay ICMP echo") {
				t.Errorf("the echoes were not relayed: %v", ev["error"])
			}
		}
	})
}

// A sandbox asking for endless names under a wildcard (dnsmasq answers
// every name under wild.test) makes their address carry at most 32 of
// them, those asked for last, in each flow event, not all of them.
func TestEndlessNamesStayBounded(t *testing.T) {
	users(t, func(t *testing.T, u as) {
		log := filepath.Join(logDir(t), "flows.jsonl")
		// One dig for all: dnsmasq's answers have a TTL of 0, which the
		// engine keeps for 5 s, and a hundred digs took longer than that
		// on a slow kernel (Debian's under QEMU).
		r := sh(t, u, []string{"--flow-log", log}, `dig +short +time=2 +tries=1 $(seq -f r%g.wild.test 100) >/dev/null
curl -sS -m5 -o /dev/null http://203.0.113.10/`)
		if r.code != 0 {
			t.Fatal(r)
		}
		for _, ev := range readFlowLog(t, log) {
			if ev["event"] != "connect_attempt" || ev["dst"] != "203.0.113.10:80" {
				continue
			}
			names, _ := ev["names"].([]any)
			if len(names) != 32 || !slices.Contains(names, any("r100.wild.test")) || slices.Contains(names, any("r1.wild.test")) {
				t.Fatalf("%d names, want the 32 asked for last: %v", len(names), names)
			}
			return
		}
		t.Fatal("no connect_attempt to 203.0.113.10:80")
	})
}

// A host service on a unix socket that reaches the network for its
// callers (as docker, systemd-run, tmux or nscd do; here socat relaying
// to the testnet's web server) and one that receives datagrams: the
// sandbox shares the host's filesystem, not its network, so each is
// covered in the sandbox and an --offline command reaches neither. A
// socket the command binds itself still works.
func TestHostUnixSocketsAreCovered(t *testing.T) {
	requireRoot(t)
	dir, err := os.MkdirTemp("", "cfsockets")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o755)
	t.Cleanup(func() { os.RemoveAll(dir) })
	relay, dgram := filepath.Join(dir, "relay.sock"), filepath.Join(dir, "dgram.sock")
	got := &listener{}
	for _, c := range []*exec.Cmd{
		exec.Command("socat", "UNIX-LISTEN:"+relay+",fork,mode=777", "TCP:203.0.113.10:80"),
		exec.Command("socat", "-u", "UNIX-RECV:"+dgram+",mode=777", "-"),
	} {
		c.Stdout = got
		if err := c.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Process.Kill(); c.Wait() })
	}
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if _, err := os.Stat(relay); err == nil {
			if _, err := os.Stat(dgram); err == nil {
				break
			}
		}
		if time.Now().After(deadline) {
			t.Fatal("the host's sockets did not appear")
		}
	}
	if out, err := exec.Command("curl", "-sS", "-m5", "--unix-socket", relay, "http://web.test/").CombinedOutput(); err != nil || !strings.Contains(string(out), "hello from the test internet") {
		t.Fatalf("the relay does not work on the host: %v\n%s", err, out)
	}
	for _, backend := range backends {
		t.Run(backend.name, func(t *testing.T) {
			if backend.u == rootless {
				withRootlessAllowed(t)
			}
			r := sh(t, backend.u, append([]string{"--offline"}, backend.flags...), fmt.Sprintf(`curl -sS -m5 --unix-socket %s http://web.test/ && exit 8
echo sent | socat -u - UNIX-SENDTO:%s && exit 9
own=$(mktemp -u /tmp/cfown.XXXXXX)
socat UNIX-LISTEN:$own,mode=700 SYSTEM:'echo own' &
while [ ! -S $own ]; do sleep 0.05; done
socat -u UNIX-CONNECT:$own - || exit 10
exit 3`, relay, dgram))
			if r.code != 3 || !strings.Contains(r.stdout, "own") {
				t.Fatal(r)
			}
		})
	}
	time.Sleep(200 * time.Millisecond)
	if s := got.got(); s != "" {
		t.Errorf("the host's datagram socket got %q", s)
	}
}

// A host with many unix sockets (a busy desktop, a node running many
// containers): init's spec lists every path to cover, beyond the 128 KiB
// one environment string could hold (where childflow failed to start,
// "argument list too long"), and the last is covered as the first.
func TestManyHostUnixSocketsAreCovered(t *testing.T) {
	requireRoot(t)
	dir := shortTempDir(t, "cfms") // a socket's path holds 107 bytes
	os.Chmod(dir, 0o755)
	var paths []string
	for i := range 1800 { // 1800 paths of ~100 bytes
		p := filepath.Join(dir, fmt.Sprintf("a-service-socket-named-as-long-as-many-are-%05d-%s.sock", i, strings.Repeat("x", 26)))
		ln, err := net.Listen("unix", p)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { ln.Close() })
		os.Chmod(p, 0o777)
		paths = append(paths, p)
	}
	first, last := paths[0], paths[len(paths)-1]
	for _, backend := range backends {
		t.Run(backend.name, func(t *testing.T) {
			if backend.u == rootless {
				withRootlessAllowed(t)
			}
			r := sh(t, backend.u, backend.flags, fmt.Sprintf(`socat -u /dev/null UNIX-CONNECT:%s && exit 8
socat -u /dev/null UNIX-CONNECT:%s && exit 9
exit 3`, first, last))
			if r.code != 3 {
				t.Fatal(r)
			}
		})
	}
	// The same connection from the host works.
	if out, err := exec.Command("socat", "-u", "/dev/null", "UNIX-CONNECT:"+last).CombinedOutput(); err != nil {
		t.Fatalf("the host cannot reach its own socket: %v\n%s", err, out)
	}
}

// TestInheritedHandlesStayOutside passes childflow, as a shell or a CI
// runner may, handles opened outside the sandbox: a TCP and a UDP
// socket, a directory holding a host socket (reached again through
// /proc/self/fd/N/), a pidfd, a network namespace, /proc/self/mem of
// the test and a pseudo-terminal's master (the shell on its other side
// reads what is written to it as typed). None reaches the command, each
// is named on stderr; a pipe
// and a regular file still pass. Stdin as a socket is refused with exit
// 2, stdout as a connected unix socket (journald's) works.
func TestInheritedHandlesStayOutside(t *testing.T) {
	requireRoot(t)
	dir, err := os.MkdirTemp("", "cfinherit")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o755)
	t.Cleanup(func() { os.RemoveAll(dir) })
	relay := exec.Command("socat", "UNIX-LISTEN:"+filepath.Join(dir, "relay.sock")+",fork,mode=777", "TCP:203.0.113.10:80")
	if err := relay.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { relay.Process.Kill(); relay.Wait() })
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if _, err := os.Stat(filepath.Join(dir, "relay.sock")); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the relay's socket did not appear")
		}
	}
	open := func(f *os.File, err error) *os.File {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		return f
	}
	tcpFile := func() *os.File {
		c, err := net.Dial("tcp", "203.0.113.10:80")
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		return open(c.(*net.TCPConn).File())
	}
	for _, backend := range backends {
		t.Run(backend.name, func(t *testing.T) {
			if backend.u == rootless {
				withRootlessAllowed(t)
			}
			udp, err := net.ListenPacket("udp4", "0.0.0.0:0")
			if err != nil {
				t.Fatal(err)
			}
			defer udp.Close()
			pidfd, err := unix.PidfdOpen(os.Getpid(), 0)
			if err != nil {
				t.Fatal(err)
			}
			pr, pw, err := os.Pipe()
			if err != nil {
				t.Fatal(err)
			}
			defer pr.Close()
			pw.Write([]byte("piped\n"))
			pw.Close()
			extra := []*os.File{ // fds 3 to 11
				tcpFile(), open(udp.(*net.UDPConn).File()), open(os.Open(dir)), open(os.NewFile(uintptr(pidfd), "pidfd"), nil),
				open(os.Open("/proc/self/ns/net")), open(os.OpenFile("/proc/self/mem", os.O_RDWR, 0)), pr, open(os.Open("/etc/hostname")),
				open(os.OpenFile("/dev/ptmx", os.O_RDWR, 0)),
			}
			script := `printf 'GET / HTTP/1.0\r\n\r\n' >&3 && timeout 2 cat <&3
curl -sS -m3 --unix-socket /proc/self/fd/5/relay.sock http://web.test/
for fd in 3 4 5 6 7 8 9 10 11; do [ -e /proc/self/fd/$fd ] && echo "has $fd"; done
read line <&9; echo "$line"; exit 3`
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			cmd := command(ctx, backend.u, append(append([]string{"--offline"}, backend.flags...), "--", "sh", "-c", script)...)
			cmd.ExtraFiles = extra
			var out, errb bytes.Buffer
			cmd.Stdout, cmd.Stderr = &out, &errb
			cmd.Run()
			if code := cmd.ProcessState.ExitCode(); code != 3 || out.String() != "has 9\nhas 10\npiped\n" {
				t.Fatalf("exit %d, stdout:\n%s\nstderr:\n%s", code, out.String(), errb.String())
			}
			for _, fd := range []int{3, 4, 5, 6, 7, 8, 11} {
				if !strings.Contains(errb.String(), fmt.Sprintf("childflow: fd %d (", fd)) {
					t.Errorf("fd %d not named on stderr:\n%s", fd, errb.String())
				}
			}

			cmd = command(ctx, backend.u, append(backend.flags, "--", "true")...)
			cmd.Stdin = tcpFile()
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			cmd.Run()
			if code := cmd.ProcessState.ExitCode(); code != 2 || !strings.HasPrefix(stderr.String(), "childflow: stdin is a socket") || strings.Count(stderr.String(), "\n") != 1 {
				t.Errorf("stdin a TCP socket: exit %d, stderr %q", code, stderr.String())
			}

			fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
			if err != nil {
				t.Fatal(err)
			}
			ours, theirs := open(os.NewFile(uintptr(fds[0]), "ours"), nil), os.NewFile(uintptr(fds[1]), "theirs")
			cmd = command(ctx, backend.u, append(backend.flags, "--", "echo", "journal")...)
			cmd.Stdout = theirs
			err = cmd.Run()
			theirs.Close()
			got, _ := io.ReadAll(ours)
			if err != nil || string(got) != "journal\n" {
				t.Errorf("stdout a unix socket: %v, %q", err, got)
			}
		})
	}
}

// seizeScript tries PTRACE_SEIZE on every thread of the processes whose
// pid is given, printing "seized" or "refused-<error>" for each.
const seizeScript = `import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
for pid in sys.argv[1:]:
    for tid in sorted(os.listdir("/proc/%s/task" % pid), key=int):
        r = libc.ptrace(0x4206, int(tid), 0, 0)
        print("task", tid, "seized" if r == 0 else "refused-" + os.strerror(ctypes.get_errno()))`

// TestInitCannotBeTraced: init's threads other than the command's keep
// their capabilities (under root, all of root's) and the command runs as
// init's user, so tracing init would let the command undo the sandbox.
func TestInitCannotBeTraced(t *testing.T) {
	requireRoot(t)
	for _, backend := range backends {
		t.Run(backend.name, func(t *testing.T) {
			if backend.u == rootless {
				withRootlessAllowed(t)
			}
			r := run(t, backend.u, append(append([]string{"--offline"}, backend.flags...), "--", "sh", "-c",
				`cat /proc/1/environ >/dev/null && echo read-environ; python3 -c '`+seizeScript+`' 1`)...)
			if r.code != 0 || strings.Contains(r.stdout, "seized") || strings.Contains(r.stdout, "read-environ") ||
				strings.Count(r.stdout, "refused-Operation not permitted") < 2 {
				t.Fatal(r)
			}
		})
	}
}

// TestKernelSettingsAreReadOnly: run by root itself, the command is uid 0
// without capabilities, yet most of /proc/sys and /sys check only the
// file's owner. core_pattern (written back unchanged here) would have the
// kernel run a program of the command's choosing as root outside the
// sandbox. They are read-only; the command's own /proc files are not.
func TestKernelSettingsAreReadOnly(t *testing.T) {
	requireRoot(t)
	for _, backend := range backends {
		t.Run(backend.name, func(t *testing.T) {
			if backend.u == rootless {
				withRootlessAllowed(t)
			}
			r := run(t, backend.u, append(append([]string{"--offline"}, backend.flags...), "--", "sh", "-c", `
v=$(cat /proc/sys/kernel/core_pattern); (printf '%s\n' "$v" > /proc/sys/kernel/core_pattern) 2>/dev/null && echo wrote core_pattern
for f in /proc/sysrq-trigger /proc/sys/kernel/hostname /proc/sys/net/ipv4/ping_group_range /sys/kernel/uevent_helper $(find /sys/fs/cgroup -maxdepth 2 -name cgroup.procs | head -1); do
	[ -w $f ] && echo writable $f
done
echo 0 > /proc/self/oom_score_adj && echo own-ok`)...)
			if r.code != 0 || r.stdout != "own-ok\n" {
				t.Fatal(r)
			}
		})
	}
}

// TestHostProcGrantsNothing runs childflow as a user where /proc is
// partly masked, as in a container, and the kernel refuses the user a
// /proc of the sandbox's own, so the command sees the host's. It sees
// the user's other processes there (here a sleep in the host's network)
// but cannot open their memory: they are in a user namespace above its
// own.
func TestHostProcGrantsNothing(t *testing.T) {
	requireRoot(t)
	withRootlessAllowed(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	sleeper := exec.CommandContext(ctx, "sleep", "987654")
	sleeper.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uint32(rootless), Gid: uint32(rootless)}}
	if err := sleeper.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { sleeper.Process.Kill(); sleeper.Wait() }()
	script := `for p in /proc/[0-9]*; do [ "$(tr '\0' ' ' < $p/cmdline 2>/dev/null)" = "sleep 987654 " ] && echo saw && (exec 3<>$p/mem) 2>/dev/null && echo opened; done; exit 3`
	cmd := exec.CommandContext(ctx, "unshare", "-m", "--propagation", "private", "sh", "-c",
		`mount --bind /dev/null /proc/keys && exec setpriv --reuid 65534 --regid 65534 --clear-groups "$@"`, "sh",
		bin, "--offline", "--", "sh", "-c", script)
	cmd.Dir = "/"
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	cmd.Run()
	if code := cmd.ProcessState.ExitCode(); code != 3 || out.String() != "saw\n" {
		t.Fatalf("exit %d, stdout:\n%s\nstderr:\n%s", code, out.String(), errb.String())
	}
}

// TestUnlistedNamesStayInside: under default deny, an allow-cidr opens
// addresses, not the resolver. A query is data the command sends out
// (secret.exfil.test reaches the name's servers through the host's
// resolver), so a name no rule allows is answered empty and never
// asked upstream, here a resolver of the test's own that records what
// it is asked. Nor is a name that only reads as under an allowed domain:
// secret.x\.allowed.test has the label "x.allowed" under test.
func TestUnlistedNamesStayInside(t *testing.T) {
	requireRoot(t)
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	var mu sync.Mutex
	var asked []string
	go func() {
		buf := make([]byte, 2048)
		for {
			n, _, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			mu.Lock()
			asked = append(asked, string(bytes.ToValidUTF8(buf[12:n], []byte("?"))))
			mu.Unlock()
		}
	}()
	for _, backend := range backends {
		t.Run(backend.name, func(t *testing.T) {
			if backend.u == rootless {
				withRootlessAllowed(t)
			}
			mu.Lock()
			asked = nil
			mu.Unlock()
			r := run(t, backend.u, append(append([]string{"--dns", pc.LocalAddr().String(), "--default-policy", "deny", "--allow-cidr", "203.0.113.10/32"}, backend.flags...),
				"--", "sh", "-c", `dig +short +time=2 +tries=1 secret-4711.exfil.test; dig +short +tcp +time=2 +tries=1 secret-4712.exfil.test; curl -sS -m4 -o /dev/null http://203.0.113.10/ && echo reached`)...)
			r2 := run(t, backend.u, append(append([]string{"--dns", pc.LocalAddr().String(), "--default-policy", "deny", "--allow-domain", "allowed.test"}, backend.flags...),
				"--", "sh", "-c", `dig +short +time=2 +tries=1 'secret-4713.x\.allowed.test'; echo done`)...)
			if r2.code != 0 || r2.stdout != "done\n" {
				t.Error(r2)
			}
			time.Sleep(100 * time.Millisecond)
			mu.Lock()
			defer mu.Unlock()
			if len(asked) != 0 {
				t.Errorf("the upstream resolver was asked %q", asked)
			}
			if r.code != 0 || r.stdout != "reached\n" {
				t.Error(r)
			}
		})
	}
}

// A query without recursion would read what a caching resolver holds
// for the host's other users: the engine asks with recursion all the
// same. unbound, forwarding to dnsmasq, has never seen the name, so an
// answer means it was resolved for the question, not read from a cache.
func TestTheResolversCacheCannotBeRead(t *testing.T) {
	requireRoot(t)
	for i, backend := range backends {
		t.Run(backend.name, func(t *testing.T) {
			if backend.u == rootless {
				withRootlessAllowed(t)
			}
			name := fmt.Sprintf("norec-%d-%d.wild.test", time.Now().UnixNano(), i)
			r := run(t, backend.u, append(append([]string{"--dns", "203.0.113.54"}, backend.flags...),
				"--", "dig", "+norec", "+short", "+time=3", "+tries=1", name)...)
			if r.code != 0 || r.stdout != "203.0.113.10\n" {
				t.Errorf("dig +norec %s: %v; want the address, resolved", name, r)
			}
		})
	}
}

// silentResolver is a UDP socket on the host's loopback that never
// answers; it returns its address.
func silentResolver(t *testing.T) string {
	t.Helper()
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { pc.Close() })
	return pc.LocalAddr().String()
}

// A query is on record once asked, and one still waiting for the
// upstream resolvers when the command exits ends with the sandbox, not
// at its timeout (4 s): dns_query and a SERVFAIL dns_answer, both logged.
func TestQueriesInFlightAtExitAreLogged(t *testing.T) {
	requireRoot(t)
	upstream := silentResolver(t)
	for _, backend := range backends {
		t.Run(backend.name, func(t *testing.T) {
			if backend.u == rootless {
				withRootlessAllowed(t)
			}
			log := filepath.Join(logDir(t), "flows.jsonl")
			start := time.Now()
			r := run(t, backend.u, append(append([]string{"--dns", upstream, "--flow-log", log}, backend.flags...),
				"--", "sh", "-c", "dig +tries=1 +time=9 waiting.test >/dev/null & sleep 1; exit 3")...)
			if took := time.Since(start); r.code != 3 || took > 3500*time.Millisecond {
				t.Fatalf("took %v: %s", took.Round(time.Millisecond), r)
			}
			events := readFlowLog(t, log)
			if !hasEvent(events, map[string]any{"event": "dns_query", "qname": "waiting.test"}) {
				t.Errorf("no dns_query for waiting.test")
			}
			for _, ev := range events {
				if ev["event"] == "dns_answer" && ev["qname"] == "waiting.test" && ev["rcode"] == "SERVFAIL" &&
					strings.HasSuffix(fmt.Sprint(ev["error"]), "context canceled") {
					return
				}
			}
			b, _ := os.ReadFile(log)
			t.Fatalf("no dns_answer ending the query in:\n%s", b)
		})
	}
}

// tcpServer serves network's addr until the test ends, each connection
// handled on its own goroutine and closed at the end; it returns the port.
func tcpServer(t *testing.T, network, addr string, handle func(net.Conn)) int {
	t.Helper()
	ln, err := net.Listen(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var conns []net.Conn
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		defer mu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
			go handle(c)
		}
	}()
	return ln.Addr().(*net.TCPAddr).Port
}

// statusKiB reads a field in kB of /proc/PID/status.
func statusKiB(t *testing.T, pid int, field string) int {
	t.Helper()
	path := fmt.Sprintf("/proc/%d/status", pid)
	n, ok := statusField(path, field)
	if !ok {
		t.Fatalf("no %s in %s", field, path)
	}
	return n
}

// statusField reads a number (a count, or kB) from a /proc status file.
func statusField(path, field string) (int, bool) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, false
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, field+":"); ok {
			n, err := strconv.Atoi(strings.TrimSuffix(strings.TrimSpace(v), " kB"))
			return n, err == nil
		}
	}
	return 0, false
}

// readFlowLog reads a flow log's events, each line checked for the
// fields every event has.
func readFlowLog(t *testing.T, path string) []map[string]any {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var events []map[string]any
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var ev map[string]any
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			t.Fatalf("%s: bad line %q: %v", path, sc.Text(), err)
		}
		if ev["schema_version"] != float64(1) || ev["ts_ms"] == nil || ev["event"] == nil {
			t.Fatalf("%s: line without schema_version/ts_ms/event: %s", path, sc.Text())
		}
		events = append(events, ev)
	}
	return events
}

// hasEvent reports whether one of events has every field of want.
func hasEvent(events []map[string]any, want map[string]any) bool {
next:
	for _, ev := range events {
		for k, v := range want {
			if ev[k] != v {
				continue next
			}
		}
		return true
	}
	return false
}

func TestProfile(t *testing.T) {
	users(t, func(t *testing.T, u as) {
		dir, _ := os.MkdirTemp("", "cfprofile")
		t.Cleanup(func() { os.RemoveAll(dir) })
		os.MkdirAll(filepath.Join(dir, "team"), 0o755)
		os.Chmod(dir, 0o755)
		os.WriteFile(filepath.Join(dir, "team", "base.toml"), []byte(`
default_policy = "deny"
allow_domains = ["denied.test"]
dns = "203.0.113.53"
hosts_file = "hosts"
`), 0o644)
		os.WriteFile(filepath.Join(dir, "team", "hosts"), []byte("203.0.113.10 from-profile-hosts.test\n"), 0o644)
		prof := filepath.Join(dir, "ci.toml")
		os.WriteFile(prof, []byte(`
extends = "team/base.toml"
allow_domains = ["allowed.test"]
command = ["sh", "-c", "curl -sS -m4 http://allowed.test/ && getent hosts from-profile-hosts.test && ! curl -sS -m4 http://denied.test/ 2>/dev/null"]
`), 0o644)
		r := run(t, u, "--profile", prof)
		if r.code != 0 || !strings.Contains(r.stdout, "hello from the test internet") || !strings.Contains(r.stdout, "from-profile-hosts.test") {
			t.Fatalf("profile run:\n%s", r)
		}
		// The command line beats the profile: allow denied.test again.
		r = run(t, u, "--profile", prof, "--allow-domain", "denied.test", "--", "curl", "-sS", "-m4", "-o", "/dev/null", "http://denied.test/")
		if r.code != 0 {
			t.Fatalf("flag over profile:\n%s", r)
		}
		r = run(t, u, "--profile", prof, "--proxy-password", "hunter2", "--dump-profile")
		if r.code != 0 || strings.Contains(r.stdout, "hunter2") || !strings.Contains(r.stdout, "<redacted>") ||
			!strings.Contains(r.stdout, "allow_domains = ['allowed.test']") || !strings.Contains(r.stdout, filepath.Join(dir, "team", "hosts")) {
			t.Fatalf("--dump-profile:\n%s", r)
		}
		os.WriteFile(prof, []byte("allow_domain = [\"x.test\"]\n"), 0o644)
		if r := run(t, u, "--profile", prof, "--", "true"); r.code != 2 || !strings.Contains(r.stderr, `unknown key "allow_domain"`) {
			t.Fatalf("unknown key:\n%s", r)
		}
	})
}

func TestSummaryAndReport(t *testing.T) {
	users(t, func(t *testing.T, u as) {
		dir := logDir(t)
		log := filepath.Join(dir, "flows.jsonl")
		script := "curl -s -o /dev/null http://web.test/; curl -s -m3 http://203.0.113.20/; dig +short web.test >/dev/null"
		r := sh(t, u, []string{"--summary", "--summary-format", "json", "--flow-log", log, "--deny-cidr", "203.0.113.20/32"}, script)
		var sum struct {
			Flows, Allowed, Denied int
			Violations             map[string]int `json:"violations_by_control"`
		}
		if err := json.Unmarshal([]byte(r.stderr), &sum); err != nil {
			t.Fatalf("--summary-format json on stderr: %v\n%s", err, r)
		}
		if sum.Denied != 1 || sum.Allowed < 1 || sum.Violations["deny_cidrs"] != 1 {
			t.Fatalf("summary %+v", sum)
		}
		r = sh(t, u, []string{"--summary"}, "curl -s -o /dev/null http://web.test/")
		if !strings.Contains(r.stderr, "childflow report") || !strings.Contains(r.stderr, "203.0.113.10:80") {
			t.Fatalf("text summary:\n%s", r)
		}
		for _, format := range []string{"text", "markdown", "json", "html"} {
			r := run(t, u, "--report", log, "--report-format", format)
			if r.code != 0 || !strings.Contains(r.stdout, "203.0.113.20:80") {
				t.Fatalf("--report-format %s:\n%s", format, r)
			}
		}
		if r := run(t, u, "--report", log, "--report-format", "pdf"); r.code != 2 || !strings.Contains(r.stderr, `--report-format "pdf"`) {
			t.Fatalf("bad report format: %s", r)
		}
	})
}
