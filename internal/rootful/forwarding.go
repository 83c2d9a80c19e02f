package rootful

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"

	"github.com/childflow/childflow/internal/nftexpr"
)

// Forwarding. The kernel forwards a packet only if forwarding is on for
// the interface it arrived on: the sandbox's veth for what it sends, and
// the host's uplinks for the replies. Where the host does not forward
// already, childflow turns it on (IPv4: ip_forward; IPv6: the per-link
// force_forwarding, which, unlike conf.all.forwarding, leaves the
// host's router advertisements handling alone; before Linux 6.17, which
// has none, all.forwarding and accept_ra 2) and, where it filters by
// reverse path, src_valid_mark; records the values it changed, and adds
// a guard table so that the host still forwards nothing but sandbox
// traffic. The last rootful sandbox to leave restores them.

const (
	forwardingFile = ".forwarding.json" // hidden: not a sandbox record
	guardTable     = "childflow-rootguard"
	vethPrefix     = "cfr"
)

// forwardingState holds the original values of what childflow changed.
type forwardingState struct {
	// Sysctls maps a /proc/sys path to its value before childflow.
	Sysctls map[string]string `json:"sysctls"`
	Guard4  bool              `json:"guard4,omitempty"`
	Guard6  bool              `json:"guard6,omitempty"`
}

func readSysctl(path string) string {
	b, _ := os.ReadFile(path)
	return strings.TrimSpace(string(b))
}

func writeSysctl(path, v string) error {
	if err := os.WriteFile(path, []byte(v), 0o644); err != nil {
		return fmt.Errorf("setting %s to %s: %w", strings.TrimPrefix(path, "/proc/sys/"), v, err)
	}
	return nil
}

// hostInterfaces are the host's links in /proc/sys/net/<family>/conf
// (ipv4 or ipv6), childflow's and loopback left out.
func hostInterfaces(family string) []string {
	entries, _ := os.ReadDir("/proc/sys/net/" + family + "/conf")
	var out []string
	for _, e := range entries {
		n := e.Name()
		if n != "all" && n != "default" && n != "lo" && !strings.HasPrefix(n, vethPrefix) {
			out = append(out, n)
		}
	}
	return out
}

// reversePathFiltered says whether the host filters IPv4 by reverse path
// on any link, or will on a new one (rp_filter, where all's and the
// link's larger value holds).
func reversePathFiltered() bool {
	for _, n := range append(hostInterfaces("ipv4"), "all", "default") {
		if v := readSysctl("/proc/sys/net/ipv4/conf/" + n + "/rp_filter"); v != "" && v != "0" {
			return true
		}
	}
	return false
}

// enableForwarding makes the host forward sandbox traffic; the caller
// holds the directory lock. The state file is written before any value
// changes.
func enableForwarding(dir string) error {
	path := filepath.Join(dir, forwardingFile)
	var st forwardingState
	if b, err := os.ReadFile(path); err == nil {
		json.Unmarshal(b, &st)
	}
	if st.Sysctls == nil {
		st.Sysctls = map[string]string{}
	}
	var change []sysctl // in order
	// remember records a value that a global switch overwrites, so that
	// turning it off again restores exactly.
	remember := func(p string) {
		if _, ok := st.Sysctls[p]; !ok {
			st.Sysctls[p] = readSysctl(p)
		}
	}
	if readSysctl(ipForward) == "0" {
		change = append(change, sysctl{ipForward, "1"})
		st.Guard4 = true
		// Turning ip_forward on sets every link's forwarding.
		for _, ifc := range append(hostInterfaces("ipv4"), "default") {
			remember("/proc/sys/net/ipv4/conf/" + ifc + "/forwarding")
		}
	}
	// Reverse-path filtering checks a reply to the sandbox with a lookup
	// that the routing backstop refuses unless the reply is marked (the
	// table marks it), and reads the mark only with src_valid_mark.
	const srcValidMark = "/proc/sys/net/ipv4/conf/all/src_valid_mark"
	if reversePathFiltered() && readSysctl(srcValidMark) == "0" {
		change = append(change, sysctl{srcValidMark, "1"})
	}
	if readSysctl(ipv6Forward) == "0" {
		if readSysctl("/proc/sys/net/ipv6/conf/all/force_forwarding") != "" {
			for _, ifc := range hostInterfaces("ipv6") {
				p := "/proc/sys/net/ipv6/conf/" + ifc + "/force_forwarding"
				if readSysctl(p) == "0" {
					change = append(change, sysctl{p, "1"})
					st.Guard6 = true
				}
			}
		} else {
			// Before Linux 6.17 (no force_forwarding) IPv6 is forwarded
			// only with all.forwarding, which makes every link a router:
			// one that takes its address and default route from router
			// advertisements (accept_ra 1) would stop taking them, and
			// lose its default route when the last one expires. With
			// accept_ra 2 it goes on taking them, as Docker's and LXD's
			// documentation ask of a host that routes IPv6 for them.
			for _, ifc := range append(hostInterfaces("ipv6"), "default") {
				if p := "/proc/sys/net/ipv6/conf/" + ifc + "/accept_ra"; readSysctl(p) == "1" {
					change = append(change, sysctl{p, "2"})
				}
				remember("/proc/sys/net/ipv6/conf/" + ifc + "/forwarding")
			}
			change = append(change, sysctl{ipv6Forward, "1"})
			st.Guard6 = true
		}
	}
	if len(change) == 0 {
		return nil
	}
	for _, c := range change {
		remember(c.path)
	}
	b, _ := json.Marshal(st)
	if err := os.WriteFile(path, b, 0o600); err != nil {
		return fmt.Errorf("recording forwarding state: %w", err)
	}
	if err := installGuard(st.Guard4, st.Guard6); err != nil {
		return err
	}
	for _, c := range change {
		if err := writeSysctl(c.path, c.value); err != nil {
			return err
		}
	}
	return nil
}

