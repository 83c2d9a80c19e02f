// Package flowlog defines the engine's events and writes them as JSON
// Lines. Field names are upstream childflow's; new fields may be added,
// none renamed or removed.
package flowlog

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/childflow/childflow/internal/queue"
)

// SchemaVersion is written on every line.
const SchemaVersion = 1

// Event names.
const (
	DNSQuery        = "dns_query"
	DNSAnswer       = "dns_answer"
	ConnectAttempt  = "connect_attempt"
	ConnectResult   = "connect_result"
	PolicyViolation = "policy_violation"
	FlowEnd         = "flow_end"
	RuntimeFailure  = "runtime_failure"
)

// Event is one line of the flow log.
type Event struct {
	SchemaVersion int    `json:"schema_version"`
	TsMs          int64  `json:"ts_ms"`
	Event         string `json:"event"`
	Sandbox       string `json:"sandbox,omitempty"`
	PodNamespace  string `json:"pod_namespace,omitempty"`
	PodName       string `json:"pod_name,omitempty"`
	PodUID        string `json:"pod_uid,omitempty"`

	FlowID  uint64   `json:"flow_id,omitempty"`
	Proto   string   `json:"proto,omitempty"`
	Src     string   `json:"src,omitempty"`
	Dst     string   `json:"dst,omitempty"`
	DstIP   string   `json:"dst_ip,omitempty"`
	DstPort uint16   `json:"dst_port,omitempty"`
	Names   []string `json:"names,omitempty"`
	// PID and Comm name the process in the sandbox that owns the socket
	// (pid as seen inside the sandbox), where the engine can tell.
	PID      int    `json:"pid,omitempty"`
	Comm     string `json:"comm,omitempty"`
	Upstream string `json:"upstream,omitempty"`
	Proxy    string `json:"proxy,omitempty"`
	// ProxyHost is the name the proxy was asked to connect to.
	ProxyHost string `json:"proxy_host,omitempty"`

	Verdict       string `json:"verdict,omitempty"`
	ReasonCode    string `json:"reason_code,omitempty"`
	Control       string `json:"control,omitempty"`
	MatchedCIDR   string `json:"matched_cidr,omitempty"`
	MatchedDomain string `json:"matched_domain,omitempty"`

	QName   string   `json:"qname,omitempty"`
	QType   string   `json:"qtype,omitempty"`
	RCode   string   `json:"rcode,omitempty"`
	Answers []string `json:"answers,omitempty"`

	OK         *bool  `json:"ok,omitempty"`
	Error      string `json:"error,omitempty"`
	BytesUp    int64  `json:"bytes_up,omitempty"`
	BytesDown  int64  `json:"bytes_down,omitempty"`
	DurationMs int64  `json:"duration_ms,omitempty"`
	// ResetBy, at a TCP flow's end, is the side whose reset ended it
	// (ResetBySandbox, ResetByDestination); empty for a close.
	ResetBy string `json:"reset_by,omitempty"`
}

// The sides a reset comes from.
const (
	ResetBySandbox     = "sandbox"
	ResetByDestination = "destination"
)

// Now is the timestamp for events, in milliseconds.
func Now() int64 { return time.Now().UnixMilli() }

// Bool returns a pointer for the optional ok field.
func Bool(b bool) *bool { return &b }

// Writer writes events to a file from one goroutine; Log never blocks.
type Writer struct {
	f   io.Closer // nil for NewWriter
	q   *queue.Queue[Event]
	gap atomic.Uint64 // events dropped since the last mark was queued
	// err is the first write error (a full disk), after which nothing
	// more is written; the queue's goroutine sets it, Close reads it.
	err error
}

// Create opens path for writing: mode 0600, never through a symlink, never
// over something that is not a regular file.
func Create(path string) (*Writer, error) { return Open(path, Options{}) }

// Options say how Open treats the file.
type Options struct {
	// Append goes on where the file ends rather than starting it anew.
	Append bool
	// MaxSize, if set, bounds the file: once it holds MaxSize bytes it
	// becomes PATH.1 (PATH.1 becomes PATH.2, and so on) and a new one is
	// begun, between two lines. Keep files are kept, the one being
	// written included (at least one). A sandbox that loops on denied
	// connections must not fill the node's disk.
	MaxSize int64
	Keep    int
}

// Open opens path as Create does, with o.
func Open(path string, o Options) (*Writer, error) {
	f, err := openFile(path, !o.Append)
	if err != nil {
		return nil, err
	}
	if o.MaxSize <= 0 {
		w := NewWriter(f)
		w.f = f
		return w, nil
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	r := &rotating{path: path, f: f, max: o.MaxSize, keep: max(o.Keep, 1)}
	w := newWriter(f, r, st.Size())
	w.f = r
	return w, nil
}

// NewWriter writes events to out (a pipe, stdout); Close does not close it.
func NewWriter(out io.Writer) *Writer { return newWriter(out, nil, 0) }

// newWriter writes to out, which already holds size bytes; r, if set, is
// out's rotation.
func newWriter(out io.Writer, r *rotating, size int64) *Writer {
	bw := bufio.NewWriterSize(out, 64<<10)
	file := &counter{w: bw, n: size} // what the current file holds
	enc := json.NewEncoder(file)
	w := &Writer{}
	failed := func(err error) {
		if err != nil && w.err == nil {
			w.err = err
		}
	}
	encode := func(ev Event) {
		failed(enc.Encode(ev))
		if r != nil && file.n >= r.max {
			failed(bw.Flush())
			if r.rotate() == nil { // or on, to try again after the next line
				bw.Reset(r.f)
				file.n = 0
			}
		}
	}
	w.q = queue.Start(4096, encode, func() {
		if n := w.gap.Swap(0); n > 0 { // all queued before the gap is written
			encode(gapMark(n))
		}
		failed(bw.Flush())
	})
	return w
}

type counter struct {
	w io.Writer
	n int64
}

func (c *counter) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.n += int64(n)
	return n, err
}

