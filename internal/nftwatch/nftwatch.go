// Package nftwatch tells when tables go from the host's nftables. A
// `flush ruleset` (every restart of Debian's nftables.service) deletes
// every table, childflow's too; what childflow enforces in the host's
// namespace must then be put back at once.
package nftwatch

import (
	"context"
	"fmt"

	"github.com/google/nftables"
)

// Watcher is a subscription to the host's nftables table events.
type Watcher struct {
	c      *nftables.Conn
	mon    *nftables.Monitor
	events chan *nftables.MonitorEvents
}

// New subscribes, so that no deletion after it returns goes unseen.
func New() (*Watcher, error) {
	c, err := nftables.New()
	if err != nil {
		return nil, err
	}
	w := &Watcher{c: c}
	return w, w.subscribe()
}

func (w *Watcher) subscribe() error {
	// Every object, though only tables count: the kernel sends them all
	// anyway, and the library (v0.3.0) passes them all only because the
	// tables' flags have its bit 0; a stricter filter would drop the
	// NEWGEN message that ends each batch, and with it every batch.
	w.mon = nftables.NewMonitor(nftables.WithMonitorObject(nftables.MonitorObjectAny))
	events, err := w.c.AddGenerationalMonitor(w.mon)
	if err != nil {
		return fmt.Errorf("watching the host's nftables tables: %w", err)
	}
	w.events = events
	return nil
}

// Run calls deleted after each transaction that deleted a table, and
// after events were lost (the socket's buffer overran: the caller
// looks for itself), until ctx ends. It returns an error only if it
// cannot subscribe again.
func (w *Watcher) Run(ctx context.Context, deleted func()) error {
	for {
		stop := context.AfterFunc(ctx, func() { w.mon.Close() })
		for batch := range w.events {
			// One call per transaction, however many tables it deleted (a
			// flush deletes them all). A receive error ends the channel
			// with an out-of-band event.
			for _, ev := range batch.Changes {
				if ev.Type == nftables.MonitorEventTypeDelTable || ev.Type == nftables.MonitorEventTypeOOB {
					deleted()
					break
				}
			}
		}
		stop()
		if ctx.Err() != nil {
			return nil
		}
		if err := w.subscribe(); err != nil {
			return err
		}
		deleted()
	}
}