type sysctl struct{ path, value string }

// The global forwarding switches: writing one sets every link's value.
const (
	ipForward   = "/proc/sys/net/ipv4/ip_forward"
	ipv6Forward = "/proc/sys/net/ipv6/conf/all/forwarding"
)

// restoreForwarding puts back what enableForwarding changed; the caller
// holds the lock and knows no rootful sandbox runs. The tables named in
// with go in the guard's transaction, if it goes.
func restoreForwarding(dir string, with ...string) error {
	path := filepath.Join(dir, forwardingFile)
	b, err := os.ReadFile(path)
	if os.IsNotExist(err) {
		return nil
	}
	var st forwardingState
	json.Unmarshal(b, &st)
	var errs []error
	// The global switches first: writing one resets every link's value,
	// which the per-link originals then correct.
	global := []string{ipForward, ipv6Forward}
	for _, p := range global {
		if v, ok := st.Sysctls[p]; ok {
			if err := writeSysctl(p, v); err != nil {
				errs = append(errs, err)
			}
		}
	}
	for p, v := range st.Sysctls {
		if slices.Contains(global, p) {
			continue
		}
		if _, err := os.Stat(p); err != nil {
			continue // the link is gone
		}
		if readSysctl(p) != v {
			if err := writeSysctl(p, v); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if err := deleteTables(append(with, guardTable)...); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	return os.Remove(path)
}

// installGuard (re)creates the table that keeps the host from
// forwarding anything but sandbox traffic, per family changed.
func installGuard(v4, v6 bool) error {
	c, err := nftables.New()
	if err != nil {
		return err
	}
	t := &nftables.Table{Family: nftables.TableFamilyINet, Name: guardTable}
	if tableExists(guardTable) {
		// Start empty whatever a crashed run left. Only then: a
		// transaction that deletes anything takes 8-24 ms here, one
		// that only adds 0.3 ms.
		c.DelTable(t)
	}
	n := nft{c: c, t: c.AddTable(t)}
	ch := c.AddChain(&nftables.Chain{Name: "forward", Table: n.t, Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookForward, Priority: nftables.ChainPriorityRef(-10)})
	for _, fam := range []struct {
		on  bool
		is6 bool
	}{{v4, false}, {v6, true}} {
		if fam.on {
			n.rule(ch, nftexpr.Cat(nftexpr.Family(fam.is6), nftexpr.IfName(expr.MetaKeyIIFNAME, vethPrefix+"*", false),
				nftexpr.IfName(expr.MetaKeyOIFNAME, vethPrefix+"*", false), []expr.Any{&expr.Verdict{Kind: expr.VerdictDrop}})...)
		}
	}
	if err := nftexpr.Flush(c); err != nil {
		return fmt.Errorf("creating nftables table %s: %w", guardTable, err)
	}
	return nil
}
