package asuser

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// Files opened in Do are the user's; no other thread takes the identity.
func TestDoOpensAsTheUserOnlyThere(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	dir := t.TempDir()
	os.Chmod(filepath.Dir(dir), 0o755) // t.TempDir makes both 0700
	os.Chmod(dir, 0o777)
	secret := filepath.Join(dir, "secret")
	os.WriteFile(secret, []byte("x"), 0o600)
	u := &User{UID: 65534, GID: 65534, Groups: []int{65534}}

	err := u.Do(func() error {
		f, err := os.Create(filepath.Join(dir, "mine"))
		if err != nil {
			return err
		}
		return f.Close()
	})
	if err != nil {
		t.Fatal(err)
	}
	st, _ := os.Stat(filepath.Join(dir, "mine"))
	if sys := st.Sys().(*syscall.Stat_t); sys.Uid != 65534 || sys.Gid != 65534 {
		t.Errorf("created as %d:%d", sys.Uid, sys.Gid)
	}
	if err := u.Do(func() error { _, err := os.ReadFile(secret); return err }); !os.IsPermission(err) {
		t.Errorf("root's 0600 file read as the user: %v", err)
	}

	// Meanwhile, and after, every other thread is still root's.
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			u.Do(func() error { return nil })
			if fsuid, _ := unix.SetfsuidRetUid(-1); fsuid != 0 {
				t.Errorf("a thread's file uid is %d", fsuid)
			}
			if _, err := os.ReadFile(secret); err != nil {
				t.Errorf("root lost its rights: %v", err)
			}
		}()
	}
	wg.Wait()
}

func TestNoUserRunsAsItIs(t *testing.T) {
	var u *User
	ran := false
	if err := u.Do(func() error { ran = true; return nil }); err != nil || !ran || u.IDs() != nil {
		t.Fatalf("nil user: ran %v, err %v, ids %v", ran, err, u.IDs())
	}
}

// sudo sets valid ids; any other value would have left the command root.
func TestFromSudoRefusesIdsSudoNeverSets(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	for _, tc := range []struct {
		uid, gid string
		want     []int // nil: no user
		err      string
	}{
		{"", "", nil, ""},
		{"0", "0", nil, ""},
		{"65534", "65534", []int{65534, 65534}, ""},
		{"-1", "-1", nil, `invalid SUDO_UID "-1"`},
		{"4294967295", "0", nil, `invalid SUDO_UID "4294967295"`},
		{"abc", "1", nil, `invalid SUDO_UID "abc"`},
		{"65534", "", nil, `invalid SUDO_GID ""`},
	} {
		t.Setenv("SUDO_UID", tc.uid)
		t.Setenv("SUDO_GID", tc.gid)
		u, err := FromSudo()
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("SUDO_UID %q SUDO_GID %q: %v, want %s", tc.uid, tc.gid, err, tc.err)
			}
			continue
		}
		if err != nil || !slices.Equal(u.IDs(), tc.want) {
			t.Errorf("SUDO_UID %q SUDO_GID %q: %v, %v; want %v", tc.uid, tc.gid, u.IDs(), err, tc.want)
		}
	}
}
