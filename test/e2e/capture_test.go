//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// tshark reads a capture back: fields of the packets matching filter.
func tshark(t *testing.T, file, filter string, fields ...string) []string {
	t.Helper()
	args := []string{"-r", file, "-Y", filter, "-T", "fields"}
	for _, f := range fields {
		args = append(args, "-e", f)
	}
	out, err := exec.Command("tshark", args...).Output()
	if err != nil {
		t.Fatalf("tshark %v: %v", args, err)
	}
	s := strings.TrimSpace(string(out))
	if s == "" {
		return nil
	}
	return strings.Split(s, "\n")
}

// A capture holds what the command sent and got, and nothing else: the
// sandbox's kernel solicits no routers on cf0 (it did as the link came
// up and every few seconds after).
func TestASilentCommandLeavesAnEmptyCapture(t *testing.T) {
	users(t, func(t *testing.T, u as) {
		pcap := filepath.Join(logDir(t), "silent.pcapng")
		if r := sh(t, u, []string{"-c", pcap}, "sleep 0.5"); r.code != 0 {
			t.Fatal(r)
		}
		if p := tshark(t, pcap, "frame", "frame.protocols"); len(p) != 0 {
			t.Fatalf("packets in the capture of a command that sent none: %q", p)
		}
	})
}

func TestCaptureChildView(t *testing.T) {
	users(t, func(t *testing.T, u as) {
		dir := logDir(t)
		pcap := filepath.Join(dir, "child.pcapng")
		r := sh(t, u, []string{"-c", pcap, "--deny-cidr", "203.0.113.20/32"}, `
curl -sS -m5 -o /dev/null http://web.test/
curl -sS -m3 http://203.0.113.20/ 2>/dev/null
echo probe | socat -t1 - UDP:203.0.113.10:7 >/dev/null
ping -c1 -W2 203.0.113.10 >/dev/null || true
true`)
		if r.code != 0 {
			t.Fatal(r)
		}
		if st, err := os.Stat(pcap); err != nil || st.Mode().Perm() != 0o600 {
			t.Fatalf("capture file %v, mode %v; want 0600", err, st)
		}
		if d := tshark(t, pcap, "frame.number == 1", "frame.interface_description"); len(d) != 1 || d[0] != "childflow child view, rootless backend, interface cf0" {
			t.Fatalf("interface description %q", d)
		}
		// The allowed HTTP flow: handshake, request and response, both ways.
		if syn := tshark(t, pcap, "tcp.flags.syn == 1 && tcp.flags.ack == 0 && ip.dst == 203.0.113.10 && tcp.dstport == 80", "ip.src"); len(syn) != 1 {
			t.Fatalf("SYNs to 203.0.113.10:80: %v", syn)
		}
		if get := tshark(t, pcap, `http.request.method == "GET" && ip.dst == 203.0.113.10`, "http.host"); len(get) != 1 || get[0] != "web.test" {
			t.Fatalf("GET requests: %v", get)
		}
		if ok := tshark(t, pcap, "http.response.code == 200 && ip.src == 203.0.113.10", "tcp.srcport"); len(ok) != 1 || ok[0] != "80" {
			t.Fatalf("HTTP responses: %v", ok)
		}
		// The denied flow: a SYN answered by a RST, nothing else.
		if rst := tshark(t, pcap, "ip.src == 203.0.113.20 && tcp.flags.reset == 1", "tcp.srcport"); len(rst) != 1 {
			t.Fatalf("RSTs from the denied host: %v", rst)
		}
		if data := tshark(t, pcap, "ip.addr == 203.0.113.20 && tcp.len > 0", "frame.number"); len(data) != 0 {
			t.Fatalf("data exchanged with a denied host: %v", data)
		}
		if dns := tshark(t, pcap, `dns.qry.name == "web.test" && dns.flags.response == 1`, "dns.a"); len(dns) == 0 {
			t.Fatal("no DNS answer for web.test in the capture")
		}
		if udp := tshark(t, pcap, "udp.port == 7 && ip.addr == 203.0.113.10", "udp.length"); len(udp) != 2 {
			t.Fatalf("UDP echo packets: %v, want request and reply", udp)
		}
		if u == root {
			if echo := tshark(t, pcap, "icmp.type == 0 && ip.src == 203.0.113.10", "icmp.seq"); len(echo) != 1 {
				t.Fatalf("ICMP echo replies: %v", echo)
			}
		}
	})
}

