package rootful

import (
	"strings"
	"testing"
	"time"
)

// The first overflow is marked at once, the next within a second are
// counted into one mark after it, and those left at the end are marked.
func TestGapMarksAreRateLimitedAndKeepTheCount(t *testing.T) {
	var g gapMarks
	t0 := time.Unix(1000, 0)
	var marks []string
	at := func(d time.Duration) {
		if msg, ok := g.overflow(t0.Add(d)); ok {
			marks = append(marks, msg)
		}
	}
	for _, d := range []time.Duration{0, 100 * time.Millisecond, 200 * time.Millisecond, 900 * time.Millisecond, 1100 * time.Millisecond, 1200 * time.Millisecond} {
		at(d)
	}
	if msg, ok := g.rest(); ok {
		marks = append(marks, msg)
	}
	want := []string{"overflows: 1)", "overflows: 4)", "overflows: 1)"}
	if len(marks) != len(want) {
		t.Fatalf("marks %q, want %d", marks, len(want))
	}
	for i, w := range want {
		if !strings.Contains(marks[i], w) {
			t.Errorf("mark %d: %q, want %s", i, marks[i], w)
		}
	}
	if _, ok := g.rest(); ok {
		t.Error("a mark with nothing lost")
	}
}
