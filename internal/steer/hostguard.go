package steer

import (
	"fmt"
	"net/netip"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
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
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: ifname(hostIf)},
	}
	with := func(more ...expr.Any) []expr.Any { return append(append([]expr.Any{}, fromPod...), more...) }
	// Before the host's own filters (priority filter - 10): a drop here is final.
	prio := nftables.ChainPriorityRef(-10)
	for _, hook := range []*nftables.ChainHook{nftables.ChainHookForward, nftables.ChainHookInput} {
		ch := c.AddChain(&nftables.Chain{Name: map[bool]string{true: "forward", false: "input"}[hook == nftables.ChainHookForward],
			Table: t, Type: nftables.ChainTypeFilter, Hooknum: hook, Priority: prio})
		established := binaryutil.NativeEndian.PutUint32(expr.CtStateBitESTABLISHED | expr.CtStateBitRELATED)
		c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: with(
			&expr.Ct{Key: expr.CtKeySTATE, Register: 1},
			&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: established, Xor: make([]byte, 4)},
			&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: make([]byte, 4)},
			accept,
		)})
		c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: with(
			&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_ICMPV6}},
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: 1},
			&expr.Range{Op: expr.CmpOpEq, Register: 1, FromData: []byte{133}, ToData: []byte{136}},
			accept,
		)})
		for _, k := range keep {
			c.AddRule(&nftables.Rule{Table: t, Chain: ch, Exprs: with(append(daddrIn(k), accept)...)})
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