// An output path that names no regular file is a usage error naming the
// flag, the path and what it is, found before any file is created: a
// symbolic link is never written through, and a mistake in one output
// leaves the others as they were.
func TestOutputFilesAreRegularFiles(t *testing.T) {
	requireRoot(t)
	dir := logDir(t)
	target := filepath.Join(dir, "victim")
	os.WriteFile(target, []byte("keep me"), 0o644)
	link := filepath.Join(dir, "link")
	os.Symlink(target, link)
	fifo := filepath.Join(dir, "fifo")
	if err := unix.Mkfifo(fifo, 0o600); err != nil {
		t.Fatal(err)
	}
	earlier := filepath.Join(dir, "earlier.pcapng")
	os.WriteFile(earlier, []byte("an earlier capture"), 0o600)
	for _, c := range []struct {
		flags []string
		want  string
	}{
		{[]string{"-c", link}, "childflow: --capture: " + link + " is a symbolic link, not a regular file: childflow never writes through one"},
		{[]string{"--flow-log", link}, "childflow: --flow-log: " + link + " is a symbolic link"},
		{[]string{"--flow-log", dir}, "childflow: --flow-log: " + dir + " is a directory, not a regular file"},
		{[]string{"--flow-log", fifo}, "childflow: --flow-log: " + fifo + " is a named pipe, not a regular file"},
		{[]string{"-c", "/dev/null"}, "childflow: --capture: /dev/null is a device, not a regular file"},
		{[]string{"--flow-log", "-"}, "childflow: --flow-log: - is standard output, not a regular file"},
		{[]string{"-c", earlier, "--flow-log", dir}, "childflow: --flow-log: " + dir + " is a directory"},
		{[]string{"--flow-log", earlier, "-c", filepath.Join(dir, "link.pcapng"), "-C", "both"}, ""},
	} {
		if c.want == "" { // -C both writes link.child.pcapng: a link there
			os.Symlink(target, filepath.Join(dir, "link.child.pcapng"))
			c.want = "childflow: --capture: " + filepath.Join(dir, "link.child.pcapng") + " is a symbolic link"
		}
		r := sh(t, root, c.flags, "echo RAN")
		if r.code != 2 || r.stdout != "" || !strings.HasPrefix(r.stderr, c.want) || strings.Count(r.stderr, "\n") != 1 {
			t.Errorf("childflow %v: %v; want exit 2 and %q", c.flags, r, c.want)
		}
	}
	if b, _ := os.ReadFile(target); string(b) != "keep me" {
		t.Errorf("written through a symlink: %q", b)
	}
	if b, _ := os.ReadFile(earlier); string(b) != "an earlier capture" {
		t.Errorf("an output file changed by a run refused for another: %q", b)
	}
	if entries, _ := os.ReadDir(dir); len(entries) != 5 {
		t.Errorf("files made by refused runs: %v", entries)
	}
}

