// Package asuser opens the files a user names with that user's rights.
// Under sudo, childflow runs as root for the user who named the flow log,
// the capture, the profile and the report: opened as root, those paths
// would be root's to read, replace and remove (a sudo rule that allows
// only childflow would hand over every file on the machine), and what it
// writes root's to own, so the user could not read their own flow log.
package asuser

import (
	"fmt"
	"os"
	"os/user"
	"runtime"
	"strconv"
	"sync"

	"golang.org/x/sys/unix"
)

// User is whom files are opened for.
type User struct {
	UID, GID int
	Groups   []int // supplementary, as their login has them; nil: looked up on first use

	lookup sync.Once
}

// FromSudo returns the user who ran childflow through sudo, or nil when
// it was not (or root did). sudo sets SUDO_UID and SUDO_GID to valid ids;
// other values are refused rather than read as no user, which would run
// the command as root.
func FromSudo() (*User, error) {
	if os.Geteuid() != 0 || os.Getenv("SUDO_UID") == "" {
		return nil, nil
	}
	uid, err := id("SUDO_UID")
	if err != nil {
		return nil, err
	}
	gid, err := id("SUDO_GID")
	if err != nil || uid == 0 {
		return nil, err
	}
	return &User{UID: uid, GID: gid}, nil
}

// groups are u's supplementary groups, read from the user database only
// when a file is first opened: most runs name none.
func (u *User) groups() []int {
	u.lookup.Do(func() {
		if u.Groups != nil {
			return
		}
		u.Groups = []int{u.GID}
		if pw, err := user.LookupId(strconv.Itoa(u.UID)); err == nil {
			if ids, err := pw.GroupIds(); err == nil {
				u.Groups = u.Groups[:0]
				for _, id := range ids {
					if g, err := strconv.Atoi(id); err == nil {
						u.Groups = append(u.Groups, g)
					}
				}
			}
		}
	})
	return u.Groups
}

// id reads a user or group id from the environment: 0 to 2^32-2, as
// 2^32-1 is the kernel's "unchanged".
func id(name string) (int, error) {
	v := os.Getenv(name)
	n, err := strconv.ParseUint(v, 10, 32)
	if err != nil || n == 1<<32-1 {
		return 0, fmt.Errorf("invalid %s %q: not a user or group id", name, v)
	}
	return int(n), nil
}

// Do runs fn with u's filesystem identity: a new thread's file user and
// group and supplementary groups are set to u's (the kernel drops root's
// file capabilities with them), and the thread ends with fn, so no other
// goroutine ever runs with them. The files fn opens are u's to open and,
// when created, u's own. A nil u runs fn as it is.
func (u *User) Do(fn func() error) error {
	if u == nil {
		return fn()
	}
	done := make(chan error, 1)
	go func() {
		// Never unlocked: the thread exits with this goroutine. The
		// runtime does not clone a locked thread for new ones.
		runtime.LockOSThread()
		if err := u.become(); err != nil {
			done <- err
			return
		}
		done <- fn()
	}()
	return <-done
}

// Call is Do for a function that returns what it opened.
func Call[T any](u *User, fn func() (T, error)) (T, error) {
	var v T
	err := u.Do(func() (err error) {
		v, err = fn()
		return err
	})
	return v, err
}

func (u *User) become() error {
	if err := unix.Setgroups(u.groups()); err != nil { // this thread's only
		return fmt.Errorf("taking the groups of uid %d: %w", u.UID, err)
	}
	unix.Setfsgid(u.GID)
	unix.Setfsuid(u.UID)
	// setfsuid reports no failure: asking again returns what it is.
	if got, _ := unix.SetfsuidRetUid(-1); got != u.UID {
		return fmt.Errorf("taking the file identity of uid %d: it is %d", u.UID, got)
	}
	if got, _ := unix.SetfsgidRetGid(-1); got != u.GID {
		return fmt.Errorf("taking the file identity of gid %d: it is %d", u.GID, got)
	}
	return nil
}

// IDs are u's user and group id, or nil for no user.
func (u *User) IDs() []int {
	if u == nil {
		return nil
	}
	return []int{u.UID, u.GID}
}
