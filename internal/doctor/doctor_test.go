package doctor

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/childflow/childflow/internal/rootful"
)

// The sandbox's resolv.conf is bound over the host's: without a file
// there, exec cannot start, and the resolvers check says so (it said
// "limited", names resolving only with --dns, while exec failed).
func TestResolversNeedAResolvConfToBindOver(t *testing.T) {
	dir := t.TempDir()
	path := func(name string) string { return filepath.Join(dir, name) }
	os.WriteFile(path("plain"), []byte("nameserver 203.0.113.53\n"), 0o644)
	os.WriteFile(path("empty"), nil, 0o644)
	os.Symlink(path("gone"), path("dangling"))
	os.Mkdir(path("dir"), 0o755)
	for _, tc := range []struct {
		name   string
		status Status
		detail string
	}{
		{"plain", Available, "upstream resolvers 203.0.113.53"},
		{"empty", Limited, "no nameserver"},
		{"missing", Unavailable, path("missing") + " is missing"},
		{"dangling", Unavailable, path("dangling") + " names " + path("gone") + ", which is missing"},
		{"dir", Unavailable, path("dir") + " is not a file"},
	} {
		h := Host{Resolv: path(tc.name)}
		c := h.resolvers()
		if c.Status != tc.status || !strings.Contains(c.Detail, tc.detail) {
			t.Errorf("%s: %s %q, want %s %q", tc.name, c.Status, c.Detail, tc.status, tc.detail)
		}
		err := h.Preflight(true)
		if blocks := tc.status == Unavailable; blocks != (err != nil) || (err != nil && !strings.Contains(err.Error(), tc.detail)) {
			t.Errorf("%s: Preflight(rootful): %v", tc.name, err)
		}
	}
}

// --root needs conntrack over netlink: where it does not answer, the
// nftables check says so and how to load it; where it does, nothing.
func TestRootNeedsConntrackOverNetlink(t *testing.T) {
	root := Host{Euid: 0, CapEff: 1<<unix.CAP_SYS_ADMIN | 1<<unix.CAP_NET_ADMIN}
	root.Conntrack = func() error { return unix.EOPNOTSUPP }
	if c := root.nftables(); c.Status != Limited || !strings.Contains(c.Detail, "conntrack") || !strings.Contains(c.Fix, "nf_conntrack_netlink") {
		t.Errorf("without it: %+v", c)
	}
	root.Conntrack = func() error { return nil }
	if c := root.nftables(); c.Status != Available {
		t.Errorf("with it: %+v", c)
	}
	if os.Geteuid() == 0 {
		if err := rootful.ConntrackOverNetlink(); err != nil {
			t.Errorf("this host's conntrack over netlink: %v", err)
		}
	}
}