// The command runs as the user who owns the flow log and the capture,
// yet can neither read nor change them, nor move them or a directory
// above them away, nor reach them through a hard link: the record of
// what it did is out of its reach. The flow log is a new file, not the
// old one emptied: a hard link made to it before the run keeps the old
// content.
func TestTheRecordIsOutOfTheSandboxsReach(t *testing.T) {
	requireRoot(t)
	for _, backend := range backends {
		t.Run(backend.name, func(t *testing.T) {
			if backend.u == rootless {
				withRootlessAllowed(t)
			}
			base, err := os.MkdirTemp("", "cfrecord")
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { os.RemoveAll(base); os.RemoveAll(base + ".moved") })
			dir := filepath.Join(base, "out")
			os.Mkdir(dir, 0o700)
			log, capture := filepath.Join(dir, "flows.jsonl"), filepath.Join(dir, "run.pcapng")
			os.WriteFile(log, []byte("old\n"), 0o600)
			os.Link(log, filepath.Join(dir, "earlier"))
			for _, p := range []string{base, dir, log, filepath.Join(dir, "earlier")} {
				os.Chown(p, int(backend.u), int(backend.u))
			}
			script := "curl -sS -o /dev/null http://203.0.113.10/ || exit 9\n"
			for _, try := range []string{
				"echo forged >> " + log, ": > " + log, "cat " + log, "cat " + capture, "rm " + log, "rm " + capture,
				"mv " + log + " " + dir + "/moved", "ln " + log + " " + dir + "/link", "mv " + dir + " " + base + "/moved",
				"mv " + base + " " + base + ".moved", "cd " + dir + " && mv flows.jsonl moved",
			} {
				script += "if (" + try + ") 2>/dev/null; then echo 'done: " + try + "'; fi\n"
			}
			r := sh(t, backend.u, append([]string{"--flow-log", log, "-c", capture}, backend.flags...), script+"touch "+dir+"/made || exit 8; exit 3")
			if r.code != 3 || r.stdout != "" {
				t.Fatal(r)
			}
			b, err := os.ReadFile(log)
			if err != nil || strings.Contains(string(b), "forged") || strings.HasPrefix(string(b), "old") {
				t.Fatalf("the flow log: %v\n%s", err, b)
			}
			if !hasEvent(readFlowLog(t, log), map[string]any{"event": "connect_attempt", "dst": "203.0.113.10:80"}) {
				t.Errorf("no connect_attempt for 203.0.113.10:80 in:\n%s", b)
			}
			if got := tshark(t, capture, "tcp.dstport == 80 && tcp.flags.syn == 1 && tcp.flags.ack == 0", "ip.dst"); len(got) == 0 {
				t.Error("the capture has no SYN to port 80")
			}
			if b, _ := os.ReadFile(filepath.Join(dir, "earlier")); string(b) != "old\n" {
				t.Errorf("the hard link made before the run reads %q, want the old content", b)
			}
		})
	}
}

func TestCaptureEgressViews(t *testing.T) {
	requireRoot(t)
	dir := logDir(t)
	// While the sandbox runs, the host itself talks to the same test
	// host and ports as the sandbox, and to another: none of that may
	// show up in the sandbox's capture.
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			exec.Command("curl", "-s", "-m1", "-o", "/dev/null", "http://203.0.113.10/", "http://203.0.113.20/").Run()
			exec.Command("sh", "-c", "echo host | socat -t0.1 - UDP:203.0.113.10:7; echo host | socat -t0.1 - UDP:203.0.113.10:9; ping -c1 -W1 203.0.113.10").Run()
		}
	}()
	// ping's echo identifier stands for a port; port 9 is closed, the
	// ICMP port unreachable about the sandbox's datagram is followed.
	// The testnet host answers the host's datagrams to port 9 too: no
	// rate limit, or it might have no answer left for the sandbox's.
	ns := testnet + "-inet"
	if r := execute(t, "ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.icmp_ratelimit=0"); r.code != 0 {
		t.Fatal(r)
	}
	defer execute(t, "ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.icmp_ratelimit=1000")
	script := `curl -sS -m5 -o /dev/null http://web.test/; echo probe | socat -t1 - UDP:203.0.113.10:7 >/dev/null
ping -c2 -i0.2 -W2 203.0.113.10 >/dev/null; echo x | socat -t1 - UDP:203.0.113.10:9 2>/dev/null; sleep 0.5`
	for _, tc := range []struct{ point, file, desc string }{
		{"egress", "e.pcapng", "childflow egress view, rootless backend, interface any"},
		{"wire-egress", "w.pcapng", "childflow wire-egress view, rootless backend, interface any but loopback"},
		{"both", "b.pcapng", ""},
	} {
		pcap := filepath.Join(dir, tc.file)
		if r := sh(t, root, []string{"-c", pcap, "-C", tc.point}, script); r.code != 0 {
			t.Fatalf("%s: %v", tc.point, r)
		}
		host := pcap
		if tc.point == "both" {
			host = filepath.Join(dir, "b.egress.pcapng")
			child := filepath.Join(dir, "b.child.pcapng")
			if d := tshark(t, child, "frame.number == 1", "frame.interface_description"); len(d) != 1 || !strings.Contains(d[0], "child view") {
				t.Fatalf("both: child file %q", d)
			}
			tc.desc = "childflow egress view, rootless backend, interface any"
		}
		if d := tshark(t, host, "frame.number == 1", "frame.interface_description"); len(d) != 1 || d[0] != tc.desc {
			t.Fatalf("%s: interface description %q", tc.point, d)
		}
		// The host side of the sandbox's flows: from the host's own
		// address, handshake included.
		if syn := tshark(t, host, "tcp.flags.syn == 1 && tcp.flags.ack == 0 && ip.dst == 203.0.113.10 && tcp.dstport == 80", "ip.src"); len(syn) != 1 || syn[0] != "203.0.113.1" {
			t.Fatalf("%s: SYNs to 203.0.113.10:80 %v", tc.point, syn)
		}
		if ok := tshark(t, host, "http.response.code == 200", "ip.src"); len(ok) != 1 {
			t.Fatalf("%s: HTTP responses %v", tc.point, ok)
		}
		if udp := tshark(t, host, "udp.port == 7", "udp.length"); len(udp) != 2 {
			t.Fatalf("%s: UDP echo packets %v", tc.point, udp)
		}
		if echo := tshark(t, host, "icmp.type == 8 || icmp.type == 0", "icmp.type"); strings.Join(echo, " ") != "8 0 8 0" {
			t.Fatalf("%s: ICMP echo request and reply types %v, want 8 0 8 0", tc.point, echo)
		}
		if unreach := tshark(t, host, "icmp.type == 3 && icmp.code == 3", "udp.dstport"); len(unreach) != 1 || unreach[0] != "9" {
			t.Fatalf("%s: port unreachable about the datagram to port 9: %v", tc.point, unreach)
		}
		if sent := tshark(t, host, "udp.dstport == 9 && !icmp", "frame.number"); len(sent) != 1 {
			t.Fatalf("%s: datagrams to port 9: %v", tc.point, sent)
		}
		// The engine's own question to the upstream resolver for the sandbox.
		if q := tshark(t, host, `dns.qry.name == "web.test" && ip.dst == 203.0.113.53`, "ip.src"); len(q) == 0 {
			t.Fatalf("%s: no upstream DNS query for web.test", tc.point)
		}
		if other := tshark(t, host, "ip.addr == 203.0.113.20", "frame.number"); len(other) != 0 {
			t.Fatalf("%s: the host's own traffic to 203.0.113.20 was captured (%d packets)", tc.point, len(other))
		}
		if tc.point == "egress" {
			if tshark(t, host, "ip.addr == 10.87.0.0/16 || ipv6.addr == fd00::/8", "frame.number") != nil {
				t.Fatalf("egress: sandbox-side addresses in the host view")
			}
		}
	}
	withRootlessAllowed(t)
	if r := sh(t, rootless, []string{"-c", filepath.Join(t.TempDir(), "x.pcapng"), "-C", "egress"}, "true"); r.code != 2 || !strings.Contains(r.stderr, "--capture-point egress") {
		t.Errorf("egress view as a normal user: %v", r)
	}
}

