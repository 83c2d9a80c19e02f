package doctor

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
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
