package rootful

import (
	"bytes"
	"fmt"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
)

// ForwardDrops names the host's base chains at the forward hook whose
// policy drops what no rule accepts (Docker and ufw set iptables'
// FORWARD so) in tables with no rule about childflow's links (cfr*).
// An accept in childflow's table does not stop another table's drop:
// there the sandbox reaches nothing beyond the host, and the user had
// better hear why.
func ForwardDrops() []string {
	c, err := nftables.New()
	if err != nil {
		return nil
	}
	chains, err := c.ListChains()
	if err != nil {
		return nil
	}
	var out []string
	for _, ch := range chains {
		if ch.Hooknum == nil || *ch.Hooknum != *nftables.ChainHookForward || ch.Policy == nil || *ch.Policy != nftables.ChainPolicyDrop ||
			strings.HasPrefix(ch.Table.Name, "childflow") || mentionsOurLinks(c, ch.Table, chains) {
			continue
		}
		out = append(out, fmt.Sprintf("%s %s %s", familyName(ch.Table.Family), ch.Table.Name, ch.Name))
	}
	return out
}

// mentionsOurLinks says whether a rule of t compares an interface name
// with childflow's prefix (iptables' -i cfr+, nft's iifname "cfr*").
func mentionsOurLinks(c *nftables.Conn, t *nftables.Table, chains []*nftables.Chain) bool {
	for _, ch := range chains {
		if ch.Table.Name != t.Name || ch.Table.Family != t.Family {
			continue
		}
		rules, err := c.GetRules(t, ch)
		if err != nil {
			continue
		}
		for _, r := range rules {
			for _, e := range r.Exprs {
				if cmp, ok := e.(*expr.Cmp); ok && bytes.HasPrefix(cmp.Data, []byte(vethPrefix)) {
					return true
				}
			}
		}
	}
	return false
}

func familyName(f nftables.TableFamily) string {
	switch f {
	case nftables.TableFamilyIPv4:
		return "ip"
	case nftables.TableFamilyIPv6:
		return "ip6"
	case nftables.TableFamilyINet:
		return "inet"
	}
	return fmt.Sprint(f)
}