// A capture file that cannot be written (a full disk) is a failure the
// run reports: on stderr, naming the file, and as a runtime_failure in
// the flow log (and so the summary). The command itself is not
// stopped, and its exit status stays its own.
// The egress views' packet socket sees the whole host: the host's own
// traffic, here an iperf3 stream over loopback, must not crowd the
// sandbox's packets out of the capture.
func TestTheEgressCaptureKeepsUpWithABusyHost(t *testing.T) {
	requireRoot(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	server := exec.CommandContext(ctx, "iperf3", "-s", "-B", "127.0.0.1", "-p", "5207")
	if err := server.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cancel(); server.Wait() }()
	eventually(t, "iperf3 to listen", func() bool {
		c, err := net.Dial("tcp", "127.0.0.1:5207")
		if err == nil {
			c.Close()
		}
		return err == nil
	})
	client := exec.CommandContext(ctx, "iperf3", "-c", "127.0.0.1", "-p", "5207", "-t", "60")
	if err := client.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { cancel(); client.Wait() }()
	time.Sleep(500 * time.Millisecond)

	pcap := filepath.Join(logDir(t), "busy.pcapng")
	if r := sh(t, root, []string{"-c", pcap, "-C", "egress"}, "for i in $(seq 20); do curl -sS -m5 -o /dev/null http://web.test/ || exit 1; done"); r.code != 0 {
		t.Fatal(r)
	}
	// Each connection whole: its handshake, request, response and both FINs.
	for _, c := range []struct {
		what, filter string
		want         int
	}{
		{"SYNs", "tcp.flags.syn == 1 && tcp.flags.ack == 0", 20},
		{"SYN-ACKs", "tcp.flags.syn == 1 && tcp.flags.ack == 1", 20},
		{"requests", "http.request", 20},
		{"responses", "http.response.code == 200", 20},
		{"FINs", "tcp.flags.fin == 1", 40},
	} {
		if got := tshark(t, pcap, c.filter, "tcp.stream"); len(got) != c.want {
			t.Errorf("%d %s in the capture of 20 connections, want %d", len(got), c.what, c.want)
		}
	}
}

