package rootful

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/google/nftables"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"

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
		// What the sandbox resolved still counts.
		if err := installTable(spec, sb.domainElements()); err != nil {
			sb.warn(fmt.Sprintf("nftables table %s was deleted while the sandbox ran, and putting it back failed: %v; the routing backstop refuses what the sandbox sends beyond the host", spec.name, err))
		} else {
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

// keepRouting puts the sandbox's ip rules and routes back whenever some
// go: systemd-networkd removes rules and routes it did not configure
// when it starts or reloads. Meanwhile nothing leaks (the table drops
// --iface traffic leaving elsewhere, the kernel never forwards TPROXY'd
// packets, and the table alone enforces the policy without the
// backstop), but the sandbox has no network.
func (sb *Sandbox) keepRouting(spec tableSpec) error {
	c, err := netlink.Dial(unix.NETLINK_ROUTE, nil)
	if err != nil {
		return fmt.Errorf("watching the host's routing: %w", err)
	}
	for _, g := range []uint32{unix.RTNLGRP_IPV4_RULE, unix.RTNLGRP_IPV6_RULE, unix.RTNLGRP_IPV4_ROUTE, unix.RTNLGRP_IPV6_ROUTE} {
		if err := c.JoinGroup(g); err != nil {
			c.Close()
			return fmt.Errorf("watching the host's routing: %w", err)
		}
	}
	sb.closers = append(sb.closers, c)
	sb.spawn(func() {
		for {
			msgs, err := c.Receive()
			if sb.ctx.Err() != nil {
				return
			}
			deleted := err != nil // events lost: look anyway
			for _, m := range msgs {
				deleted = deleted || m.Header.Type == unix.RTM_DELRULE || m.Header.Type == unix.RTM_DELROUTE
			}
			if err != nil && !errors.Is(err, unix.ENOBUFS) {
				sb.warn(fmt.Sprintf("watching the host's routing: %v: ip rules or routes removed are no longer put back", err))
				return
			}
			if deleted {
				if err := sb.addRouting(spec); err != nil {
					sb.warn(fmt.Sprintf("putting the sandbox's ip rules and routes back: %v", err))
				}
			}
		}
	})
	return nil
}
