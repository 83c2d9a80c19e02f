package rootful

import (
	"net/netip"
	"os"
	"runtime"
	"testing"

	"github.com/google/nftables"
	"golang.org/x/sys/unix"

	"github.com/childflow/childflow/internal/netplan"
	"github.com/childflow/childflow/policy"
)

// testTable moves the test's thread to a network namespace of its own
// and returns the spec of a sandbox's table there, with policy p.
func testTable(t *testing.T, name string, p *policy.Policy) tableSpec {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root for a network namespace")
	}
	runtime.LockOSThread() // never unlocked: the thread goes with the namespace
	if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
		t.Fatal(err)
	}
	plan := netplan.Plan{
		Prefix4: netip.MustParsePrefix("10.88.0.0/24"), Gateway4: netip.MustParseAddr("10.88.0.1"), Sandbox4: netip.MustParseAddr("10.88.0.2"),
		Prefix6: netip.MustParsePrefix("fd87:cf88::/64"), Gateway6: netip.MustParseAddr("fd87:cf88::1"), Sandbox6: netip.MustParseAddr("fd87:cf88::2"),
	}
	return tableSpec{name: name, hostIf: "cfrtest", plan: plan, policy: p}
}

// Long CIDR lists go into the table whole: 3000 IPv4 and 1500 IPv6
// ranges, none adjacent. Sent in one message per set, 700 IPv4 ranges
// were refused (message too long) and 1500 IPv6 ones put in 952 of
// their 3000 elements without an error.
func TestTableHoldsLongCIDRLists(t *testing.T) {
	var deny []netip.Prefix
	for i := range 3000 {
		deny = append(deny, netip.PrefixFrom(netip.AddrFrom4([4]byte{100, byte(i / 128), byte(i % 128 * 2), 0}), 24))
	}
	for i := range 1500 {
		deny = append(deny, netip.PrefixFrom(netip.AddrFrom16([16]byte{0x20, 0x00, byte(i >> 7), byte(i << 1)}), 32))
	}
	const table = "childflow-root-test"
	if err := installTable(testTable(t, table, &policy.Policy{DenyCIDRs: deny}), nil); err != nil {
		t.Fatal(err)
	}
	c, err := nftables.New()
	if err != nil {
		t.Fatal(err)
	}
	set, err := c.GetSetByName(&nftables.Table{Family: nftables.TableFamilyINet, Name: table}, setDenyCIDR+"4")
	if err != nil {
		t.Fatal(err)
	}
	if got, err := c.GetSetElements(set); err != nil || len(got) != 2*3000 {
		t.Errorf("%s holds %d elements (%v), want 6000: a start and an end per range", set.Name, len(got), err)
	}
}
