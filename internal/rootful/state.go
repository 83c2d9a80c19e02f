package rootful

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"golang.org/x/sys/unix"

	"github.com/childflow/childflow/internal/netplan"
)

// DefaultStateDir holds a record per live rootful sandbox.
const DefaultStateDir = "/run/childflow/root"

// Record lists every object a rootful sandbox creates on the host. It is
// written before the first of them exists; while the sandbox lives its
// owner holds an flock on it, so a record nobody holds belongs to a
// crashed run and its objects can go.
type Record struct {
	ID     string       `json:"id"`
	Slot   int          `json:"slot"`
	HostIf string       `json:"host_if"`
	Table  string       `json:"table"`
	Plan   netplan.Plan `json:"plan"`
	Owner  int          `json:"owner_pid"`
}

// Names derived from the id and the slot (the slot's marks and routing
// tables are in routing.go), so that a record cut short by a crash still
// names everything.
func hostIfName(id string) string      { return "cfr" + id }
func tableName(id string) string       { return TablePrefix + id }
func slotMark(slot int) uint32         { return 0xcf000000 | uint32(slot)<<4 }
func slotLogGroup(slot int) uint16     { return uint16(0xcf00 + slot) }
func recordPath(dir, id string) string { return filepath.Join(dir, id+".json") }

