// Package steer shares a network namespace that already has an interface
// (docker's bridge, a CNI veth) with childflow's TUN: every new outbound
// connection leaves through the TUN and the policy, while replies to
// connections that came in on the other interfaces leave the way they
// came. It must run on a thread inside that namespace.
//
// The other interfaces' routes move from the main table to a table of
// their own, used only by packets of inbound connections (conntrack mark
// -> packet mark -> ip rule). An nftables table drops anything else that
// would leave on them, so a process that binds to them gets nothing.
package steer

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sort"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/childflow/childflow/internal/netplan"
	"github.com/childflow/childflow/internal/nftexpr"
)

const (
	// RouteTable holds the moved routes; Mark selects it.
	RouteTable = 87
	Mark       = 0x87
	// routeProto marks the routes Install adds, so Remove finds them.
	routeProto = 87
	rulePrio   = 100
	nftTable   = "childflow"
)

// Needed reports whether the namespace routes anything through an
// interface other than lo and tunName.
func Needed(tunName string) (bool, error) {
	routes, err := movable(tunName)
	return len(routes) > 0, err
}

// movable lists the main table's routes on other interfaces, except
// IPv6 link-local and multicast ones, which never leave the link.
func movable(tunName string) ([]netlink.Route, error) {
	links, err := netlink.LinkList()
	if err != nil {
		return nil, fmt.Errorf("listing links: %w", err)
	}
	keep := map[int]bool{}
	for _, l := range links {
		if n := l.Attrs().Name; n == "lo" || n == tunName {
			keep[l.Attrs().Index] = true
		}
	}
	routes, err := netlink.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TABLE)
	if err != nil {
		return nil, fmt.Errorf("listing routes: %w", err)
	}
	var out []netlink.Route
	for _, r := range routes {
		if keep[r.LinkIndex] || r.Type != unix.RTN_UNICAST {
			continue
		}
		if r.Dst != nil && (r.Dst.IP.IsLinkLocalUnicast() || r.Dst.IP.IsMulticast()) && r.Dst.IP.To4() == nil {
			continue
		}
		out = append(out, r)
	}
	return out, nil
}

// Config says how to share a namespace.
type Config struct {
	TUN string
	// Keep are destinations (a cluster's pod and service ranges) that stay
	// on the other interfaces, through the default gateway they had.
	Keep []netip.Prefix
	// DNS are the engine's resolver addresses: DNS to any address (a
	// cluster resolver in Keep included) is sent there, so domain rules
	// see every answer and no resolver but the engine's is reachable.
	DNS []netip.Addr
}

// Install moves the routes, adds the rules and the nftables table.
// netns is an fd of the namespace the thread is in. On error it undoes
// what it did.
func Install(netns int, cfg Config) (err error) {
	tunName, keep := cfg.TUN, cfg.Keep
	routes, err := movable(tunName)
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			Remove(netns)
		}
	}()
	if err := addRules(); err != nil {
		return err
	}
	if err := installTable(netns, cfg); err != nil {
		return fmt.Errorf("nftables: %w", err)
	}
	return moveRoutes(routes, keep)
}

// Extend steers interfaces added to a namespace since Install (or since
// the TUN was set up alone in it): their routes move as Install moves
// the first ones', and a namespace that had only the TUN gets the rules
// and the table. On error the routes not yet moved stay in the main
// table, where the table drops what would leave by them.
func Extend(netns int, cfg Config) error {
	c, err := nftables.New(nftables.WithNetNSFd(netns))
	if err != nil {
		return err
	}
	if t, err := c.ListTableOfFamily(nftTable, nftables.TableFamilyINet); err != nil || t == nil {
		return Install(netns, cfg)
	}
	routes, err := movable(cfg.TUN)
	if err != nil {
		return err
	}
	return moveRoutes(routes, cfg.Keep)
}

