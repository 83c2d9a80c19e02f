// Package capture writes the packets of one sandbox as pcapng. One
// goroutine owns the file; Packet never blocks the data path (a packet
// that does not fit the queue is dropped and counted).
package capture

import (
	"bufio"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/gopacket/gopacket"
	"github.com/gopacket/gopacket/layers"
	"github.com/gopacket/gopacket/pcapgo"

	"github.com/childflow/childflow/engine/flowlog"
	"github.com/childflow/childflow/internal/queue"
	"github.com/childflow/childflow/internal/version"
)

type packet struct {
	ts       time.Time
	outbound bool
	data     *[]byte // from bufs, returned once written
}

// bufs recycles packet copies: at several Gbit/s, a fresh allocation per
// packet would keep the garbage collector busy on the relay's cores.
var bufs = sync.Pool{New: func() any { b := make([]byte, 0, 64<<10); return &b }}

// Writer is one pcapng file with one interface.
type Writer struct {
	q         *queue.Queue[packet]
	queued    atomic.Int64 // bytes waiting in q
	err       error        // the first write error, read after Close
	closeFile func() error
}

// View describes the capture point, written as the interface description
// so a reader knows what it is looking at.
type View struct {
	Name      string // child, egress, wire-egress
	Backend   string // rootless, root
	Interface string // cf0, ...
}

func (v View) description() string {
	return fmt.Sprintf("childflow %s view, %s backend, interface %s", v.Name, v.Backend, v.Interface)
}

// Create opens path (0600, never through a symlink) and writes the
// section and interface headers.
func Create(path string, v View) (*Writer, error) {
	f, err := flowlog.CreateFile(path)
	if err != nil {
		return nil, err
	}
	bw := bufio.NewWriterSize(f, 256<<10)
	ng, err := pcapgo.NewNgWriterInterface(bw, pcapgo.NgInterface{
		Name: v.Interface, Description: v.description(), LinkType: layers.LinkTypeRaw,
		TimestampResolution: 9, // nanoseconds
	}, pcapgo.NgWriterOptions{SectionInfo: pcapgo.NgSectionInfo{Application: "childflow " + version.Version}})
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("writing pcapng header to %s: %w", path, err)
	}
	w := &Writer{closeFile: f.Close}
	in, out := pcapgo.NgEpbFlagDirectionInbound, pcapgo.NgEpbFlagDirectionOutbound
	write := func(p packet) {
		data := *p.data
		defer bufs.Put(p.data)
		w.queued.Add(-int64(len(data)))
		flags := pcapgo.NgEpbFlags{Direction: in}
		if p.outbound {
			flags.Direction = out
		}
		ci := gopacket.CaptureInfo{Timestamp: p.ts, CaptureLength: len(data), Length: len(data)}
		if err := ng.WritePacketWithOptions(ci, data, pcapgo.NgPacketOptions{Flags: &flags}); err != nil && w.err == nil {
			w.err = err
		}
	}
	flush := func() {
		ng.Flush()
		bw.Flush()
	}
	w.q = queue.Start(8192, write, flush)
	return w, nil
}

// maxQueued bounds the memory a slow disk can make the capture hold.
const maxQueued = 32 << 20

// Packet queues a copy of one IP packet given in parts; outbound means
// sent by the sandbox (child view) or to the remote end (egress views).
func (w *Writer) Packet(outbound bool, parts [][]byte) {
	n := 0
	for _, p := range parts {
		n += len(p)
	}
	if w.queued.Add(int64(n)) > maxQueued {
		w.queued.Add(-int64(n))
		w.q.Drop()
		return
	}
	bp := bufs.Get().(*[]byte)
	data := (*bp)[:0]
	for _, p := range parts {
		data = append(data, p...)
	}
	*bp = data
	if !w.q.Put(packet{ts: time.Now(), outbound: outbound, data: bp}) {
		w.queued.Add(-int64(n))
		bufs.Put(bp)
	}
}

// Dropped is how many packets did not fit the queue.
func (w *Writer) Dropped() uint64 { return w.q.Dropped() }

// Close writes what is queued and closes the file.
func (w *Writer) Close() error {
	w.q.Close()
	if err := w.closeFile(); err != nil && w.err == nil {
		w.err = err
	}
	return w.err
}
