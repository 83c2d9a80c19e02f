package rootful

import (
	"errors"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/google/nftables"

	"github.com/childflow/childflow/policy"
)

// The sandbox's domain sets hold at most domainSetSize addresses: a full
// one refuses a new address with an error naming it, and still renews
// one it holds (delete and add in one transaction).
func TestDomainSetsAreBounded(t *testing.T) {
	const table = "childflow-root-test"
	if err := installTable(testTable(t, table, &policy.Policy{}), nil); err != nil {
		t.Fatal(err)
	}
	c, err := nftables.New()
	if err != nil {
		t.Fatal(err)
	}
	set, err := c.GetSetByName(&nftables.Table{Family: nftables.TableFamilyINet, Name: table}, setDomAllow+"4")
	if err != nil {
		t.Fatal(err)
	}
	// Filled with 10.0.0.0 and up, a message's worth at a time.
	const batch = 512
	for from := 0; from < domainSetSize; from += batch {
		el := make([]nftables.SetElement, batch)
		for i := range el {
			a := from + i
			el[i] = nftables.SetElement{Key: []byte{10, byte(a >> 16), byte(a >> 8), byte(a)}, Timeout: time.Hour}
		}
		if err := c.SetAddElements(set, el); err != nil {
			t.Fatal(err)
		}
		if err := c.Flush(); err != nil {
			t.Fatalf("adding addresses %d and up: %v", from, err)
		}
	}
	if got, err := c.GetSetElements(set); err != nil || len(got) != domainSetSize {
		t.Fatalf("%d elements, %v", len(got), err)
	}
	d := &domainSets{table: table}
	err = d.add(domainElement{setDomAllow, netip.MustParseAddr("192.0.2.1"), time.Minute})
	if !errors.Is(err, errSetFull) || !strings.Contains(err.Error(), setDomAllow+"4") {
		t.Errorf("adding to a full set: %v, want an error saying %s4 is full", err, setDomAllow)
	}
	if err := d.add(domainElement{setDomAllow, netip.MustParseAddr("10.0.0.7"), time.Minute}); err != nil {
		t.Errorf("renewing an address a full set holds: %v", err)
	}
	if err := d.add(domainElement{setDomAllow, netip.MustParseAddr("2001:db8::1"), time.Minute}); err != nil {
		t.Errorf("the IPv6 set is not full: %v", err)
	}
}