// moveRoutes moves routes from the main table to RouteTable; a kept
// range is routed on through the default gateway it had.
func moveRoutes(routes []netlink.Route, keep []netip.Prefix) error {
	linkRoutesFirst(routes)
	var defaults []netlink.Route
	for _, r := range routes {
		moved := r
		moved.Table = RouteTable
		moved.Flags = 0 // state flags such as linkdown are not accepted back
		if err := netlink.RouteReplace(&moved); err != nil {
			return fmt.Errorf("moving route %s to table %d: %w", r, RouteTable, err)
		}
		if r.Dst == nil || isDefault(r.Dst) {
			defaults = append(defaults, r)
		} else if inAny(r.Dst, keep) {
			continue // a kept range's own link route stays in main too
		}
		if err := netlink.RouteDel(&r); err != nil && !errors.Is(err, unix.ESRCH) {
			return fmt.Errorf("removing route %s from the main table: %w", r, err)
		}
	}
	for _, k := range keep {
		for _, d := range defaults {
			if (d.Family == netlink.FAMILY_V4) != k.Addr().Is4() {
				continue
			}
			r := d
			r.Flags = 0
			r.Protocol = routeProto
			r.Dst = &net.IPNet{IP: k.Addr().AsSlice(), Mask: net.CIDRMask(k.Bits(), k.Addr().BitLen())}
			r.Table = unix.RT_TABLE_MAIN
			if err := netlink.RouteReplace(&r); err != nil {
				return fmt.Errorf("routing kept range %s via %s: %w", k, d.Gw, err)
			}
			break
		}
	}
	return nil
}

// linkRoutesFirst orders routes so that a gateway is reachable in the
// table by the time a route through it is added.
func linkRoutesFirst(routes []netlink.Route) {
	sort.SliceStable(routes, func(i, j int) bool { return routes[i].Gw == nil && routes[j].Gw != nil })
}

func isDefault(n *net.IPNet) bool { ones, _ := n.Mask.Size(); return ones == 0 }

// inAny reports whether n lies inside one of keep.
func inAny(n *net.IPNet, keep []netip.Prefix) bool {
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return false
	}
	ones, _ := n.Mask.Size()
	for _, k := range keep {
		if k.Bits() <= ones && k.Contains(a.Unmap()) {
			return true
		}
	}
	return false
}

// Remove puts the routes back and deletes the rules and the table.
// Missing pieces are fine: it also cleans up after a failed Install.
func Remove(netns int) error {
	var errs []error
	routes, err := netlink.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{Table: RouteTable}, netlink.RT_FILTER_TABLE)
	if err == nil {
		linkRoutesFirst(routes)
		for _, r := range routes {
			back := r
			back.Table = unix.RT_TABLE_MAIN
			back.Flags = 0
			if err := netlink.RouteReplace(&back); err != nil {
				errs = append(errs, fmt.Errorf("restoring route %s: %w", r, err))
			}
			netlink.RouteDel(&r)
		}
	}
	if added, err := netlink.RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{Table: unix.RT_TABLE_MAIN, Protocol: routeProto},
		netlink.RT_FILTER_TABLE|netlink.RT_FILTER_PROTOCOL); err == nil {
		for _, r := range added {
			netlink.RouteDel(&r)
		}
	}
	for _, family := range netplan.Families() {
		for netlink.RuleDel(rule(family)) == nil {
		}
	}
	if c, err := nftables.New(nftables.WithNetNSFd(netns)); err == nil {
		c.DelTable(&nftables.Table{Family: nftables.TableFamilyINet, Name: nftTable})
		nftexpr.Flush(c) // ENOENT when there was none
	}
	return errors.Join(errs...)
}

func rule(family int) *netlink.Rule {
	r := netlink.NewRule()
	r.Family = family
	r.Mark = Mark
	mask := uint32(0xffffffff)
	r.Mask = &mask
	r.Table = RouteTable
	r.Priority = rulePrio
	return r
}

func addRules() error {
	for _, family := range netplan.Families() {
		if err := netlink.RuleAdd(rule(family)); err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("adding ip rule fwmark %#x lookup %d: %w", Mark, RouteTable, err)
		}
	}
	return nil
}

