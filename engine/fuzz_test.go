package engine

import (
	"context"
	"encoding/binary"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	mdns "github.com/miekg/dns"
	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip/checksum"

	"github.com/childflow/childflow/engine/capture"
	"github.com/childflow/childflow/engine/flowlog"
	"github.com/childflow/childflow/internal/netplan"
	"github.com/childflow/childflow/policy"
)

// FuzzSandboxPackets sends what a sandbox may send, anything at all,
// into an engine that captures and logs: a container keeps CAP_NET_RAW
// under Docker's defaults, and one engine's panic would end the node
// daemon's every sandbox. After each input the engine must still answer
// a ping of its gateway and a DNS query.
//
// The engine's traffic stays on this host's loopback: its Dial lands
// every allowed flow on the test's own servers, its resolver asks the
// test's, and no echo request leaves (one the policy would let out is
// sent to the gateway instead, which answers it itself). make fuzz runs
// it in a network namespace of its own besides.
func FuzzSandboxPackets(f *testing.F) {
	h := newFuzzHarness(f)
	for _, seed := range fuzzSeeds() {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		for len(data) >= 2 {
			n := min(int(data[1])*8, len(data)-2)
			h.send(h.fuzzPacket(data[0], data[2:2+n]))
			data = data[2+n:]
		}
		h.alive(t)
	})
}

type fuzzHarness struct {
	plan    netplan.Plan
	policy  *policy.Policy
	fd      int
	replies chan []byte
	seq     uint16
}

// Destinations a fuzzed packet is sent to, chosen by a byte of its own.
var (
	fuzzAllowed4 = netip.MustParseAddr("192.0.2.1")
	fuzzAllowed6 = netip.MustParseAddr("2001:db8:ffff::1")
	fuzzDenied4  = netip.MustParseAddr("203.0.113.20")
	fuzzDenied6  = netip.MustParseAddr("2001:db8::20")
)

func newFuzzHarness(f *testing.F) *fuzzHarness {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		f.Fatal(err)
	}
	for _, fd := range fds {
		unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUF, 4<<20)
		unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUF, 4<<20)
	}
	plan, err := netplan.Choose(nil, 1500)
	if err != nil {
		f.Fatal(err)
	}
	tcpServer := echoServer(f, "tcp", "127.0.0.1:0")
	udpServer := udpEchoServer(f)
	resolver, _ := dnsUpstream(f)
	dir := f.TempDir()
	flows, err := flowlog.Create(filepath.Join(dir, "flows.jsonl"))
	if err != nil {
		f.Fatal(err)
	}
	pcap, err := capture.Create(filepath.Join(dir, "child.pcapng"), capture.View{Name: "child", Backend: "rootless", Interface: "cf0"})
	if err != nil {
		f.Fatal(err)
	}
	p := &policy.Policy{DefaultDeny: true, AllowCIDRs: []netip.Prefix{
		netip.PrefixFrom(fuzzAllowed4, 32), netip.PrefixFrom(fuzzAllowed6, 128)}}
	eng, err := New(Config{ID: "fuzz", Link: os.NewFile(uintptr(fds[0]), "engine"), Plan: plan, Policy: p,
		DNS: []netip.AddrPort{resolver}, OnEvent: flows.Log, Capture: pcap.Packet,
		UDPIdleTimeout: time.Second, DialTimeout: time.Second,
		Dial: func(ctx context.Context, network, address string) (net.Conn, error) {
			// Whatever port was asked for: only the test's servers.
			to := tcpServer
			if strings.HasPrefix(network, "udp") {
				to = udpServer
			}
			var d net.Dialer
			return d.DialContext(ctx, network, to.String())
		}})
	if err != nil {
		f.Fatal(err)
	}
	if err := eng.Start(context.Background()); err != nil {
		f.Fatal(err)
	}
	h := &fuzzHarness{plan: plan, policy: p, fd: fds[1], replies: make(chan []byte, 64)}
	for _, a := range []netip.Addr{fuzzAllowed4, fuzzAllowed6, netip.MustParseAddr("::ffff:192.0.2.1")} {
		if h.noEchoOut(a) == a {
			f.Fatalf("an echo request to %s would leave this host", a)
		}
	}
	go h.read()
	f.Cleanup(func() {
		eng.Close()
		unix.Close(h.fd)
		flows.Close()
		pcap.Close()
	})
	return h
}

