package sandbox

import (
	"fmt"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"
)

// The sandbox's resolv.conf (and --hosts-file) are bound over the host's
// files, and the host replaces those files while a command runs:
// systemd-resolved, NetworkManager and resolvconf write a new file and
// rename it over the old one, on every change of network. Replacing a
// file detaches the mounts on it in every namespace, so the command then
// read the host's resolv.conf: 127.0.0.53 or 127.0.0.1, its own
// loopback, and no DNS for the rest of the run. Init puts its cover back
// over the new file when it sees one.

// etcCover is one of init's covers, kept: dst is the path covered (a
// symlink is followed to what it names at the time), spare a detached
// copy of the cover's mount (open_tree), for a new file to be covered
// with; dev and ino name the cover's own file.
type etcCover struct {
	dst      string
	spare    int
	dev, ino uint64
}

// keepCover returns dst's cover, just bound over target (dst or what
// its symlink names), as an etcCover; ok is false where the kernel has
// no open_tree (before 5.2): the cover then goes with the host's next
// replacement, as it did before.
func keepCover(dst, target string) (c etcCover, ok bool) {
	var st unix.Stat_t
	if unix.Stat(target, &st) != nil {
		return c, false
	}
	spare, err := unix.OpenTree(unix.AT_FDCWD, target, unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC)
	if err != nil {
		return c, false
	}
	return etcCover{dst: dst, spare: spare, dev: st.Dev, ino: st.Ino}, true
}

// keepCovering watches the directories of covers' files (and of the
// files their symlinks name) and covers any file that replaced one. It
// runs for init's lifetime, on a thread that kept init's privileges (not
// the command's, which init locks and drops them on).
func keepCovering(covers []etcCover) {
	if len(covers) == 0 {
		return
	}
	// Off the start's path (an inotify thread costs ~1 ms of a start on
	// two vCPUs): a command done by then never needs it, and a file
	// replaced before is found by the first look below.
	time.Sleep(50 * time.Millisecond)
	fd, err := unix.InotifyInit1(unix.IN_CLOEXEC)
	if err != nil {
		return
	}
	watched := map[string]bool{}
	watch := func(dir string) {
		if !watched[dir] {
			// A rename over the file is IN_MOVED_TO; a file removed
			// and written anew, IN_CREATE.
			if _, err := unix.InotifyAddWatch(fd, dir, unix.IN_CREATE|unix.IN_MOVED_TO|unix.IN_ONLYDIR); err == nil {
				watched[dir] = true
			}
		}
	}
	buf := make([]byte, 4096)
	for {
		for i := range covers {
			c := &covers[i]
			watch(filepath.Dir(c.dst))
			target, err := filepath.EvalSymlinks(c.dst)
			if err != nil {
				continue // gone for the moment: its return is an event
			}
			watch(filepath.Dir(target))
			if err := c.cover(target); err != nil {
				fmt.Fprintf(os.Stderr, "childflow: covering %s again after the host replaced it: %v\n", c.dst, err)
			}
		}
		if _, err := unix.Read(fd, buf); err != nil && err != unix.EINTR {
			return
		}
	}
}

// cover attaches the spare copy of the cover over target unless target
// is the cover already, and keeps a copy of that for the next time.
func (c *etcCover) cover(target string) error {
	var st unix.Stat_t
	if err := unix.Stat(target, &st); err != nil || (st.Dev == c.dev && st.Ino == c.ino) || c.spare < 0 {
		return nil
	}
	if err := unix.MoveMount(c.spare, "", unix.AT_FDCWD, target, unix.MOVE_MOUNT_F_EMPTY_PATH); err != nil {
		return err
	}
	unix.Close(c.spare)
	spare, err := unix.OpenTree(unix.AT_FDCWD, target, unix.OPEN_TREE_CLONE|unix.OPEN_TREE_CLOEXEC)
	if err != nil {
		c.spare = -1
		return fmt.Errorf("keeping a copy of the cover: %w", err)
	}
	c.spare = spare
	return nil
}