// installTable creates, in one transaction:
//
//	table inet childflow {
//	  chain inbound { type filter hook prerouting priority mangle
//	    iifname != "lo" iifname != TUN ct state new ct mark set 0x87 }
//	  chain reroute { type route hook output priority mangle
//	    ct mark 0x87 meta mark set 0x87 }
//	  chain egress { type filter hook postrouting priority filter
//	    oifname "lo" accept; oifname TUN accept; ct mark 0x87 accept
//	    icmpv6 type 133-136 accept (neighbour discovery)
//	    ip[6] daddr KEEP accept (one rule per kept range); drop }
//	  chain dns { type nat hook output priority dstnat
//	    oifname != "lo" udp/tcp dport 53 dnat to the engine's resolver }
//	}
func installTable(netns int, cfg Config) error {
	tunName, keep := cfg.TUN, cfg.Keep
	c, err := nftables.New(nftables.WithNetNSFd(netns))
	if err != nil {
		return err
	}
	t := c.AddTable(&nftables.Table{Family: nftables.TableFamilyINet, Name: nftTable})
	inbound := c.AddChain(&nftables.Chain{Name: "inbound", Table: t, Type: nftables.ChainTypeFilter, Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityMangle})
	reroute := c.AddChain(&nftables.Chain{Name: "reroute", Table: t, Type: nftables.ChainTypeRoute, Hooknum: nftables.ChainHookOutput, Priority: nftables.ChainPriorityMangle})
	// Postrouting, not output: there the interface is the one a packet
	// really leaves by, after the DNS redirect below rerouted it.
	egress := c.AddChain(&nftables.Chain{Name: "egress", Table: t, Type: nftables.ChainTypeFilter, Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityFilter})
	accept := &expr.Verdict{Kind: expr.VerdictAccept}

	c.AddRule(&nftables.Rule{Table: t, Chain: inbound, Exprs: nftexpr.Cat([]expr.Any{
		&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: nftexpr.IfNameBytes("lo")},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: nftexpr.IfNameBytes(tunName)},
	}, nftexpr.CtStateNew(), nftexpr.SetCtMark(Mark))})
	c.AddRule(&nftables.Rule{Table: t, Chain: reroute, Exprs: nftexpr.Cat(nftexpr.CtMarkIs(Mark), nftexpr.SetMark(Mark))})
	for _, name := range []string{"lo", tunName} {
		c.AddRule(&nftables.Rule{Table: t, Chain: egress, Exprs: []expr.Any{
			&expr.Meta{Key: expr.MetaKeyOIFNAME, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: nftexpr.IfNameBytes(name)},
			accept,
		}})
	}
	c.AddRule(&nftables.Rule{Table: t, Chain: egress, Exprs: nftexpr.Cat(nftexpr.CtMarkIs(Mark), []expr.Any{accept})})
	c.AddRule(&nftables.Rule{Table: t, Chain: egress, Exprs: nftexpr.Cat(nftexpr.NeighbourDiscovery(), []expr.Any{accept})})
	for _, k := range keep {
		c.AddRule(&nftables.Rule{Table: t, Chain: egress, Exprs: append(nftexpr.DaddrIn(k), accept)})
	}
	c.AddRule(&nftables.Rule{Table: t, Chain: egress, Exprs: []expr.Any{&expr.Verdict{Kind: expr.VerdictDrop}}})
	if len(cfg.DNS) > 0 {
		dns := c.AddChain(&nftables.Chain{Name: "dns", Table: t, Type: nftables.ChainTypeNAT, Hooknum: nftables.ChainHookOutput, Priority: nftables.ChainPriorityNATDest})
		for _, to := range cfg.DNS {
			for _, proto := range []byte{unix.IPPROTO_UDP, unix.IPPROTO_TCP} {
				c.AddRule(&nftables.Rule{Table: t, Chain: dns, Exprs: nftexpr.Cat(nftexpr.IfName(expr.MetaKeyOIFNAME, "lo", false), nftexpr.DNSTo(to, proto))})
			}
		}
	}
	return nftexpr.Flush(c)
}
