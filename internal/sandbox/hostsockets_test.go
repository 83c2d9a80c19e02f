package sandbox

import (
	"net"
	"path/filepath"
	"slices"
	"testing"
)

// The paths of sockets bound in this network namespace are listed, once
// each (an accepted connection repeats its listener's), a path with a
// space whole; abstract ones are not.
func TestHostSocketPathsListsBoundPaths(t *testing.T) {
	path := filepath.Join(t.TempDir(), "a service.sock")
	ln, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	c, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	accepted, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer accepted.Close()
	abstract, err := net.Listen("unix", "@childflow-test-"+filepath.Base(filepath.Dir(path)))
	if err != nil {
		t.Fatal(err)
	}
	defer abstract.Close()

	paths, err := hostSocketPaths()
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, p := range paths {
		if p == path {
			n++
		}
		if p[0] != '/' {
			t.Errorf("listed %q", p)
		}
	}
	if n != 1 || !slices.IsSorted(paths) {
		t.Errorf("%q listed %d times in %q", path, n, paths)
	}
}
