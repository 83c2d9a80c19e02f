package rootful

import (
	"errors"
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