func (h *fuzzHarness) send(pkt []byte) {
	if len(pkt) > 0 {
		unix.Send(h.fd, pkt, unix.MSG_DONTWAIT) // a full queue drops it, as a TUN's would
	}
}

// read drains what the engine sends the sandbox, keeping what alive
// waits for: ICMP echo replies and UDP from port 53.
func (h *fuzzHarness) read() {
	buf := make([]byte, 1<<16)
	for {
		n, err := unix.Read(h.fd, buf)
		if err != nil || n == 0 {
			if err == unix.EINTR {
				continue
			}
			close(h.replies)
			return
		}
		select {
		case h.replies <- append([]byte(nil), buf[:n]...):
		default: // nobody waits: dropped
		}
	}
}

// aliveID is the echo identifier of alive's pings.
const aliveID = 0xf022

// alive pings the gateway and asks it a name, and fails unless both
// are answered.
func (h *fuzzHarness) alive(t *testing.T) {
	t.Helper()
	h.seq++
	gw, src := h.plan.Gateway4, h.plan.Sandbox4
	echo := make([]byte, 8)
	echo[0] = 8
	binary.BigEndian.PutUint16(echo[4:], aliveID)
	binary.BigEndian.PutUint16(echo[6:], h.seq)
	binary.BigEndian.PutUint16(echo[2:], ^checksum.Checksum(echo, 0))
	h.send(ipv4Packet(src, gw, 1, echo))

	q := new(mdns.Msg)
	q.SetQuestion("allowed.test.", mdns.TypeA)
	q.Id = h.seq
	wire, _ := q.Pack()
	udp := make([]byte, 8, 8+len(wire))
	binary.BigEndian.PutUint16(udp[0:], 40000)
	binary.BigEndian.PutUint16(udp[2:], 53)
	binary.BigEndian.PutUint16(udp[4:], uint16(8+len(wire)))
	h.send(ipv4Packet(src, gw, 17, append(udp, wire...)))

	pinged, answered := false, false
	deadline := time.After(10 * time.Second)
	for !pinged || !answered {
		select {
		case b, ok := <-h.replies:
			if !ok {
				t.Fatal("the engine closed its link")
			}
			if len(b) < 28 || b[0]>>4 != 4 || netip.AddrFrom4([4]byte(b[12:16])) != gw {
				continue
			}
			l4 := b[int(b[0]&0xf)*4:]
			switch {
			case b[9] == 1 && l4[0] == 0 && binary.BigEndian.Uint16(l4[4:]) == aliveID && binary.BigEndian.Uint16(l4[6:]) == h.seq:
				pinged = true
			case b[9] == 17 && binary.BigEndian.Uint16(l4[0:]) == 53 && binary.BigEndian.Uint16(l4[2:]) == 40000:
				var m mdns.Msg
				if m.Unpack(l4[8:]) == nil && m.Id == h.seq {
					answered = true
				}
			}
		case <-deadline:
			buf := make([]byte, 1<<20)
			t.Fatalf("the engine stopped answering: ping %v, DNS %v\n%s", pinged, answered, buf[:runtime.Stack(buf, true)])
		}
	}
}

