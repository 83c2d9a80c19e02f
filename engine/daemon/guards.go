package daemon

import (
	"strings"

	"github.com/childflow/childflow/internal/nftwatch"
	"github.com/childflow/childflow/internal/steer"
)

// keepGuards puts back the host guards childflow-cni installed for the
// node's pods whenever they go: a `flush ruleset` (a restart of
// nftables.service) deletes their tables, and a pod with CAP_NET_RAW
// could then send frames anywhere through the node. Without the daemon
// (or in the milliseconds before it acts) they stay gone; CNI CHECK
// reports that.
func (d *Daemon) keepGuards(w *nftwatch.Watcher) {
	guards := steer.Guards{Dir: d.cfg.StateDir}
	restore := func() {
		restored, err := guards.Restore()
		if len(restored) > 0 {
			d.cfg.Logf("host guards of %d pod(s) were deleted (a flush ruleset?): put back (%s)", len(restored), strings.Join(restored, ", "))
		}
		if err != nil {
			d.cfg.Logf("host guards: %v", err)
		}
	}
	restore()
	if old := guards.WithoutLinkChecks(); len(old) > 0 {
		d.cfg.Logf("host guards of %d pod(s) on a bridge predate the checks of what a pod claims on the link (MAC, ARP, neighbour discovery): they get them when added again (%s)", len(old), strings.Join(old, ", "))
	}
	if err := w.Run(d.ctx, restore); err != nil {
		d.cfg.Logf("host guards are no longer put back when deleted: %v", err)
	}
}
