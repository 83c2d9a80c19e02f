package dns

import (
	"net/netip"
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
