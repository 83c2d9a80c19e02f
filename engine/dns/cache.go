// Package dns is the engine's resolver: it answers the sandbox's queries,
// applies the name policy, forwards to the upstream resolvers and
// remembers which names resolved to which addresses in this sandbox.
package dns

import (
	"net/netip"
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
	latest map[netip.Addr]string // the name last asked for that resolved to the address
	Now    func() time.Time      // nil: time.Now
}

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
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil {
		c.m = make(map[netip.Addr]map[string]time.Time)
	}
	names := c.m[addr]
	if names == nil {
		names = make(map[string]time.Time)
		c.m[addr] = names
	}
	exp := c.now().Add(ttl)
	if exp.After(names[name]) {
		names[name] = exp
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
	var out []string
	for n, exp := range c.m[addr] {
		if now.Before(exp) {
			out = append(out, n)
		} else {
			delete(c.m[addr], n)
		}
	}
	if len(c.m[addr]) == 0 {
		delete(c.m, addr)
	}
	sort.Strings(out)
	return out
}

// TTL is how long the longest-lived name of addr stays known.
func (c *Cache) TTL(addr netip.Addr) time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	var ttl time.Duration
	now := c.now()
	for _, exp := range c.m[addr.Unmap()] {
		ttl = max(ttl, exp.Sub(now))
	}
	return ttl
}
