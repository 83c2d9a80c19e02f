package steer

import (
	"fmt"
	"net/netip"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"

	"github.com/childflow/childflow/internal/nftexpr"
)

// HostGuardTable names the host-side table that guards one pod's veth.
func HostGuardTable(id string) string {
	if len(id) > 12 {
		id = id[:12]
	}
	return "childflow-" + id
}

// InstallHostGuard, run in the host's namespace, filters what arrives from
// a sandboxed pod's veth (hostIf): replies to connections the pod
// accepted, new connections to keep, and neighbour discovery pass;
// anything else is dropped. Rules inside the pod cannot stop a process
// with CAP_NET_RAW writing frames to its end of the veth; these can.
func InstallHostGuard(table, hostIf string, keep []netip.Prefix) error {
	c, err := nftables.New()
	if err != nil {
		return err
	}
	t := c.AddTable(&nftables.Table{Family: nftables.TableFamilyINet, Name: table})
	accept := &expr.Verdict{Kind: expr.VerdictAccept}
	fromPod := []expr.Any{
		&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: nftexpr.IfNameBytes(hostIf)},
	}
	with := func(more ...expr.Any) []expr.Any { return append(append([]expr.Any{}, fromPod...), more...) }
	// Before the host's own filters (priority filter - 10): a drop here is final.
	prio := nftables.ChainPriorityRef(-10)
	for _, hook := range []*nftables.ChainHook{nftables.ChainHookForward, nftables.ChainHookInput} {
		ch := c.AddChain(&nftables.Chain{Name: map[bool]string{true: "forward", false: "input"}[hook == nftables.ChainHookForward],
			Table: t, Type: nftables.ChainTypeFilter, Hooknum: hook, Priority: prio})
		c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: with(append(nftexpr.Established(), accept)...)})
		c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: with(append(nftexpr.NeighbourDiscovery(), accept)...)})
		for _, k := range keep {
			c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: with(append(nftexpr.DaddrIn(k), accept)...)})
		}
		c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: with(&expr.Verdict{Kind: expr.VerdictDrop})})
	}
	if err := c.Flush(); err != nil {
		return fmt.Errorf("guarding %s on the host: %w", hostIf, err)
	}
	return nil
}

// RemoveHostGuard deletes the table; a missing one is fine.
func RemoveHostGuard(table string) {
	if c, err := nftables.New(); err == nil {
		c.DelTable(&nftables.Table{Family: nftables.TableFamilyINet, Name: table})
		c.Flush()
	}
}

// HostGuards lists the guard tables on the host (for GC).
func HostGuards() ([]string, error) {
	c, err := nftables.New()
	if err != nil {
		return nil, err
	}
	tables, err := c.ListTablesOfFamily(nftables.TableFamilyINet)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, t := range tables {
		// Exactly "childflow-" and a 12-character id: rootful tables
		// (childflow-root-*, childflow-rootguard) are not guards.
		if len(t.Name) == len("childflow-")+12 && strings.HasPrefix(t.Name, "childflow-") && !strings.HasPrefix(t.Name, "childflow-root") {
			out = append(out, t.Name)
		}
	}
	return out, nil
}
