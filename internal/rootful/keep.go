package rootful

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"

	"github.com/google/nftables"

	"github.com/childflow/childflow/internal/nftwatch"
)

// keepTable puts the sandbox's table back whenever it goes while the
// sandbox runs: a `flush ruleset` (nftables.service's restart, an
// admin's script) deletes every table, childflow's too. Until it is
// back, the routing backstop (routing.go) refuses what the sandbox sends
// beyond the host; what routing delivers to the host's own addresses
// comes before any rule and gets through for those milliseconds, but a
// connection opened then never passes as established once the table is
// back (its conntrack entry lacks the slot's mark): the policy decides
// each of its packets. The forwarding guard, shared by the rootful
// sandboxes, is put back the same way.
func (sb *Sandbox) keepTable(spec tableSpec) error {
	w, err := nftwatch.New()
	if err != nil {
		return err
	}
	sb.spawn(func() {
		if err := w.Run(sb.ctx, func() { sb.restoreTables(spec) }); err != nil {
			sb.warn(err.Error() + ": a deleted table is no longer put back; the routing backstop still refuses what the sandbox sends beyond the host")
		}
	})
	return nil
}

// restoreTables puts back the sandbox's table and the forwarding guard
// if either is gone.
func (sb *Sandbox) restoreTables(spec tableSpec) {
	if !tableExists(spec.name) {
		if err := installTable(spec); err != nil {
			sb.warn(fmt.Sprintf("nftables table %s was deleted while the sandbox ran, and putting it back failed: %v; the routing backstop refuses what the sandbox sends beyond the host", spec.name, err))
		} else {
			// Its domain sets came back empty: what the sandbox resolved
			// still counts.
			for _, addr := range sb.cache.Addrs() {
				sb.addToDomainSet(addr)
			}
			sb.warn(fmt.Sprintf("nftables table %s was deleted while the sandbox ran (a flush ruleset?) and is back", spec.name))
		}
	}
	unlock, err := lockDir(sb.cfg.StateDir)
	if err != nil {
		return
	}
	defer unlock()
	var st forwardingState
	if b, err := os.ReadFile(filepath.Join(sb.cfg.StateDir, forwardingFile)); err == nil {
		json.Unmarshal(b, &st)
	}
	if (st.Guard4 || st.Guard6) && !tableExists(guardTable) {
		if err := installGuard(st.Guard4, st.Guard6); err != nil {
			sb.warn(fmt.Sprintf("nftables table %s, which keeps the host from forwarding anything but sandbox traffic, was deleted, and putting it back failed: %v", guardTable, err))
		}
	}
}

func tableExists(name string) bool {
	c, err := nftables.New()
	if err != nil {
		return false
	}
	_, err = c.ListTableOfFamily(name, nftables.TableFamilyINet)
	return err == nil
}

// warn tells the user, on stderr and in the flow log.
func (sb *Sandbox) warn(msg string) {
	sb.events.Failure(msg)
	if sb.cfg.Warn != nil {
		sb.cfg.Warn(msg)
	}
}
