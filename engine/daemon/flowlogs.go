package daemon

import (
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"
)

// pruneFlowLogs removes the flow logs of sandboxes no longer attached,
// oldest first, until together they hold at most FlowLogRetain bytes: a
// node that runs many short-lived containers keeps their newest logs,
// not every one ever written. The lock keeps an attach of the same id
// from opening its log meanwhile.
func (d *Daemon) pruneFlowLogs() {
	if d.cfg.FlowLogDir == "" || d.cfg.FlowLogRetain <= 0 {
		return
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	attached := func(id string) bool { _, ok := d.sandboxes[id]; return ok }
	if removed := pruneLogs(d.cfg.FlowLogDir, attached, d.cfg.FlowLogRetain); len(removed) > 0 {
		d.cfg.Logf("removed %d flow log file(s) of detached sandboxes, oldest first (%s ...), to keep within --flow-log-retain", len(removed), removed[0])
	}
}

// pruneLogs is pruneFlowLogs on dir; it returns the names it removed.
func pruneLogs(dir string, attached func(id string) bool, budget int64) []string {
	entries, _ := os.ReadDir(dir)
	type file struct {
		name string
		size int64
		mod  time.Time
	}
	var files []file
	var total int64
	for _, e := range entries {
		id, ok := logID(e.Name())
		if !ok || !e.Type().IsRegular() || attached(id) {
			continue
		}
		if info, err := e.Info(); err == nil {
			files = append(files, file{e.Name(), info.Size(), info.ModTime()})
			total += info.Size()
		}
	}
	sort.Slice(files, func(i, j int) bool { return files[i].mod.Before(files[j].mod) })
	var removed []string
	for _, f := range files {
		if total <= budget {
			break
		}
		if os.Remove(filepath.Join(dir, f.name)) == nil {
			total -= f.size
			removed = append(removed, f.name)
		}
	}
	return removed
}

// logID is the sandbox id of a flow log's file: ID.jsonl, a rotated
// ID.jsonl.N, or ID.jsonl.next, left by a rotation cut short.
func logID(name string) (string, bool) {
	i := strings.LastIndex(name, ".jsonl")
	if i <= 0 {
		return "", false
	}
	rest := name[i+len(".jsonl"):]
	if rest == "" || rest == ".next" || len(rest) > 1 && rest[0] == '.' && strings.Trim(rest[1:], "0123456789") == "" {
		return name[:i], true
	}
	return "", false
}
