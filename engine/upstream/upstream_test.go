package upstream

import (
	"context"
	"net"
	"net/netip"
	"sync"
	"syscall"
	"testing"

	"github.com/childflow/childflow/policy"
)

type event struct {
	proto         policy.Proto
	local, remote netip.AddrPort
	open          bool
}

func recorder() (Func, func() []event) {
	var mu sync.Mutex
	var got []event
	return func(proto policy.Proto, local, remote netip.AddrPort, open bool) {
			mu.Lock()
			defer mu.Unlock()
			got = append(got, event{proto, local, remote, open})
		}, func() []event {
			mu.Lock()
			defer mu.Unlock()
			return append([]event(nil), got...)
		}
}

// TestReportsTheBoundSocket dials TCP and UDP over IPv4 and IPv6 loopback
// and checks that the socket is reported, with the local port it then
// uses, before the dial returns, and closed once done.
func TestReportsTheBoundSocket(t *testing.T) {
	for _, tc := range []struct{ network, addr string }{
		{"tcp", "127.0.0.1:0"}, {"tcp", "[::1]:0"}, {"udp", "127.0.0.1:0"}, {"udp", "[::1]:0"},
	} {
		var remote netip.AddrPort
		if tc.network == "tcp" {
			l, err := net.Listen(tc.network, tc.addr)
			if err != nil {
				t.Fatalf("%s %s: %v", tc.network, tc.addr, err)
			}
			defer l.Close()
			remote = l.Addr().(*net.TCPAddr).AddrPort()
		} else {
			pc, err := net.ListenPacket(tc.network, tc.addr)
			if err != nil {
				t.Fatalf("%s %s: %v", tc.network, tc.addr, err)
			}
			defer pc.Close()
			remote = pc.LocalAddr().(*net.UDPAddr).AddrPort()
		}
		on, events := recorder()
		ctx, done := Watch(context.Background(), on)
		c, err := Dialer(nil).DialContext(ctx, tc.network, remote.String())
		if err != nil {
			t.Fatal(err)
		}
		got := events()
		local, _ := netip.ParseAddrPort(c.LocalAddr().String())
		proto := policy.TCP
		if tc.network == "udp" {
			proto = policy.UDP
		}
		if len(got) != 1 || !got[0].open || got[0].proto != proto || got[0].remote != remote || got[0].local.Port() != local.Port() || local.Port() == 0 {
			t.Fatalf("%s to %s from %s: reported %+v", tc.network, remote, local, got)
		}
		c.Close()
		done()
		if got = events(); len(got) != 2 || got[1].open || got[1].local != got[0].local {
			t.Fatalf("%s: after done %+v", tc.network, got)
		}
	}
}

// TestWithoutWatchNothingChanges: a dial without a watch is not bound
// first and reports nothing; the dialer's own control still runs.
func TestWithoutWatchNothingChanges(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	ran := false
	d := Dialer(&net.Dialer{Control: func(string, string, syscall.RawConn) error { ran = true; return nil }})
	c, err := d.DialContext(context.Background(), "tcp", l.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if !ran {
		t.Fatal("the dialer's own Control did not run")
	}
}