// fuzzPacket makes an IP packet from the sandbox out of kind and body:
// kind picks the family, the protocol (or a raw packet), a variant of
// the IP header and the destination; body is the rest, the transport
// header included, as the fuzzer made it.
func (h *fuzzHarness) fuzzPacket(kind byte, body []byte) []byte {
	v6 := kind&1 != 0
	proto := []uint8{6, 17, 1, 0}[kind>>1&3]
	variant := kind >> 3 & 3
	if proto == 0 {
		// Raw: the packet as the fuzzer wrote it, its destination one of
		// the chosen ones, whichever family it claims to be.
		pkt := append([]byte(nil), body...)
		switch {
		case len(pkt) >= 20 && pkt[0]>>4 == 4:
			copy(pkt[16:20], h.noEchoOut(fuzzDst(h.plan, false, kind>>5)).AsSlice())
		case len(pkt) >= 40 && pkt[0]>>4 == 6:
			copy(pkt[24:40], h.noEchoOut(fuzzDst(h.plan, true, kind>>5)).AsSlice())
		}
		return pkt
	}
	src, dst := h.plan.Sandbox4, fuzzDst(h.plan, v6, kind>>5)
	if v6 {
		src = h.plan.Sandbox6
		if proto == 1 {
			proto = 58
		}
	}
	if proto == 1 || proto == 58 {
		dst = h.noEchoOut(dst)
	}
	if v6 {
		return ipv6Packet(src, dst, proto, body, variant)
	}
	return ipv4Variant(src, dst, proto, body, variant)
}

// ipv4Variant puts the body behind an IPv4 header; variant 1 makes it a
// fragment (offset and flags from the body), 2 gives it a total length
// that lies, 3 options (their length from the body).
func ipv4Variant(src, dst netip.Addr, proto uint8, body []byte, variant byte) []byte {
	pkt := ipv4Packet(src, dst, proto, body)
	switch variant {
	case 1:
		if len(body) >= 2 {
			binary.BigEndian.PutUint16(pkt[6:], binary.BigEndian.Uint16(body))
		}
	case 2:
		if len(body) >= 1 {
			binary.BigEndian.PutUint16(pkt[2:], uint16(len(pkt))+uint16(int8(body[0])))
		}
	case 3:
		if len(body) >= 1 {
			ihl := 5 + int(body[0]&0xf)%11
			opts := make([]byte, (ihl-5)*4)
			copy(opts, body[1:])
			pkt = append(append(append([]byte(nil), pkt[:20]...), opts...), pkt[20:]...)
			pkt[0] = 0x40 | byte(ihl)
			binary.BigEndian.PutUint16(pkt[2:], uint16(len(pkt)))
		}
	}
	binary.BigEndian.PutUint16(pkt[10:], 0)
	binary.BigEndian.PutUint16(pkt[10:], ^checksum.Checksum(pkt[:int(pkt[0]&0xf)*4], 0))
	return pkt
}

// noEchoOut turns a destination the policy lets an echo request reach
// (the engine would ping it from this host) into the gateway, which
// answers pings itself.
func (h *fuzzHarness) noEchoOut(dst netip.Addr) netip.Addr {
	if !h.policy.Decide(policy.Flow{Proto: policy.ICMP, Dst: netip.AddrPortFrom(dst, 0)}).Allow {
		return dst
	}
	if dst.Is4() {
		return h.plan.Gateway4
	}
	return h.plan.Gateway6
}

func fuzzDst(plan netplan.Plan, v6 bool, sel byte) netip.Addr {
	if v6 {
		return []netip.Addr{plan.Gateway6, fuzzAllowed6, fuzzDenied6, netip.IPv6Loopback(),
			netip.MustParseAddr("::ffff:192.0.2.1"), netip.MustParseAddr("64:ff9b::c000:201"),
			netip.MustParseAddr("ff02::1"), netip.MustParseAddr("fe80::1")}[sel&7]
	}
	return []netip.Addr{plan.Gateway4, fuzzAllowed4, fuzzDenied4, netip.MustParseAddr("127.0.0.1"),
		netip.MustParseAddr("255.255.255.255"), netip.MustParseAddr("224.0.0.1"),
		netip.MustParseAddr("0.0.0.0"), netip.MustParseAddr("169.254.169.254")}[sel&7]
}

