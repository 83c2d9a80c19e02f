package rootful

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
	"syscall"
	"time"

	"github.com/google/nftables"

	"github.com/childflow/childflow/engine/dns"
	"github.com/childflow/childflow/policy"
)

// serveDNS answers DNS over UDP and TCP on both gateway addresses; the
// table redirects the sandbox's DNS to any address here.
func (sb *Sandbox) serveDNS() error {
	for _, gw := range []netip.Addr{sb.Plan.Gateway4, sb.Plan.Gateway6} {
		addr := netip.AddrPortFrom(gw, 53).String()
		pc, err := net.ListenPacket("udp", addr)
		if err != nil {
			return err
		}
		sb.closers = append(sb.closers, pc)
		ln, err := net.Listen("tcp", addr)
		if err != nil {
			return err
		}
		sb.closers = append(sb.closers, ln)
		sb.spawn(func() { sb.serveUDP(pc) })
		sb.spawn(func() { sb.serveConns(ln, func(c net.Conn) { dns.ServeTCP(sb.ctx, sb.resolver, c) }) })
	}
	return nil
}

// serveUDP runs inside the WaitGroup, so each answer may join it: the
// sandbox's end waits for the queries in flight and their dns_answer.
func (sb *Sandbox) serveUDP(pc net.PacketConn) {
	dns.ServeUDP(sb.ctx, sb.resolver, pc, sb.dnsSlots, sb.spawn, func() {
		sb.events.FailureOnce("dns", fmt.Sprintf("%d DNS queries wait for the upstream resolvers, the limit: more are dropped", cap(sb.dnsSlots)))
	})
}

// onAnswer puts the addresses that domain rules decide into the table's
// sets before the answer reaches the sandbox.
func (sb *Sandbox) onAnswer(q *dns.Query) {
	for _, a := range q.Answers {
		if strings.HasPrefix(a, "CNAME ") {
			continue
		}
		if addr, err := netip.ParseAddr(a); err == nil {
			if err := sb.addToDomainSet(addr); err != nil {
				q.Err = err
			}
		}
	}
}

// addToDomainSet puts addr in the set of the domain rule that decides
// it, for as long as the cache knows its names.
func (sb *Sandbox) addToDomainSet(addr netip.Addr) error {
	d := sb.cfg.Policy.Decide(policy.Flow{Dst: netip.AddrPortFrom(addr, 0), Names: sb.cache.Names(addr)})
	var set string
	switch d.Reason {
	case policy.ReasonDenyDomain, policy.ReasonDenyDomainExact:
		set = setDomDeny
	case policy.ReasonAllowDomain, policy.ReasonAllowDomExact:
		set = setDomAllow
	default:
		return nil // decided by the static rules
	}
	err := sb.sets.add(set, addr, sb.cache.TTL(addr))
	if errors.Is(err, errSetFull) {
		sb.events.FailureOnce("sets", err.Error()+"; addresses of names the domain rules decide are not added until some expire")
	}
	return err
}

// domainSetSize bounds each domain set, as dns.MaxAddrs bounds the names
// cache. A full set takes no more addresses: an allowed name's is then
// refused by the default, and a denied one's is never resolved anyway.
const domainSetSize = dns.MaxAddrs

var errSetFull = errors.New("full")

// domainSets updates the timeout sets of one table.
type domainSets struct{ table string }

// add puts addr in the set for ttl (dns.Forever: for good), replacing an element already there
// so that its timeout restarts.
func (d *domainSets) add(name string, addr netip.Addr, ttl time.Duration) error {
	addr = addr.Unmap()
	typ, suffix := nftables.TypeIPAddr, "4"
	if addr.Is6() {
		typ, suffix = nftables.TypeIP6Addr, "6"
	}
	if ttl == dns.Forever {
		ttl = 0 // no timeout
	} else {
		ttl = max(ttl, dns.MinTTL).Truncate(time.Millisecond)
	}
	c, err := nftables.New()
	if err != nil {
		return err
	}
	set := &nftables.Set{Table: &nftables.Table{Family: nftables.TableFamilyINet, Name: d.table}, Name: name + suffix, KeyType: typ, HasTimeout: true}
	el := []nftables.SetElement{{Key: addr.AsSlice(), Timeout: ttl}}
	// Add (a no-op if present), delete, add: one transaction, fresh timeout.
	if err := c.SetAddElements(set, el); err != nil {
		return err
	}
	if err := c.SetDeleteElements(set, el); err != nil {
		return err
	}
	if err := c.SetAddElements(set, el); err != nil {
		return err
	}
	if err := c.Flush(); errors.Is(err, syscall.ENFILE) {
		return fmt.Errorf("nftables set %s is %w: it holds %d addresses, its limit", set.Name, errSetFull, domainSetSize)
	} else if err != nil {
		return err
	}
	return nil
}
