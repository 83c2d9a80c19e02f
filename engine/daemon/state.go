package daemon

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/childflow/childflow/engine/api"
	"github.com/childflow/childflow/internal/procnet"
	"github.com/childflow/childflow/internal/steer"
	"github.com/childflow/childflow/internal/tunns"
)

func (d *Daemon) recordDir() string { return filepath.Join(d.cfg.StateDir, api.RecordDir) }

func (d *Daemon) recordPath(id string) string { return api.RecordPath(d.cfg.StateDir, id) }

// writeRecord stores a atomically (it holds proxy credentials: 0600).
func (d *Daemon) writeRecord(a api.Attachment) error {
	b, err := json.Marshal(a)
	if err != nil {
		return err
	}
	tmp, err := os.CreateTemp(d.recordDir(), ".tmp-"+a.ID+"-")
	if err != nil {
		return fmt.Errorf("recording sandbox %s: %w", a.ID, err)
	}
	defer os.Remove(tmp.Name())
	if _, err := tmp.Write(b); err != nil {
		tmp.Close()
		return fmt.Errorf("recording sandbox %s: %w", a.ID, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("recording sandbox %s: %w", a.ID, err)
	}
	if err := os.Rename(tmp.Name(), d.recordPath(a.ID)); err != nil {
		return fmt.Errorf("recording sandbox %s: %w", a.ID, err)
	}
	return nil
}

func (d *Daemon) readRecord(id string) (api.Attachment, error) {
	return api.ReadRecord(d.cfg.StateDir, id)
}

// adoptAll starts an engine for every recorded sandbox whose namespace
// still lives, and forgets the others.
func (d *Daemon) adoptAll() {
	entries, _ := os.ReadDir(d.recordDir())
	for _, e := range entries {
		name := e.Name()
		if strings.HasPrefix(name, ".tmp-") {
			os.Remove(filepath.Join(d.recordDir(), name))
			continue
		}
		id, ok := strings.CutSuffix(name, ".json")
		if !ok {
			continue
		}
		a, err := d.readRecord(id)
		if err == nil {
			err = d.adopt(a)
		}
		if err != nil {
			d.cfg.Logf("dropping sandbox %s: %v", id, err)
			os.Remove(d.recordPath(id))
			if _, ok := alive(a); !ok {
				d.forgetGuard(id)
			}
		}
	}
}

// gone says a's network namespace is gone (or was never readable).
func gone(a api.Attachment) bool {
	ino, err := tunns.NetnsInode(a.Netns)
	return err != nil || ino != a.NetnsInode
}

// alive is a, named by a path that reaches its namespace, if the
// namespace lives: a container's sandbox whose container is gone lives
// on in the processes left there (Daemon.linger), which may have been
// left while no daemon ran.
func alive(a api.Attachment) (api.Attachment, bool) {
	if !gone(a) {
		return a, true
	}
	if a.Source == api.SourceCNI || a.NetnsInode == 0 {
		return a, false // a pod's path is the runtime's; no inode, no namespace
	}
	pid, _ := procnet.AProcessIn(a.NetnsInode)
	if pid == 0 {
		return a, false
	}
	a = movedTo(a, pid)
	return a, !gone(a)
}

// movedTo is a named through process pid in its namespace.
func movedTo(a api.Attachment, pid int) api.Attachment {
	a.Netns, a.PID = fmt.Sprintf("/proc/%d/ns/net", pid), pid
	return a
}

// forgetGuard removes the host guards of sandbox id, which has ended (the
// hook's; childflow-cni removes a pod's at CNI DEL).
func (d *Daemon) forgetGuard(id string) {
	if guards := (steer.Guards{Dir: d.cfg.StateDir}); guards.RecordedAny(id) {
		if err := guards.Remove(id); err != nil {
			d.cfg.Logf("sandbox %s: removing its host guard: %v", id, err)
		}
	}
}

func (d *Daemon) adopt(a api.Attachment) error {
	live, ok := alive(a)
	if !ok {
		return fmt.Errorf("its network namespace %s is gone", a.Netns)
	}
	if live.Netns != a.Netns {
		if err := d.writeRecord(live); err != nil {
			return err
		}
		a = live
	}
	link, err := tunns.ReopenIn(a.Netns, a.Plan.Interface)
	if err != nil {
		return err
	}
	return d.attach(a, link, true)
}

// buryTombstones detaches the sandboxes a CNI DEL asked to detach while
// the daemon was down.
func (d *Daemon) buryTombstones() {
	dir := filepath.Join(d.cfg.StateDir, api.TombstoneDir)
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		if api.CheckID(e.Name()) == nil {
			d.detach(e.Name())
		}
		os.Remove(filepath.Join(dir, e.Name()))
	}
}

// CleanupReport says what Cleanup did.
type CleanupReport struct {
	Removed, Live []string
	Tombstones    int
}

// Cleanup removes the records of sandboxes whose namespace is gone, the
// pending detaches of those, and a stale socket, when no daemon runs on
// stateDir. Live sandboxes are left for the next daemon.
func Cleanup(stateDir string) (CleanupReport, error) {
	var r CleanupReport
	d := &Daemon{cfg: Config{StateDir: stateDir, Logf: func(string, ...any) {}}}
	lock, err := lockFile(filepath.Join(stateDir, "daemon.lock"))
	if os.IsNotExist(errors.Unwrap(err)) {
		return r, nil // nothing was ever here
	}
	if err != nil {
		return r, err
	}
	defer lock.Close()
	entries, _ := os.ReadDir(d.recordDir())
	for _, e := range entries {
		id, ok := strings.CutSuffix(e.Name(), ".json")
		if !ok || strings.HasPrefix(e.Name(), ".tmp-") {
			os.Remove(filepath.Join(d.recordDir(), e.Name()))
			continue
		}
		if a, err := d.readRecord(id); err == nil {
			if _, ok := alive(a); ok {
				r.Live = append(r.Live, id)
				continue
			}
		}
		os.Remove(d.recordPath(id))
		d.forgetGuard(id)
		r.Removed = append(r.Removed, id)
	}
	tombs := filepath.Join(stateDir, api.TombstoneDir)
	if t, _ := os.ReadDir(tombs); len(t) > 0 {
		r.Tombstones = len(t)
		os.RemoveAll(tombs)
	}
	os.Remove(filepath.Join(stateDir, "engine.sock"))
	return r, nil
}