// A capture of an idle sandbox costs no wake-ups: its writer sleeps
// until there is a packet, the egress views' socket waits in the poller.
func TestAnIdleCaptureSleeps(t *testing.T) {
	users(t, func(t *testing.T, u as) {
		dir := logDir(t)
		flags := []string{"-c", filepath.Join(dir, "idle.pcapng")}
		if u == root {
			flags = append(flags, "-C", "both")
		}
		ready := filepath.Join(dir, "ready")
		cmd := command(context.Background(), u, append(append(flags, "--"), "sh", "-c", "touch "+ready+"; sleep 3")...)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		defer cmd.Wait()
		eventually(t, "the sandbox to start", func() bool { return exists(ready) })
		// Counted over childflow's threads, once the start has settled.
		switches := func() (n int) {
			tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/status", cmd.Process.Pid))
			for _, task := range tasks {
				c, _ := statusField(task, "voluntary_ctxt_switches") // a thread that ended counts 0
				n += c
			}
			return n
		}
		time.Sleep(300 * time.Millisecond)
		before := switches()
		time.Sleep(2 * time.Second)
		if n := switches() - before; n > 10 {
			t.Errorf("childflow's threads woke %d times in 2 s while the sandbox slept", n)
		}
	})
}

func TestACaptureThatCannotBeWrittenIsAFailure(t *testing.T) {
	users(t, func(t *testing.T, u as) {
		dir := logDir(t)
		full := filepath.Join(dir, "full")
		os.Mkdir(full, 0o777)
		if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=64k,mode=1777", "tmpfs", full).CombinedOutput(); err != nil {
			t.Fatalf("mounting a small tmpfs: %v\n%s", err, out)
		}
		t.Cleanup(func() { exec.Command("umount", full).Run() })
		pcap, flows := filepath.Join(full, "cap.pcapng"), filepath.Join(dir, "flows.jsonl")
		r := sh(t, u, []string{"-c", pcap, "--flow-log", flows},
			`head -c 1000000 /dev/zero | socat -t2 - TCP:203.0.113.10:7 | wc -c`)
		if r.code != 0 || strings.TrimSpace(r.stdout) != "1000000" {
			t.Fatalf("the command did not run to its end: %v", r)
		}
		want := "--capture: writing " + pcap + ": no space left on device"
		if !strings.Contains(r.stderr, "childflow: "+want) {
			t.Errorf("stderr does not say the capture failed:\n%s", r.stderr)
		}
		var failures []string
		for _, e := range readFlowLog(t, flows) {
			if e["event"] == "runtime_failure" {
				failures = append(failures, e["error"].(string))
			}
		}
		if len(failures) != 1 || failures[0] != want {
			t.Errorf("runtime_failure events %q, want one %q", failures, want)
		}
	})
}

// A flow log that cannot be written (a full disk) is reported on stderr
// at the end, naming the file; the command's exit status stays its own.
func TestAFlowLogThatCannotBeWrittenIsReported(t *testing.T) {
	users(t, func(t *testing.T, u as) {
		full := filepath.Join(logDir(t), "full")
		os.Mkdir(full, 0o777)
		if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=8k,mode=1777", "tmpfs", full).CombinedOutput(); err != nil {
			t.Fatalf("mounting a small tmpfs: %v\n%s", err, out)
		}
		t.Cleanup(func() { exec.Command("umount", full).Run() })
		flows := filepath.Join(full, "flows.jsonl")
		r := sh(t, u, []string{"--flow-log", flows},
			`for i in $(seq 60); do echo x | socat -u - UDP:203.0.113.10:7; done; echo done`)
		if r.code != 0 || strings.TrimSpace(r.stdout) != "done" {
			t.Fatalf("the command did not run to its end: %v", r)
		}
		if want := "childflow: --flow-log: write " + flows + ": no space left on device"; !strings.Contains(r.stderr, want) {
			t.Errorf("stderr does not say %q:\n%s", want, r.stderr)
		}
	})
}
