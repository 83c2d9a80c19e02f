package capture

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"testing"
	"time"

	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"

	"github.com/childflow/childflow/policy"
)

func TestRemoteFilter(t *testing.T) {
	const host, far = "192.0.2.1", "203.0.113.10"
	end := func(s string) uint32 { return remoteKey(netip.MustParseAddrPort(s)) }
	web, echo, dns6 := []uint32{end(far + ":80")}, []uint32{end(far + ":7")}, []uint32{end("[2001:db8::10]:53")}
	var many []uint32
	for p := range maxFilterRemotes { // more than one run of comparisons
		many = append(many, end(fmt.Sprintf("%s:%d", far, 1000+p)))
	}
	slices.Sort(many)
	tooMany := make([]uint32, maxFilterRemotes+1)
	for i := range tooMany {
		tooMany[i] = uint32(i)
	}
	withOptions := func(p []byte) []byte { // IHL 6: four bytes of options
		q := append([]byte{}, p[:20]...)
		q[0] = 0x46
		q = append(q, 1, 1, 1, 1)
		return append(q, p[20:]...)
	}
	laterFragment := ipv4(6, far, host, ports(80, 40000))
	laterFragment[7] = 1
	firstFragment := ipv4(17, host, far, ports(40000, 7))
	firstFragment[6] = 0x20 // more fragments
	for _, tc := range []struct {
		name string
		keys []uint32
		p    []byte
		keep bool
	}{
		{"tcp to a watched end", web, ipv4(6, host, far, ports(40000, 80)), true},
		{"tcp from a watched end", web, ipv4(6, far, host, ports(80, 40000)), true},
		{"tcp to another port of its host", web, ipv4(6, host, far, ports(40000, 81)), false},
		{"tcp to the port on another host", web, ipv4(6, host, "203.0.113.11", ports(40000, 80)), false},
		{"udp over IPv6", dns6, ipv6(17, "2001:db8::1", "2001:db8::10", ports(5353, 53)), true},
		{"udp over IPv6, back", dns6, ipv6(17, "2001:db8::10", "2001:db8::1", ports(53, 5353)), true},
		{"udp over IPv6, another host", dns6, ipv6(17, "2001:db8::1", "2001:db8::11", ports(5353, 53)), false},
		{"IPv4 options before the ports", web, withOptions(ipv4(6, far, host, ports(80, 40000))), true},
		{"IPv4 options, another port", web, withOptions(ipv4(6, far, host, ports(81, 40000))), false},
		{"nothing watched yet", nil, ipv4(6, host, far, ports(40000, 80)), false},
		{"icmp: match decides", nil, ipv4(1, far, host, icmpMsg(3, 3, 0, ipv4(17, host, far, ports(40000, 7)))), true},
		{"icmpv6: match decides", nil, ipv6(58, "2001:db8::10", "2001:db8::1", icmpMsg(129, 0, 9, nil)), true},
		{"a later fragment", web, laterFragment, false},
		{"a first fragment", echo, firstFragment, true},
		{"another protocol", web, ipv4(132, host, far, ports(40000, 80)), false},
		{"not IP", web, append([]byte{0x00, 0x01, 0x08, 0x00}, make([]byte, 40)...), false},
		{"one of many", many, ipv4(17, host, far, ports(40000, 1000)), true},
		{"another of many", many, ipv4(17, far, host, ports(1251, 40000)), true},
		{"the last of many", many, ipv4(17, host, far, ports(40000, 1000+maxFilterRemotes-1)), true},
		{"none of many", many, ipv4(17, host, far, ports(40000, 1000+maxFilterRemotes)), false},
		{"past the bound every tcp and udp packet", tooMany, ipv4(6, host, far, ports(1, 2)), true},
		{"past the bound no other protocol", tooMany, ipv4(132, host, far, ports(1, 2)), false},
	} {
		vm, err := bpf.NewVM(remoteFilter(tc.keys, loopback{}))
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		n, err := vm.Run(tc.p)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if got := n > 0; got != tc.keep {
			t.Errorf("%s: kept %v, want %v", tc.name, got, tc.keep)
		}
		if n > 0 && n < len(tc.p) {
			t.Errorf("%s: kept %d of %d bytes", tc.name, n, len(tc.p))
		}
	}
	vm, err := bpf.NewVM(remoteFilter(many, loopback{}))
	if err != nil {
		t.Fatal(err)
	}
	for p := range uint16(maxFilterRemotes) {
		if n, err := vm.Run(ipv4(6, far, host, ports(1000+p, 40000))); n == 0 || err != nil {
			t.Errorf("port %d of many: kept %d bytes, %v", 1000+p, n, err)
		}
	}
}

