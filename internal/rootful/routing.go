package rootful

import (
	"errors"
	"fmt"
	"net"
	"strings"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/childflow/childflow/internal/netplan"
)

// Policy routing of one slot: TPROXY'd packets are delivered locally
// (mark slotMark|1, table 2*slot), --iface traffic leaves by its
// interface (mark slotMark|2, table 2*slot+1).
const rulePriority = 0xcf0

func tproxyMark(slot int) uint32 { return slotMark(slot) | 1 }
func ifaceMark(slot int) uint32  { return slotMark(slot) | 2 }
func tproxyTable(slot int) int   { return 0xcf0000 + 2*slot }
func ifaceTable(slot int) int    { return 0xcf0000 + 2*slot + 1 }

// undecidedMark is the conntrack mark of a connection conntrack expected
// (installTable), given the slot's mark: the policy has yet to decide it.
func undecidedMark(mark uint32) uint32 { return mark | 4 }

func slotOfTable(table int) (int, bool) {
	if table < 0xcf0000 || table > 0xcf0000+2*maxSlots+1 {
		return 0, false
	}
	return (table - 0xcf0000) / 2, true
}

func ipRule(family int, mark uint32, table int) *netlink.Rule {
	r := netlink.NewRule()
	r.Family = family
	r.Mark = mark
	mask := uint32(0xffffffff)
	r.Mask = &mask
	r.Table = table
	r.Priority = rulePriority
	return r
}

// The routing backstop. The table marks each packet from the sandbox
// that its policy lets out with the slot's mark, and three rules refuse
// to route anything from the sandbox's link without it: marked packets
// skip the refusal to the rules that follow (TPROXY, --iface, then the
// host's own), the rest are refused. Routing rules outlive the ruleset: when the table goes (a
// `flush ruleset`, nftables.service restarted), what the sandbox sends
// is refused, not forwarded unfiltered and unmasqueraded while the table
// is put back. The host's own addresses come first in routing (the local
// table) and are not covered: see keepTable.
const (
	backstopSkip   = rulePriority - 2 // marked: on to rulePriority
	backstopRefuse = rulePriority - 1
)

// slotMask covers the bits of the slot's mark that name the slot; the
// low bits say what the mark asks for (TPROXY, --iface) or, on a
// connection, that the policy has yet to decide it (undecidedMark).
const slotMask = 0xfffffff0

// backstopRules are the slot's rules for one family: the skip, the
// refusal, and the no-op the skip lands on (a goto needs a rule at its
// target's priority).
func backstopRules(family, slot int, hostIf string) []*netlink.Rule {
	rule := func(prio int, action uint8) *netlink.Rule {
		r := netlink.NewRule()
		r.Family, r.Priority, r.IifName, r.Type = family, prio, hostIf, action
		return r
	}
	skip := rule(backstopSkip, unix.FR_ACT_GOTO)
	skip.Mark = slotMark(slot)
	mask := uint32(slotMask)
	skip.Mask = &mask
	skip.Goto = rulePriority
	return []*netlink.Rule{skip, rule(backstopRefuse, unix.FR_ACT_PROHIBIT), rule(rulePriority, unix.FR_ACT_NOP)}
}

// addBackstop adds the slot's backstop; hostIf need not exist yet.
func addBackstop(slot int, hostIf string) error {
	for _, fam := range netplan.Families() {
		// The no-op first, for the skip to land on, the refusal last:
		// a marked packet is never refused.
		rules := backstopRules(fam, slot, hostIf)
		for _, r := range []*netlink.Rule{rules[2], rules[0], rules[1]} {
			if err := netlink.RuleAdd(r); err != nil && !errors.Is(err, unix.EEXIST) {
				return fmt.Errorf("adding ip rule for %s: %w", hostIf, err)
			}
		}
	}
	return nil
}

func isBackstop(r netlink.Rule) bool {
	return strings.HasPrefix(r.IifName, vethPrefix) && r.Table == 0 &&
		(r.Priority == backstopSkip || r.Priority == backstopRefuse || r.Priority == rulePriority)
}

// addTProxyRouting routes packets marked by TPROXY to the local stack,
// with the way back to the sandbox's link (hostIf) for a reverse-path
// check of what it sends, which looks up its source with the mark.
func addTProxyRouting(slot int, hostIf string) error {
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return err
	}
	back, err := netlink.LinkByName(hostIf)
	if err != nil {
		return err
	}
	for _, fam := range netplan.Families() {
		bits := 32
		if fam == netlink.FAMILY_V6 {
			bits = 128
		}
		dst := &net.IPNet{IP: make(net.IP, bits/8), Mask: net.CIDRMask(0, bits)}
		r := &netlink.Route{LinkIndex: lo.Attrs().Index, Dst: dst, Table: tproxyTable(slot), Type: unix.RTN_LOCAL, Scope: netlink.SCOPE_HOST}
		if err := netlink.RouteReplace(r); err != nil {
			return fmt.Errorf("adding local route for TPROXY: %w", err)
		}
		if _, err := copyRoutes(fam, back, tproxyTable(slot)); err != nil {
			return err
		}
		if err := netlink.RuleAdd(ipRule(fam, tproxyMark(slot), tproxyTable(slot))); err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("adding ip rule for TPROXY: %w", err)
		}
	}
	return nil
}

