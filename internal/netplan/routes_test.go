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
