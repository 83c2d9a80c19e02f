// Package dns is the engine's resolver: it answers the sandbox's queries,
// applies the name policy, forwards to the upstream resolvers and
// remembers which names resolved to which addresses in this sandbox.
package dns

import (
	"net/netip"
	"slices"
	"sort"
	"sync"
	"time"
)

// MinTTL keeps a TTL-0 answer usable for the connection that asked for it.
const MinTTL = 5 * time.Second

// Cache maps addresses to the names that resolved to them in one sandbox,
// each until its answer's TTL runs out.
type Cache struct {
	mu     sync.Mutex
	m      map[netip.Addr]map[string]time.Time
	latest map[netip.Addr]string   // the name last asked for that resolved to the address
	pinned map[netip.Addr][]string // the sandbox's hosts file: never expire
	swept  time.Time               // when expired addresses last went
	Now    func() time.Time        // nil: time.Now
}

// A sandbox asking for endless names (random labels under a wildcard
// domain) would grow the cache without end, and make every flow to their
// address carry all of them in the flow log. The names of an address
// and the addresses are bounded; what goes is what expires first, so a
// flow finds the names asked for last. Dropping a name only takes an
// allowance away (a denied name is never answered, so never here).
const (
	MaxNamesPerAddr = 32
	MaxAddrs        = 1 << 16
)

func (c *Cache) now() time.Time {
	if c.Now != nil {
		return c.Now()
	}
	return time.Now()
}

// Record remembers that name resolved to addr for ttl.
func (c *Cache) Record(addr netip.Addr, name string, ttl time.Duration) {
	ttl = max(ttl, MinTTL)
	addr = addr.Unmap()
	now := c.now()
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil {
		c.m = make(map[netip.Addr]map[string]time.Time)
	}
	names := c.m[addr]
	if names == nil {
		if len(c.m) >= MaxAddrs {
			c.evictAddrLocked(now)
		}
		names = make(map[string]time.Time)
		c.m[addr] = names
	}
	if _, known := names[name]; !known && len(names) >= MaxNamesPerAddr {
		evictName(names, now)
	}
	exp := now.Add(ttl)
	if exp.After(names[name]) {
		names[name] = exp
	}
}

// evictName makes room for one name: the expired go, or else the one
// that expires first.
func evictName(names map[string]time.Time, now time.Time) {
	var first string
	var firstExp time.Time
	for n, exp := range names {
		if !now.Before(exp) {
			delete(names, n)
		} else if first == "" || exp.Before(firstExp) {
			first, firstExp = n, exp
		}
	}
	if len(names) >= MaxNamesPerAddr {
		delete(names, first)
	}
}

// evictAddrLocked makes room for one address: those whose names all
// expired go (looked for at most once per MinTTL, the scan being long),
// or else any one.
func (c *Cache) evictAddrLocked(now time.Time) {
	if now.Sub(c.swept) >= MinTTL {
		c.swept = now
		for a, names := range c.m {
			if expired(names, now) {
				c.dropLocked(a)
			}
		}
	}
	for a := range c.m {
		if len(c.m) < MaxAddrs {
			return
		}
		c.dropLocked(a)
	}
}

func expired(names map[string]time.Time, now time.Time) bool {
	for _, exp := range names {
		if now.Before(exp) {
			return false
		}
	}
	return true
}

func (c *Cache) dropLocked(a netip.Addr) {
	delete(c.m, a)
	delete(c.latest, a)
}

// Forever is the TTL of a pinned name.
const Forever = time.Duration(1<<63 - 1)

// Pin remembers names for addr for the sandbox's life: what its hosts
// file says, which it reads without asking the engine. Hostname never
// returns them: a proxy told the name would resolve it, not read the
// sandbox's hosts file.
func (c *Cache) Pin(hosts map[netip.Addr][]string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.pinned == nil {
		c.pinned = make(map[netip.Addr][]string)
	}
	for addr, names := range hosts {
		c.pinned[addr.Unmap()] = append(c.pinned[addr.Unmap()], names...)
	}
}

// RecordQuery notes that the sandbox asked for name and got addr: the name
// a forced proxy is told.
func (c *Cache) RecordQuery(addr netip.Addr, name string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.latest == nil {
		c.latest = make(map[netip.Addr]string)
	}
	c.latest[addr.Unmap()] = name
}

// Hostname is the name the sandbox last asked for that resolved to addr,
// if that answer has not expired.
func (c *Cache) Hostname(addr netip.Addr) string {
	addr = addr.Unmap()
	c.mu.Lock()
	name := c.latest[addr]
	exp, ok := c.m[addr][name]
	c.mu.Unlock()
	if !ok || !c.now().Before(exp) {
		return ""
	}
	return name
}

// Names returns the unexpired names for addr, sorted.
func (c *Cache) Names(addr netip.Addr) []string {
	addr = addr.Unmap()
	now := c.now()
	c.mu.Lock()
	defer c.mu.Unlock()
	out := slices.Clone(c.pinned[addr])
	for n, exp := range c.m[addr] {
		if !now.Before(exp) {
			delete(c.m[addr], n)
		} else if !slices.Contains(out, n) {
			out = append(out, n)
		}
	}
	if len(c.m[addr]) == 0 {
		c.dropLocked(addr)
	}
	sort.Strings(out)
	return slices.Compact(out)
}

// Addrs returns the addresses some unexpired name resolved to, and those
// pinned.
func (c *Cache) Addrs() []netip.Addr {
	now := c.now()
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []netip.Addr
	for a, names := range c.m {
		if _, pinned := c.pinned[a]; !pinned && !expired(names, now) {
			out = append(out, a)
		}
	}
	for a := range c.pinned {
		out = append(out, a)
	}
	return out
}

// TTL is how long the longest-lived name of addr stays known.
func (c *Cache) TTL(addr netip.Addr) time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	if _, pinned := c.pinned[addr.Unmap()]; pinned {
		return Forever
	}
	var ttl time.Duration
	now := c.now()
	for _, exp := range c.m[addr.Unmap()] {
		ttl = max(ttl, exp.Sub(now))
	}
	return ttl
}