func ipv4Packet(src, dst netip.Addr, proto uint8, l4 []byte) []byte {
	ip := make([]byte, 20, 20+len(l4))
	ip[0], ip[8], ip[9] = 0x45, 64, proto
	binary.BigEndian.PutUint16(ip[2:], uint16(20+len(l4)))
	copy(ip[12:16], src.AsSlice())
	copy(ip[16:20], dst.AsSlice())
	binary.BigEndian.PutUint16(ip[10:], ^checksum.Checksum(ip, 0))
	return append(ip, l4...)
}

// ipv6Packet puts the body behind an IPv6 header; variant 1 puts a
// fragment header (offset and flags from the body) in between, 2 a
// hop-by-hop options header, 3 a payload length that lies.
func ipv6Packet(src, dst netip.Addr, proto uint8, body []byte, variant byte) []byte {
	ip := make([]byte, 40, 48+len(body))
	ip[0], ip[6], ip[7] = 0x60, proto, 64
	copy(ip[8:24], src.AsSlice())
	copy(ip[24:40], dst.AsSlice())
	switch variant {
	case 1:
		frag := []byte{proto, 0, 0, 0, 0, 0, 0, 1}
		if len(body) >= 2 {
			copy(frag[2:4], body[:2])
		}
		ip[6] = 44
		ip = append(ip, frag...)
	case 2:
		ip[6] = 0
		ip = append(ip, proto, 0, 1, 4, 0, 0, 0, 0) // PadN
	}
	ip = append(ip, body...)
	binary.BigEndian.PutUint16(ip[4:], uint16(len(ip)-40))
	if variant == 3 && len(body) >= 1 {
		binary.BigEndian.PutUint16(ip[4:], uint16(len(ip)-40)+uint16(int8(body[0])))
	}
	return ip
}

// fuzzSeeds are inputs the fuzzer starts from: each protocol to each
// destination kind, a DNS query, a fragment.
func fuzzSeeds() [][]byte {
	record := func(kind byte, body []byte) []byte {
		for len(body)%8 != 0 {
			body = append(body, 0)
		}
		return append([]byte{kind, byte(len(body) / 8)}, body...)
	}
	syn := func(port uint16) []byte {
		h := make([]byte, 20)
		binary.BigEndian.PutUint16(h[0:], 40001)
		binary.BigEndian.PutUint16(h[2:], port)
		binary.BigEndian.PutUint32(h[4:], 1000)
		h[12], h[13] = 5<<4, 0x02
		binary.BigEndian.PutUint16(h[14:], 65535)
		return h
	}
	udp := func(port uint16, payload []byte) []byte {
		h := make([]byte, 8, 8+len(payload))
		binary.BigEndian.PutUint16(h[0:], 40002)
		binary.BigEndian.PutUint16(h[2:], port)
		binary.BigEndian.PutUint16(h[4:], uint16(8+len(payload)))
		return append(h, payload...)
	}
	q := new(mdns.Msg)
	q.SetQuestion("allowed.test.", mdns.TypeA)
	query, _ := q.Pack()
	echo := []byte{8, 0, 0, 0, 0, 1, 0, 1, 'p', 'i', 'n', 'g'}
	echo6 := []byte{128, 0, 0, 0, 0, 1, 0, 1, 'p', 'i', 'n', 'g'}
	var seeds [][]byte
	for sel := byte(0); sel < 8; sel++ {
		d := sel << 5
		seeds = append(seeds,
			record(d|0, syn(80)), record(d|1, syn(443)),
			record(d|2, udp(53, query)), record(d|3, udp(53, query)),
			record(d|2, udp(9, []byte("hello"))), record(d|4, echo), record(d|5, echo6),
			record(d|8|0, append([]byte{0x20, 0}, syn(80)...)), record(d|8|3, append([]byte{0, 8}, udp(9, []byte("frag"))...)))
	}
	return seeds
}
