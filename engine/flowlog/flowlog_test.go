package flowlog

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/childflow/childflow/policy"
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

// A bounded log keeps its newest events in Keep files of about MaxSize
// bytes each, whole lines only, the oldest dropped; a log appended to
// counts what it already holds.
func TestBoundedLogKeepsTheNewestWholeLines(t *testing.T) {
	for _, appended := range []bool{false, true} {
		dir := t.TempDir()
		path := filepath.Join(dir, "sb.jsonl")
		const maxSize, keep, events = 4096, 3, 2000
		if appended {
			os.WriteFile(path, []byte(strings.Repeat(`{"event":"earlier"}`+"\n", 150)), 0o600)
		}
		w, err := Open(path, Options{Append: appended, MaxSize: maxSize, Keep: keep})
		if err != nil {
			t.Fatal(err)
		}
		for i := range events {
			w.Log(Event{Event: ConnectAttempt, FlowID: uint64(i + 1)})
			if i%100 == 0 {
				time.Sleep(time.Millisecond) // let the writer keep up: nothing is dropped
			}
		}
		w.Close()
		if w.Dropped() != 0 {
			t.Fatalf("%d dropped", w.Dropped())
		}
		var ids []uint64
		for _, name := range []string{path + ".2", path + ".1", path} {
			b, err := os.ReadFile(name)
			if err != nil {
				t.Fatal(err)
			}
			if len(b) > maxSize+200 {
				t.Errorf("%s holds %d bytes, bound %d", name, len(b), maxSize)
			}
			for _, line := range strings.Split(strings.TrimSuffix(string(b), "\n"), "\n") {
				var ev Event
				if err := json.Unmarshal([]byte(line), &ev); err != nil {
					t.Fatalf("%s: line %q: %v", name, line, err)
				}
				if ev.Event == ConnectAttempt {
					ids = append(ids, ev.FlowID)
				}
			}
		}
		if _, err := os.Stat(path + ".3"); err == nil {
			t.Errorf("%s.3 kept: more than %d files", path, keep)
		}
		if left, _ := os.ReadDir(dir); len(left) != keep {
			t.Errorf("%d files in the directory, want %d", len(left), keep)
		}
		if len(ids) == 0 || ids[len(ids)-1] != events || len(ids) > events/2 {
			t.Fatalf("kept %d events ending at %v, want the newest of %d", len(ids), ids[len(ids)-1:], events)
		}
		for i := 1; i < len(ids); i++ {
			if ids[i] != ids[i-1]+1 {
				t.Fatalf("event %d follows %d: the kept events are not the newest, in order", ids[i], ids[i-1])
			}
		}
	}

	// What an appended file already holds counts towards its bound.
	path := filepath.Join(t.TempDir(), "sb.jsonl")
	os.WriteFile(path, []byte(strings.Repeat(`{"event":"earlier"}`+"\n", 200)), 0o600) // 4000 bytes
	w, err := Open(path, Options{Append: true, MaxSize: 4096, Keep: 2})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 5 {
		w.Log(Event{Event: ConnectAttempt, FlowID: uint64(i + 1)})
	}
	w.Close()
	if b, err := os.ReadFile(path + ".1"); err != nil || !strings.HasPrefix(string(b), `{"event":"earlier"}`) {
		t.Errorf("the appended file was not rotated at its bound: %v", err)
	}
}

// A log that cannot be written (a full disk: /dev/full says so to every
// write) says so when it is closed, naming the file, rather than losing
// its events quietly.
func TestAFullDiskIsCloseError(t *testing.T) {
	f, err := os.OpenFile("/dev/full", os.O_WRONLY, 0) // every Linux has it
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	w := NewWriter(f)
	for i := range 10 {
		w.Log(Event{Event: ConnectAttempt, FlowID: uint64(i)})
	}
	if err := w.Close(); err == nil || !strings.Contains(err.Error(), "/dev/full") || !strings.Contains(err.Error(), "no space left on device") {
		t.Errorf("Close after writes to /dev/full: %v", err)
	}
}

// TestAFileThatCannotBeMadeIsNamedOnce: the error names the path once,
// with what failed, and still says why (a missing directory is
// fs.ErrNotExist to its callers).
func TestAFileThatCannotBeMadeIsNamedOnce(t *testing.T) {
	path := filepath.Join(t.TempDir(), "missing", "flows.jsonl")
	_, err := Create(path)
	if err == nil || strings.Count(err.Error(), path) != 1 || !strings.HasPrefix(err.Error(), "creating "+path+": ") || !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("creating a file in a missing directory: %v; want %q once, after \"creating\", and fs.ErrNotExist", err, path)
	}
}

// An ICMP flow's source is logged without the echo identifier the
// engines find its process by: it is no port of the flow's.
func TestAnICMPFlowHasNoPorts(t *testing.T) {
	var e Emitter
	src, dst := netip.MustParseAddrPort("10.87.0.2:4660"), netip.MustParseAddrPort("203.0.113.10:0")
	if ev := e.Flow(policy.ICMP, src, dst, nil); ev.Src != "10.87.0.2:0" || ev.Dst != "203.0.113.10:0" || ev.FlowID != 1 {
		t.Errorf("ICMP: %+v", ev)
	}
	if ev := e.Flow(policy.UDP, src, netip.MustParseAddrPort("203.0.113.10:53"), nil); ev.Src != "10.87.0.2:4660" || ev.DstPort != 53 || ev.FlowID != 2 {
		t.Errorf("UDP: %+v", ev)
	}
}
