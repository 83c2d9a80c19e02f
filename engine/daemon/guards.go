package daemon

import (
	"strings"
	"sync/atomic"
	"time"

	"github.com/childflow/childflow/internal/nftwatch"
	"github.com/childflow/childflow/internal/steer"
)

// snapshotEvery paces the snapshots of what the bridge ports' guards
// know, which a guard put back is given: a host heard from first in the
// last snapshotEvery before a flush is forgotten (the pod's side of its
// connections is cut until it sends the pod something but an answer).
// A snapshot of 100 bridged pods' guards knowing 5000 hosts took 37 ms
// of CPU here (a netlink dump per set).
const snapshotEvery = 10 * time.Second

// keepGuards puts back the host guards childflow-cni installed for the
// node's pods whenever they go: a `flush ruleset` (a restart of
// nftables.service) deletes their tables, and a pod with CAP_NET_RAW
// could then send frames anywhere through the node. Without the daemon
// (or in the milliseconds before it acts) they stay gone; CNI CHECK
// reports that.
func (d *Daemon) keepGuards(w *nftwatch.Watcher) {
	guards := steer.Guards{Dir: d.cfg.StateDir}
	var snapshot atomic.Pointer[steer.Snapshot]
	go func() {
		tick := time.NewTicker(snapshotEvery)
		defer tick.Stop()
		for {
			if s := guards.Snapshot(); s != nil { // nil: the tables are gone
				snapshot.Store(s)
			}
			select {
			case <-d.ctx.Done():
				return
			case <-tick.C:
			}
		}
	}()
	restore := func() {
		restored, err := guards.Restore(snapshot.Load())
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
