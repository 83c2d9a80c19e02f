package flowlog

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"testing"
)

// A writer that falls behind drops events rather than block, and marks
// each gap in the log where it is, with the number lost: between the
// events around a mark exactly that many are missing.
func TestDroppedEventsAreMarkedWhereTheyWereLost(t *testing.T) {
	r, out := io.Pipe()
	w := NewWriter(out)
	const events = 20000
	for i := range events { // nothing reads the pipe yet: the writer blocks
		w.Log(Event{Event: ConnectAttempt, FlowID: uint64(i + 1)})
	}
	go func() { w.Close(); out.Close() }()
	var last, lost, marks, pending uint64
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		var ev Event
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil {
			t.Fatalf("line %q: %v", sc.Text(), err)
		}
		switch ev.Event {
		case RuntimeFailure:
			var n uint64
			if _, err := fmt.Sscanf(ev.Error, "%d events were dropped here: the flow log could not keep up", &n); err != nil {
				t.Fatalf("mark %q: %v", ev.Error, err)
			}
			marks++
			lost += n
			pending += n
		case ConnectAttempt:
			if missing := ev.FlowID - last - 1; missing != pending {
				t.Fatalf("%d events missing before flow %d, %d marked", missing, ev.FlowID, pending)
			}
			last, pending = ev.FlowID, 0
		}
	}
	if last+pending != events {
		t.Errorf("the log ends at flow %d with %d marked lost after it, of %d", last, pending, events)
	}
	if marks == 0 || lost != w.Dropped() {
		t.Errorf("%d marks for %d lost, %d dropped", marks, lost, w.Dropped())
	}
}