// The host's other traffic stays in the kernel: the packet socket's own
// count of packets it took holds the watched socket's datagrams and
// little else, however many others loopback carries. Of loopback's two
// copies of each datagram, sent and received, the egress view takes
// one, the wire-egress view none.
func TestHostTapTakesOnlyTheSandboxsPackets(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for a packet socket")
	}
	for _, view := range []struct {
		name       string
		wireOnly   bool
		least, max uint32
	}{{"egress", false, 10, 20}, {"wire-egress", true, 0, 10}} {
		t.Run(view.name, func(t *testing.T) {
			w, err := Create(t.TempDir()+"/egress.pcapng", View{Name: view.name})
			if err != nil {
				t.Fatal(err)
			}
			defer w.Close()
			tap, err := StartHostTap(w, view.wireOnly)
			if err != nil {
				t.Fatal(err)
			}
			defer tap.Close()

			watched, other := loopbackUDP(t), loopbackUDP(t)
			local, remote := watched.LocalAddr().(*net.UDPAddr).AddrPort(), watched.RemoteAddr().(*net.UDPAddr).AddrPort()
			tap.Upstream(policy.UDP, netip.AddrPortFrom(netip.IPv4Unspecified(), local.Port()), remote, true)
			defer tap.Upstream(policy.UDP, netip.AddrPortFrom(netip.IPv4Unspecified(), local.Port()), remote, false)

			taken := func() uint32 {
				st, err := tap.stats()
				if err != nil {
					t.Fatal(err)
				}
				return st.Packets // since the last call
			}
			taken()
			for range 5000 {
				other.Write([]byte("not the sandbox's"))
			}
			for range 10 {
				watched.Write([]byte("the sandbox's"))
			}
			time.Sleep(100 * time.Millisecond)
			if n := taken(); n < view.least || n >= view.max {
				t.Errorf("the tap took %d packets for the watched socket's 10 datagrams among 5000 others, want %d and whatever little else the host sent meanwhile", n, view.least)
			}
		})
	}
}

// The kernel checks a program more strictly than bpf.NewVM: every size
// the tap may give it must pass.
func TestTheKernelTakesTheFilters(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for a packet socket")
	}
	fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	for _, n := range []int{0, 1, 250, 251, 600, maxFilterRemotes, maxFilterRemotes + 1} {
		keys := make([]uint32, n)
		for i := range keys {
			keys[i] = uint32(i)
		}
		for _, lo := range []loopback{{}, {indexes: []uint32{1}}, {indexes: []uint32{1, 7}, none: true}} {
			if err := attachFilter(fd, remoteFilter(keys, lo)); err != nil {
				t.Errorf("%d remote ends, loopback %+v: %v", n, lo, err)
			}
		}
	}
}

// Past maxFilterRemotes the filter passes every end and is not rebuilt
// for each new one; it narrows again once the ends are counted anew.
func TestTheFilterWidensAndNarrows(t *testing.T) {
	h := &HostTap{open: map[flow]int{}, linger: map[flow]time.Time{}, filtered: map[uint32]bool{}}
	end := func(i int) netip.AddrPort {
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte{198, 18, byte(i >> 8), byte(i)}), 443)
	}
	local := netip.MustParseAddrPort("0.0.0.0:40000")
	for i := range maxFilterRemotes + 1 {
		h.Upstream(policy.UDP, local, end(i), true)
	}
	if !h.wide || len(h.filtered) != maxFilterRemotes+1 {
		t.Fatalf("%d ends open: wide %v, %d in the filter", maxFilterRemotes+1, h.wide, len(h.filtered))
	}
	for i := range maxFilterRemotes + 1 {
		h.Upstream(policy.UDP, local, end(i), false)
	}
	h.Upstream(policy.UDP, local, end(maxFilterRemotes+1), true)
	if !h.wide {
		t.Fatal("narrowed before the ends were counted again")
	}
	for e := range h.linger {
		h.linger[e] = time.Now().Add(-time.Second) // done lingering
	}
	h.recounted = time.Time{}
	h.Upstream(policy.TCP, local, end(maxFilterRemotes+2), true)
	if h.wide || len(h.filtered) != 2 {
		t.Fatalf("after the closed ends lingered: wide %v, %d in the filter, want the 2 open", h.wide, len(h.filtered))
	}
}

// Packets the kernel drops from the tap's full queue are counted with
// the Writer's own: the file's statistics block says they are missing.
func TestTheTapCountsWhatItsQueueLost(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for a packet socket")
	}
	w, err := Create(t.TempDir()+"/egress.pcapng", View{Name: "egress"})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	tap, err := newTap(w, 0, remoteFilter(nil, loopback{}))
	if err != nil {
		t.Fatal(err)
	}
	c := loopbackUDP(t)
	tap.Upstream(policy.UDP, c.LocalAddr().(*net.UDPAddr).AddrPort(), c.RemoteAddr().(*net.UDPAddr).AddrPort(), true)
	// Nothing reads the tap yet: its 4 MiB queue overflows.
	for range 20000 {
		c.Write(make([]byte, 1000))
	}
	go tap.run()
	tap.Close()
	if w.Dropped() == 0 {
		t.Fatal("40000 packets through a queue nothing read, and none counted as dropped")
	}
}

// loopbackUDP is a UDP socket connected to a server of its own on the
// host's loopback.
func loopbackUDP(t *testing.T) *net.UDPConn {
	t.Helper()
	server, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { server.Close() })
	c, err := net.DialUDP("udp4", nil, server.LocalAddr().(*net.UDPAddr))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}
