//go:build e2e

package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
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

func TestOutputFilesRefuseSymlinks(t *testing.T) {
	requireRoot(t)
	dir := logDir(t)
	target := filepath.Join(dir, "victim")
	os.WriteFile(target, []byte("keep me"), 0o644)
	for _, flag := range []string{"-c", "--flow-log"} {
		link := filepath.Join(dir, "link"+flag)
		os.Symlink(target, link)
		r := sh(t, root, []string{flag, link}, "true")
		if r.code == 0 {
			t.Errorf("%s through a symlink was accepted", flag)
		}
		if b, _ := os.ReadFile(target); string(b) != "keep me" {
			t.Fatalf("%s wrote through a symlink", flag)
		}
	}
}
