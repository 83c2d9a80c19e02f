package netplan

import (
	"net"
	"net/netip"
	"os"
	"runtime"
	"slices"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// TestRoutesListsEveryTable routes subnets in a network namespace of its
// own, in the main table and another, and finds them all, while the
// default routes are left out.
func TestRoutesListsEveryTable(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for a network namespace")
	}
	// Never unlocked: the thread, in its own namespace, ends with the test.
	runtime.LockOSThread()
	if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
		t.Fatal(err)
	}
	lo := &netlink.Device{LinkAttrs: netlink.LinkAttrs{Index: 1}}
	if err := netlink.LinkSetUp(lo); err != nil {
		t.Fatal(err)
	}
	want := []string{"10.87.0.0/16", "172.29.87.0/24", "2001:db8:87::/48", "2001:db8:cf::/64"}
	for i, dst := range append(want, "0.0.0.0/0", "::/0") {
		_, ipn, _ := net.ParseCIDR(dst)
		r := &netlink.Route{LinkIndex: lo.Index, Dst: ipn, Table: unix.RT_TABLE_MAIN}
		if i%2 == 1 {
			r.Table = 100
		}
		if err := netlink.RouteAdd(r); err != nil {
			t.Fatalf("adding %s: %v", dst, err)
		}
	}
	got := Routes()
	for _, w := range want {
		if !slices.Contains(got, netip.MustParsePrefix(w)) {
			t.Errorf("%s missing from %v", w, got)
		}
	}
	for _, p := range got {
		if p.Bits() == 0 {
			t.Errorf("default route %s listed", p)
		}
	}
	plan, err := Choose(got, 0)
	if err != nil {
		t.Fatal(err)
	}
	if plan.Prefix4.Overlaps(netip.MustParsePrefix("10.87.0.0/16")) || plan.Prefix4.Overlaps(netip.MustParsePrefix("172.29.87.0/24")) {
		t.Fatalf("chose %v over a routed subnet", plan.Prefix4)
	}
}

// TestLocalRoutesAreWhatTheHostReceives: in a namespace of its own, an
// address on a link that is up, and a range made local by a route, are
// the host's with the network's broadcast address; the network's own
// route and routes elsewhere are not.
func TestLocalRoutesAreWhatTheHostReceives(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for a network namespace")
	}
	runtime.LockOSThread() // never unlocked, as above
	if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
		t.Fatal(err)
	}
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "lr0"}, PeerName: "lr1"}
	if err := netlink.LinkAdd(veth); err != nil {
		t.Fatal(err)
	}
	lo := &netlink.Device{LinkAttrs: netlink.LinkAttrs{Index: 1}}
	for _, l := range []netlink.Link{lo, veth} {
		if err := netlink.LinkSetUp(l); err != nil {
			t.Fatal(err)
		}
	}
	addr, _ := netlink.ParseAddr("10.99.0.1/24")
	if err := netlink.AddrAdd(veth, addr); err != nil {
		t.Fatal(err)
	}
	_, anyIP, _ := net.ParseCIDR("10.50.0.0/16")
	if err := netlink.RouteAdd(&netlink.Route{LinkIndex: lo.Index, Dst: anyIP, Table: unix.RT_TABLE_LOCAL, Type: unix.RTN_LOCAL, Scope: netlink.SCOPE_HOST}); err != nil {
		t.Fatal(err)
	}
	_, elsewhere, _ := net.ParseCIDR("10.60.0.0/16")
	if err := netlink.RouteAdd(&netlink.Route{LinkIndex: veth.Index, Dst: elsewhere}); err != nil {
		t.Fatal(err)
	}
	got, err := LocalRoutes()
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range []string{"10.99.0.1/32", "10.99.0.255/32", "10.50.0.0/16", "127.0.0.1/32"} {
		if !slices.Contains(got, netip.MustParsePrefix(w)) {
			t.Errorf("%s missing from %v", w, got)
		}
	}
	for _, n := range []string{"10.99.0.0/24", "10.60.0.0/16"} {
		if slices.Contains(got, netip.MustParsePrefix(n)) {
			t.Errorf("%s listed as the host's: %v", n, got)
		}
	}
}
