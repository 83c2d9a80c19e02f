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
	"github.com/childflow/childflow/internal/nftexpr"
	"github.com/childflow/childflow/policy"
)

// serveDNS answers DNS over UDP and TCP on both gateway addresses; the
// table redirects the sandbox's DNS to any address here.
func (sb *Sandbox) serveDNS() error {
	for _, gw := range sb.Plan.Gateways() {
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
	e, ok := sb.domainElement(addr)
	if !ok {
		return nil // decided by the static rules
	}
	err := sb.sets.add(e)
	if errors.Is(err, errSetFull) {
		sb.events.FailureOnce("sets", err.Error()+"; addresses of names the domain rules decide are not added until some expire")
	}
	return err
}

// domainElement is an address a domain rule decides, in that rule's set
// for as long as the names cache knows its names.
type domainElement struct {
	set  string // setDomDeny or setDomAllow
	addr netip.Addr
	ttl  time.Duration // dns.Forever: for good
}

// domainElement says which domain set addr belongs in, if any.
func (sb *Sandbox) domainElement(addr netip.Addr) (domainElement, bool) {
	d := sb.cfg.Policy.Decide(policy.Flow{Dst: netip.AddrPortFrom(addr, 0), Names: sb.cache.Names(addr)})
	e := domainElement{addr: addr.Unmap(), ttl: sb.cache.TTL(addr)}
	switch d.Reason {
	case policy.ReasonDenyDomain, policy.ReasonDenyDomainExact:
		e.set = setDomDeny
	case policy.ReasonAllowDomain, policy.ReasonAllowDomExact:
		e.set = setDomAllow
	default:
		return e, false
	}
	return e, true
}

// domainElements are those of every address the names cache holds, for
// a table installed while the sandbox runs: its sets hold them from the
// start, as a deny-domain set filled after its rules would let those
// addresses through meanwhile.
func (sb *Sandbox) domainElements() []domainElement {
	var out []domainElement
	for _, addr := range sb.cache.Addrs() {
		if e, ok := sb.domainElement(addr); ok {
			out = append(out, e)
		}
	}
	return out
}

// family is the name and key type of the set that holds e.
func (e domainElement) family() (string, nftables.SetDatatype) {
	return familySet(e.set, e.addr.Is6())
}

// element is e as its set holds it: a timeout of zero is none.
func (e domainElement) element() nftables.SetElement {
	ttl := time.Duration(0) // no timeout
	if e.ttl != dns.Forever {
		ttl = max(e.ttl, dns.MinTTL).Truncate(time.Millisecond)
	}
	return nftables.SetElement{Key: e.addr.AsSlice(), Timeout: ttl}
}

// domainSetSize bounds each domain set, as dns.MaxAddrs bounds the names
// cache. A full set takes no more addresses: an allowed name's is then
// refused by the default, and a denied one's is never resolved anyway.
const domainSetSize = dns.MaxAddrs

var errSetFull = errors.New("full")

// domainSets updates the timeout sets of one table.
type domainSets struct{ table string }

// add puts e in its set, replacing an element already there so that
// its timeout restarts.
func (d *domainSets) add(e domainElement) error {
	name, typ := e.family()
	c, err := nftables.New()
	if err != nil {
		return err
	}
	set := &nftables.Set{Table: &nftables.Table{Family: nftables.TableFamilyINet, Name: d.table}, Name: name, KeyType: typ, HasTimeout: true}
	el := []nftables.SetElement{e.element()}
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
	if err := nftexpr.Flush(c); errors.Is(err, syscall.ENFILE) {
		return fmt.Errorf("nftables set %s is %w: it holds %d addresses, its limit", set.Name, errSetFull, domainSetSize)
	} else if err != nil {
		return err
	}
	return nil
}