// lockDir takes the state directory's lock: sandboxes choose subnets and
// slots, and touch the shared forwarding state, one at a time.
func lockDir(dir string) (unlock func(), err error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(filepath.Join(dir, ".lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("locking %s: %w", dir, err)
	}
	return func() { f.Close() }, nil
}

// writeRecord creates the record and keeps it locked for the owner.
func writeRecord(dir string, r Record) (*os.File, error) {
	f, err := os.OpenFile(recordPath(dir, r.ID), os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return nil, fmt.Errorf("recording sandbox %s: %w", r.ID, err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		return nil, err
	}
	if err := rewriteRecord(f, r); err != nil {
		f.Close()
		os.Remove(f.Name())
		return nil, err
	}
	return f, nil
}

func rewriteRecord(f *os.File, r Record) error {
	b, _ := json.Marshal(r)
	if err := f.Truncate(0); err != nil {
		return err
	}
	if _, err := f.WriteAt(b, 0); err != nil {
		return err
	}
	return f.Sync()
}

// records reads every record; held says whether its owner still runs.
func records(dir string) (live, dead []Record) {
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		id, ok := strings.CutSuffix(e.Name(), ".json")
		if !ok || strings.HasPrefix(id, ".") {
			continue
		}
		f, err := os.OpenFile(filepath.Join(dir, e.Name()), os.O_RDONLY, 0)
		if err != nil {
			continue
		}
		r := Record{ID: id}
		var buf [4096]byte
		if n, _ := f.Read(buf[:]); n > 0 {
			json.Unmarshal(buf[:n], &r) // a torn record still has its id
		}
		r.ID = id
		if unix.Flock(int(f.Fd()), unix.LOCK_SH|unix.LOCK_NB) == nil {
			dead = append(dead, r)
		} else {
			live = append(live, r)
		}
		f.Close()
	}
	return live, dead
}

// removeObjects deletes everything r names. Objects already gone are
// fine; the record goes last, so a failure leaves it for a later try.
func removeObjects(dir string, r Record) error {
	var errs []error
	if err := deleteTables(tableName(r.ID)); err != nil {
		errs = append(errs, err)
	}
	linkGone := true
	// Deleting one end of the veth deletes both, with their addresses
	// and routes.
	if err := deleteLink(hostIfName(r.ID)); err != nil {
		errs = append(errs, fmt.Errorf("deleting %s: %w", hostIfName(r.ID), err))
		linkGone = false
	}
	if r.Slot > 0 {
		if err := removeRouting(r.Slot); err != nil {
			errs = append(errs, err)
		}
		// Only once nothing can arrive on the link.
		if linkGone {
			if err := removeBackstop(r.Slot, hostIfName(r.ID)); err != nil {
				errs = append(errs, err)
			}
			if err := forgetConnections(r.Slot); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	if err := os.Remove(recordPath(dir, r.ID)); err != nil && !os.IsNotExist(err) {
		return err
	}
	return nil
}

// deleteLink deletes the named link, if there is one, in one request:
// the kernel looks the name up. The veth also goes with the sandbox's
// namespace, which the kernel takes down in the background once nothing
// holds it (with a flow log, childflow's sock_diag socket there is closed
// just before the teardown): looked up first and then deleted, it could
// go in between, and the teardown, taking "no such device" for a link
// still there, kept the record and the backstop's rules.
func deleteLink(name string) error {
	req := nl.NewNetlinkRequest(unix.RTM_DELLINK, unix.NLM_F_ACK)
	req.AddData(nl.NewIfInfomsg(unix.AF_UNSPEC))
	req.AddData(nl.NewRtAttr(unix.IFLA_IFNAME, nl.ZeroTerminated(name)))
	if _, err := req.Execute(unix.NETLINK_ROUTE, 0); err != nil && !errors.Is(err, unix.ENODEV) {
		return err
	}
	return nil
}

// CleanupResult says what Cleanup did.
type CleanupResult struct {
	Removed []string // sandboxes whose objects were removed
	Live    []string // sandboxes still running, left alone
	Orphans []string // objects no record named, removed
}

// Cleanup removes what crashed rootful runs left behind: the objects of
// every record no live process holds, tables and links named like ours
// that no record names, and the shared forwarding state when no rootful
// sandbox runs any more.
func Cleanup(dir string) (CleanupResult, error) {
	var res CleanupResult
	unlock, err := lockDir(dir)
	if err != nil {
		return res, err
	}
	defer unlock()
	return cleanupLocked(dir)
}

// removeDead removes the objects of every record no live process holds;
// it returns the live records and the ids it removed.
func removeDead(dir string) (live []Record, removed []string, err error) {
	var errs []error
	live, dead := records(dir)
	for _, r := range dead {
		if err := removeObjects(dir, r); err != nil {
			errs = append(errs, fmt.Errorf("sandbox %s: %w", r.ID, err))
			continue
		}
		removed = append(removed, r.ID)
	}
	return live, removed, errors.Join(errs...)
}

func cleanupLocked(dir string) (CleanupResult, error) {
	var res CleanupResult
	live, removed, err := removeDead(dir)
	res.Removed = removed
	errs := []error{err}
	known := map[string]bool{}
	for _, r := range live {
		known[r.ID] = true
		res.Live = append(res.Live, r.ID)
	}
	// Objects a run created before its record reached the disk cannot
	// exist (the record comes first), but a record removed by hand can
	// leave them: names tell ours. Only here, not at every run's start.
	if ts, err := tables(TablePrefix); err == nil {
		for _, t := range ts {
			if id := strings.TrimPrefix(t, TablePrefix); !known[id] {
				if err := deleteTables(t); err == nil {
					res.Orphans = append(res.Orphans, "nftables table "+t)
				}
			}
		}
	}
	if links, err := netlink.LinkList(); err == nil {
		for _, l := range links {
			name := l.Attrs().Name
			if id, ok := strings.CutPrefix(name, "cfr"); ok && l.Type() == "veth" && !known[id] {
				if netlink.LinkDel(l) == nil {
					res.Orphans = append(res.Orphans, "link "+name)
				}
			}
		}
	}
	liveSlots, liveIfs := map[int]bool{}, map[string]bool{}
	for _, r := range live {
		liveSlots[r.Slot] = true
		liveIfs[hostIfName(r.ID)] = true
	}
	if n, err := removeStrayRules(liveSlots, liveIfs); err == nil && n > 0 {
		res.Orphans = append(res.Orphans, fmt.Sprintf("%d ip rule(s)", n))
	}
	if len(live) == 0 {
		if err := restoreForwarding(dir); err != nil {
			errs = append(errs, err)
		}
	}
	return res, errors.Join(errs...)
}
