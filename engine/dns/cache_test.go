package dns

import (
	"fmt"
	"net/netip"
	"slices"
	"testing"
	"time"
)

func TestCacheExpiresPerName(t *testing.T) {
	now := time.Unix(1000, 0)
	c := &Cache{Now: func() time.Time { return now }}
	a := netip.MustParseAddr("203.0.113.10")
	c.Record(a, "short.test", 10*time.Second)
	c.Record(a, "long.test", time.Hour)
	c.Record(netip.MustParseAddr("::ffff:203.0.113.10"), "zero.test", 0) // clamped to MinTTL
	if got := c.Names(a); len(got) != 3 {
		t.Fatalf("names %v", got)
	}
	now = now.Add(MinTTL + time.Second)
	if got := c.Names(a); len(got) != 2 || got[0] != "long.test" || got[1] != "short.test" {
		t.Fatalf("after MinTTL: %v", got)
	}
	now = now.Add(10 * time.Second)
	if got := c.Names(a); len(got) != 1 || got[0] != "long.test" {
		t.Fatalf("after 10s: %v", got)
	}
	now = now.Add(time.Hour)
	if got := c.Names(a); len(got) != 0 {
		t.Fatalf("after an hour: %v", got)
	}
}

// A sandbox asking for endless names under a wildcard: an address keeps
// the names that expire last, and every flow to it logs those only.
func TestCacheBoundsTheNamesOfAnAddress(t *testing.T) {
	now := time.Unix(1000, 0)
	c := &Cache{Now: func() time.Time { return now }}
	a := netip.MustParseAddr("203.0.113.10")
	c.Record(a, "wanted.test", time.Hour)
	for i := range 1000 {
		c.Record(a, fmt.Sprintf("r%d.wild.test", i), time.Minute+time.Duration(i)*time.Millisecond)
	}
	got := c.Names(a)
	if len(got) != MaxNamesPerAddr {
		t.Fatalf("%d names, want %d", len(got), MaxNamesPerAddr)
	}
	if !slices.Contains(got, "wanted.test") || !slices.Contains(got, "r999.wild.test") || slices.Contains(got, "r0.wild.test") {
		t.Fatalf("kept %v: want the names that expire last", got)
	}
}

func TestCacheBoundsItsAddresses(t *testing.T) {
	now := time.Unix(1000, 0)
	c := &Cache{Now: func() time.Time { return now }}
	addr := func(i int) netip.Addr { return netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}) }
	for i := range MaxAddrs {
		c.Record(addr(i), "short.test", time.Second)
	}
	keep := netip.MustParseAddr("203.0.113.10")
	now = now.Add(time.Minute) // all of them expired
	c.Record(keep, "long.test", time.Hour)
	if n := len(c.m); n != 1 {
		t.Fatalf("%d addresses after the expired went, want 1", n)
	}
	for i := range MaxAddrs + 10 {
		c.Record(addr(i), "long.test", time.Hour)
	}
	if n := len(c.m); n > MaxAddrs {
		t.Fatalf("%d addresses, want at most %d", n, MaxAddrs)
	}
	if got := c.Names(addr(MaxAddrs + 9)); len(got) != 1 {
		t.Fatalf("the last address recorded has names %v", got)
	}
}