// rotating is the file of a log with a size bound (Options.MaxSize).
type rotating struct {
	path string
	f    *os.File
	max  int64
	keep int
}

// rotate begins a new file; on an error the old one goes on.
func (r *rotating) rotate() error {
	next := r.path + ".next"
	f, err := openFile(next, true)
	if err != nil {
		return err
	}
	for i := r.keep - 1; i > 1; i-- {
		os.Rename(fmt.Sprintf("%s.%d", r.path, i-1), fmt.Sprintf("%s.%d", r.path, i))
	}
	if r.keep > 1 {
		err = os.Rename(r.path, r.path+".1")
	}
	if err == nil {
		err = os.Rename(next, r.path)
	}
	if err != nil {
		f.Close()
		os.Remove(next)
		return err
	}
	r.f.Close()
	r.f = f
	return nil
}

func (r *rotating) Close() error { return r.f.Close() }

// gapMark stands in the log for n events dropped at its place: whoever
// reads the log sees that it is not whole there, not only the count on
// stderr at the end.
func gapMark(n uint64) Event {
	return Event{SchemaVersion: SchemaVersion, TsMs: Now(), Event: RuntimeFailure,
		Error: fmt.Sprintf("%d events were dropped here: the flow log could not keep up", n)}
}

// CreateFile is the safe open shared by every output file.
func CreateFile(path string) (*os.File, error) { return openFile(path, true) }

// ErrNotAFile marks an output path that names something other than a
// regular file: the caller's mistake, said before anything is opened.
var ErrNotAFile = errors.New("not a regular file")

// CheckPath says what is wrong with path as an output file, before
// anything is created. The open itself (O_NOFOLLOW, the stat after it)
// still refuses what appears there meanwhile.
func CheckPath(path string) error {
	if path == "-" {
		return fmt.Errorf("- is standard output, %w: childflow writes its outputs to files (standard output is the command's)", ErrNotAFile)
	}
	st, err := os.Lstat(path)
	if err != nil || st.Mode().IsRegular() {
		return nil
	}
	what, why := "something else", ""
	switch m := st.Mode(); {
	case m&fs.ModeSymlink != 0:
		what, why = "a symbolic link", ": childflow never writes through one (name the file itself)"
	case m.IsDir():
		what = "a directory"
	case m&fs.ModeNamedPipe != 0:
		what = "a named pipe"
	case m&fs.ModeDevice != 0:
		what = "a device"
	case m&fs.ModeSocket != 0:
		what = "a socket"
	}
	return fmt.Errorf("%s is %s, %w%s", path, what, ErrNotAFile, why)
}

func openFile(path string, truncate bool) (*os.File, error) {
	if err := CheckPath(path); err != nil {
		return nil, err
	}
	flags := os.O_WRONLY | os.O_CREATE | syscall.O_NOFOLLOW | syscall.O_NONBLOCK
	if !truncate {
		flags |= os.O_APPEND
	} else if st, err := os.Lstat(path); err == nil && st.Mode().IsRegular() {
		// A new file rather than the old one emptied: a hard link to the
		// old one (made by a command sandboxed in an earlier run, say)
		// does not reach what this run writes. Where the directory is
		// not ours to change, the old file is emptied instead.
		if err := os.Remove(path); err == nil {
			flags |= os.O_EXCL
		}
	}
	f, err := os.OpenFile(path, flags, 0o600)
	if err != nil {
		return nil, fmt.Errorf("creating %s: %w", path, PathReason(err))
	}
	st, err := f.Stat()
	if err != nil || !st.Mode().IsRegular() {
		f.Close()
		return nil, fmt.Errorf("creating %s: %w", path, ErrNotAFile)
	}
	if truncate {
		if err := f.Truncate(0); err != nil {
			f.Close()
			return nil, fmt.Errorf("truncating %s: %w", path, PathReason(err))
		}
	}
	if err := f.Chmod(0o600); err != nil {
		f.Close()
		return nil, fmt.Errorf("making %s private (mode 0600): %w", path, PathReason(err))
	}
	return f, nil
}

// PathReason is err without the call and path an *fs.PathError adds,
// for a message that names the path itself.
func PathReason(err error) error {
	var pe *fs.PathError
	if errors.As(err, &pe) {
		return pe.Err
	}
	return err
}

// Log queues ev, filling in the schema version and timestamp.
func (w *Writer) Log(ev Event) {
	ev.SchemaVersion = SchemaVersion
	if ev.TsMs == 0 {
		ev.TsMs = Now()
	}
	// No event is queued after a gap before the gap's mark is.
	if n := w.gap.Swap(0); n > 0 && !w.q.Offer(gapMark(n)) {
		w.q.Drop()
		w.gap.Add(n + 1)
		return
	}
	if !w.q.Put(ev) {
		w.gap.Add(1)
	}
}

// Dropped is how many events did not fit the queue.
func (w *Writer) Dropped() uint64 { return w.q.Dropped() }

// Close writes what is queued and closes the file; its error is the
// first write's that failed, if one did (the file's, which names it).
func (w *Writer) Close() error {
	w.q.Close()
	err := w.err
	if w.f != nil {
		if cerr := w.f.Close(); err == nil {
			err = cerr
		}
	}
	return err
}