// addIfaceRouting copies the routes of iface into the slot's table, so
// that marked packets leave by it whatever the main table prefers, and
// those of the sandbox's link (hostIf): the way back, for the replies,
// which carry the mark too, and for a reverse-path check of what the
// sandbox sends, which looks up its source with the mark.
func addIfaceRouting(slot int, iface netlink.Link, hostIf string) error {
	back, err := netlink.LinkByName(hostIf)
	if err != nil {
		return err
	}
	for _, fam := range netplan.Families() {
		hasDefault, err := copyRoutes(fam, iface, ifaceTable(slot))
		if err != nil {
			return err
		}
		if _, err := copyRoutes(fam, back, ifaceTable(slot)); err != nil {
			return err
		}
		if !hasDefault {
			// No default route on iface: everything not on one of its
			// subnets is unreachable through it, not leaked elsewhere.
			bits := 32
			if fam == netlink.FAMILY_V6 {
				bits = 128
			}
			r := &netlink.Route{Dst: &net.IPNet{IP: make(net.IP, bits/8), Mask: net.CIDRMask(0, bits)}, Table: ifaceTable(slot), Type: unix.RTN_UNREACHABLE}
			if err := netlink.RouteReplace(r); err != nil {
				return fmt.Errorf("adding unreachable default for --iface: %w", err)
			}
		}
		if err := netlink.RuleAdd(ipRule(fam, ifaceMark(slot), ifaceTable(slot))); err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("adding ip rule for --iface: %w", err)
		}
	}
	return nil
}

// copyRoutes copies link's routes of family fam from the main table into
// table, and says whether one was a default route.
func copyRoutes(fam int, link netlink.Link, table int) (hasDefault bool, err error) {
	routes, err := netlink.RouteListFiltered(fam, &netlink.Route{LinkIndex: link.Attrs().Index, Table: unix.RT_TABLE_MAIN},
		netlink.RT_FILTER_OIF|netlink.RT_FILTER_TABLE)
	if err != nil {
		return false, err
	}
	for _, r := range routes {
		r.Table = table
		if r.Dst == nil || isDefault(r.Dst) {
			hasDefault = true
		}
		if err := netlink.RouteReplace(&r); err != nil {
			return false, fmt.Errorf("copying route %v of %s: %w", r.Dst, link.Attrs().Name, err)
		}
	}
	return hasDefault, nil
}

func isDefault(n *net.IPNet) bool { ones, _ := n.Mask.Size(); return ones == 0 }

// removeRouting deletes the slot's TPROXY and --iface rules and flushes
// their tables.
func removeRouting(slot int) error {
	var errs []error
	for _, fam := range netplan.Families() {
		for _, rt := range []struct {
			mark  uint32
			table int
		}{{tproxyMark(slot), tproxyTable(slot)}, {ifaceMark(slot), ifaceTable(slot)}} {
			if err := netlink.RuleDel(ipRule(fam, rt.mark, rt.table)); err != nil && !errors.Is(err, unix.ENOENT) {
				errs = append(errs, fmt.Errorf("deleting ip rule fwmark %#x: %w", rt.mark, err))
			}
			routes, _ := netlink.RouteListFiltered(fam, &netlink.Route{Table: rt.table}, netlink.RT_FILTER_TABLE)
			for _, r := range routes {
				if err := netlink.RouteDel(&r); err != nil && !errors.Is(err, unix.ESRCH) {
					errs = append(errs, fmt.Errorf("deleting route in table %d: %w", rt.table, err))
				}
			}
		}
	}
	return errors.Join(errs...)
}

// removeBackstop deletes the slot's backstop, the refusal last.
func removeBackstop(slot int, hostIf string) error {
	var errs []error
	for _, fam := range netplan.Families() {
		for _, r := range backstopRules(fam, slot, hostIf) {
			if err := netlink.RuleDel(r); err != nil && !errors.Is(err, unix.ENOENT) {
				errs = append(errs, fmt.Errorf("deleting ip rule iif %s: %w", hostIf, err))
			}
		}
	}
	return errors.Join(errs...)
}

// removeStrayRules removes ip rules of slots and links no live sandbox
// holds.
func removeStrayRules(liveSlots map[int]bool, liveIfs map[string]bool) (int, error) {
	n := 0
	for _, fam := range netplan.Families() {
		rules, err := netlink.RuleList(fam)
		if err != nil {
			return n, err
		}
		for _, r := range rules {
			if isBackstop(r) {
				if !liveIfs[r.IifName] && netlink.RuleDel(&r) == nil {
					n++
				}
				continue
			}
			slot, ok := slotOfTable(r.Table)
			if r.Priority != rulePriority || !ok || liveSlots[slot] {
				continue
			}
			if removeRouting(slot) == nil {
				n++
			}
		}
	}
	return n, nil
}

// addRouting (re)adds every rule and route of the sandbox: the backstop,
// and those of --iface and TPROXY. What exists already stays.
func (sb *Sandbox) addRouting(spec tableSpec) error {
	slot := sb.rec.Slot
	err := addBackstop(slot, sb.HostIf)
	if err == nil && spec.ifMark != 0 {
		err = addIfaceRouting(slot, sb.iface, sb.HostIf)
	}
	if err == nil && spec.tpMark != 0 {
		err = addTProxyRouting(slot, sb.HostIf)
	}
	if err != nil && sb.linkGone() {
		// The sandbox's link goes with its network namespace as the
		// command ends, before Close stops the watch, and its routes
		// with it: nothing is left to route.
		return nil
	}
	return err
}

func (sb *Sandbox) linkGone() bool {
	_, err := netlink.LinkByName(sb.HostIf)
	var notFound netlink.LinkNotFoundError
	return errors.As(err, &notFound)
}
