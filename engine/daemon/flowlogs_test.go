package daemon

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// The logs of detached sandboxes go oldest first, whole files, until the
// rest fit the budget; an attached sandbox's logs and files that are no
// flow logs stay, however old.
func TestPruneLogsKeepsTheNewestWithinTheBudget(t *testing.T) {
	dir := t.TempDir()
	now := time.Now()
	for i, f := range []struct {
		name string
		size int
	}{
		{"live.jsonl.1", 900}, // oldest of all, but attached
		{"notes.txt", 900},
		{"old.jsonl.2", 300},
		{"old.jsonl.1", 300},
		{"old.jsonl", 300},
		{"mid.jsonl", 300},
		{"new.jsonl.next", 100},
		{"new.jsonl", 300},
		{"live.jsonl", 300},
	} {
		path := filepath.Join(dir, f.name)
		os.WriteFile(path, []byte(strings.Repeat("x", f.size)), 0o600)
		mod := now.Add(time.Duration(i-20) * time.Minute)
		os.Chtimes(path, mod, mod)
	}
	attached := func(id string) bool { return id == "live" }
	removed := pruneLogs(dir, attached, 750)
	if want := []string{"old.jsonl.2", "old.jsonl.1", "old.jsonl"}; !slices.Equal(removed, want) {
		t.Errorf("removed %v, want %v", removed, want)
	}
	var left []string
	entries, _ := os.ReadDir(dir)
	for _, e := range entries {
		left = append(left, e.Name())
	}
	if want := []string{"live.jsonl", "live.jsonl.1", "mid.jsonl", "new.jsonl", "new.jsonl.next", "notes.txt"}; !slices.Equal(left, want) {
		t.Errorf("left %v, want %v", left, want)
	}
	if removed := pruneLogs(dir, attached, 0); len(removed) != 3 {
		t.Errorf("a budget of nothing removed %v, want every detached log", removed)
	}
}

func TestLogID(t *testing.T) {
	for name, want := range map[string]string{
		"abc.jsonl": "abc", "abc.jsonl.1": "abc", "abc.jsonl.12": "abc", "abc.jsonl.next": "abc",
		"a.jsonl.b.jsonl.3": "a.jsonl.b", "abc.jsonl.": "", "abc.jsonl.x": "", ".jsonl": "", "abc.json": "", "abc.jsonl.1a": "",
	} {
		if id, ok := logID(name); id != want || ok != (want != "") {
			t.Errorf("logID(%q) = %q, %v; want %q", name, id, ok, want)
		}
	}
}
