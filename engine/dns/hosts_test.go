package dns

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestParseHosts(t *testing.T) {
	var b strings.Builder
	b.WriteString(`# a comment
127.0.0.1	localhost
::1 localhost ip6-localhost
0.0.0.0 blocked.test
203.0.113.10 Web.Pinned.Test. web   # aliases, a trailing comment
::ffff:203.0.113.11 mapped.test
fe80::1%eth0 zoned.test
2001:db8::10 v6.test
203.0.113.10 again.test web
not-an-address name.test
203.0.113.12
203.0.113.13   
203.0.113.30	tab.test	alias.test
203.0.113.31 	crlf.test` + "\r\n")
	// A line longer than the reader's buffer is skipped, not its next.
	b.WriteString("203.0.113.40 " + strings.Repeat("x", 70000) + "\n203.0.113.41 after-long.test\n")
	for i := range MaxNamesPerAddr + 5 {
		fmt.Fprintf(&b, "203.0.113.20 n%d.test\n", i)
	}
	got := ParseHosts(strings.NewReader(b.String()))
	want := map[string][]string{
		"203.0.113.10": {"web.pinned.test", "web", "again.test"},
		"203.0.113.11": {"mapped.test"},
		"2001:db8::10": {"v6.test"},
		"203.0.113.30": {"tab.test", "alias.test"},
		"203.0.113.31": {"crlf.test"},
		"203.0.113.41": {"after-long.test"},
	}
	for a, names := range want {
		if !slices.Equal(got[netip.MustParseAddr(a)], names) {
			t.Errorf("%s: %v, want %v", a, got[netip.MustParseAddr(a)], names)
		}
	}
	if n := len(got[netip.MustParseAddr("203.0.113.20")]); n != MaxNamesPerAddr {
		t.Errorf("an address with %d names kept %d, want %d", MaxNamesPerAddr+5, n, MaxNamesPerAddr)
	}
	if len(got) != len(want)+1 {
		t.Errorf("kept %v: loopback, unspecified, zoned and nameless lines must go", got)
	}
}

func TestPinnedNamesNeverExpire(t *testing.T) {
	now := time.Unix(1000, 0)
	c := &Cache{Now: func() time.Time { return now }}
	a := netip.MustParseAddr("203.0.113.10")
	c.Pin(map[netip.Addr][]string{a: {"pinned.test"}})
	c.Record(a, "asked.test", 10*time.Second)
	c.RecordQuery(a, "asked.test")
	if got := c.Names(a); !slices.Equal(got, []string{"asked.test", "pinned.test"}) {
		t.Fatalf("names %v", got)
	}
	now = now.Add(24 * time.Hour)
	if got := c.Names(a); !slices.Equal(got, []string{"pinned.test"}) {
		t.Fatalf("a day later: %v, want the pinned name only", got)
	}
	if c.TTL(a) != Forever || !slices.Contains(c.Addrs(), a) {
		t.Fatalf("TTL %v, addresses %v: a pinned address is known for good", c.TTL(a), c.Addrs())
	}
	// A proxy told the name would resolve it itself.
	if h := c.Hostname(a); h != "" {
		t.Fatalf("Hostname %q, want none for a pinned name", h)
	}
}
