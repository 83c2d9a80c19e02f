package rootful

import (
	"errors"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// A read whose deadline has passed fails without looking at the socket,
// though a message waits there: the drain's reader, kept from running
// until its deadline, asks pending before it stops.
func TestPendingSeesWhatALateReadMisses(t *testing.T) {
	c, err := netlink.Dial(unix.NETLINK_ROUTE, nil)
	if err != nil {
		t.Fatal(err)
	}
	l := &nflog{c: c}
	defer l.Close()
	if l.pending() {
		t.Fatal("pending on a socket nothing was sent to")
	}
	// The kernel's answer to a dump of the links waits unread.
	req := netlink.Message{Header: netlink.Header{Type: unix.RTM_GETLINK, Flags: netlink.Request | netlink.Dump}, Data: make([]byte, unix.SizeofIfInfomsg)}
	if _, err := c.Send(req); err != nil {
		t.Fatal(err)
	}
	c.SetReadDeadline(time.Now().Add(-time.Second))
	if _, err := l.read(); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read past its deadline: %v", err)
	}
	if !l.pending() {
		t.Fatal("the answer waiting is not pending")
	}
	c.SetReadDeadline(time.Time{})
	for l.pending() {
		if _, err := c.Receive(); err != nil {
			t.Fatal(err)
		}
	}
}

// An echo request is known by its identifier, which finds the ping's
// socket and tells one ping from another; other ICMP has no ports.
func TestAnEchoRequestIsKnownByItsIdentifier(t *testing.T) {
	v4 := func(l4 ...byte) []byte {
		return append([]byte{0x45, 0, 0, byte(20 + len(l4)), 0, 0, 0, 0, 64, unix.IPPROTO_ICMP, 0, 0, 10, 88, 0, 2, 203, 0, 113, 10}, l4...)
	}
	v6 := func(l4 ...byte) []byte {
		b := append([]byte{0x60, 0, 0, 0, 0, byte(len(l4)), unix.IPPROTO_ICMPV6, 64}, netip.MustParseAddr("fd88::2").AsSlice()...)
		return append(append(b, netip.MustParseAddr("2001:db8::10").AsSlice()...), l4...)
	}
	for _, c := range []struct {
		name   string
		packet []byte
		src    string
	}{
		{"echo request", v4(8, 0, 0, 0, 0x12, 0x34, 0, 1), "10.88.0.2:4660"},
		{"echo reply", v4(0, 0, 0, 0, 0x12, 0x34, 0, 1), "10.88.0.2:0"},
		{"unreachable", v4(3, 3, 0, 0, 0, 0, 0, 0), "10.88.0.2:0"},
		{"short", v4(8, 0, 0, 0, 0x12), "10.88.0.2:0"},
		{"ICMPv6 echo request", v6(128, 0, 0, 0, 0xab, 0xcd, 0, 1), "[fd88::2]:43981"},
		{"ICMPv6 echo reply", v6(129, 0, 0, 0, 0xab, 0xcd, 0, 1), "[fd88::2]:0"},
		{"ICMPv6 neighbour solicitation", v6(135, 0, 0, 0, 0, 0, 0, 0), "[fd88::2]:0"},
	} {
		k, ok := parsePacket(c.packet)
		if !ok || k.src.String() != c.src || k.dst.Port() != 0 {
			t.Errorf("%s: %v %v, want from %s", c.name, k, ok, c.src)
		}
	}
}
