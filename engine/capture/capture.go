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
	"github.com/childflow/childflow/internal/version"
)

type packet struct {
	ts       time.Time
	outbound bool
	data     []byte
}

// Writer is one pcapng file with one interface.
type Writer struct {
	ch      chan packet
	queued  atomic.Int64 // bytes waiting in ch
	done    chan struct{}
	dropped atomic.Uint64
	once    sync.Once
	err     error
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
	w := &Writer{ch: make(chan packet, 8192), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		in, out := pcapgo.NgEpbFlagDirectionInbound, pcapgo.NgEpbFlagDirectionOutbound
		for p := range w.ch {
			w.queued.Add(-int64(len(p.data)))
			flags := pcapgo.NgEpbFlags{Direction: in}
			if p.outbound {
				flags.Direction = out
			}
			ci := gopacket.CaptureInfo{Timestamp: p.ts, CaptureLength: len(p.data), Length: len(p.data)}
			if err := ng.WritePacketWithOptions(ci, p.data, pcapgo.NgPacketOptions{Flags: &flags}); err != nil && w.err == nil {
				w.err = err
			}
			// Flush when the queue is drained: after a crash the file
			// ends on a complete block.
			if len(w.ch) == 0 {
				ng.Flush()
				bw.Flush()
			}
		}
		ng.Flush()
		bw.Flush()
		if err := f.Close(); err != nil && w.err == nil {
			w.err = err
		}
	}()
	return w, nil
}

// maxQueued bounds the memory a slow disk can make the capture hold.
const maxQueued = 32 << 20

// Packet queues one IP packet; outbound means sent by the sandbox. data
// must not be reused by the caller.
func (w *Writer) Packet(outbound bool, data []byte) {
	if w.queued.Add(int64(len(data))) > maxQueued {
		w.queued.Add(-int64(len(data)))
		w.dropped.Add(1)
		return
	}
	select {
	case w.ch <- packet{ts: time.Now(), outbound: outbound, data: data}:
	default:
		w.queued.Add(-int64(len(data)))
		w.dropped.Add(1)
	}
}

// Dropped is how many packets did not fit the queue.
func (w *Writer) Dropped() uint64 { return w.dropped.Load() }

// Close writes what is queued and closes the file.
func (w *Writer) Close() error {
	w.once.Do(func() { close(w.ch) })
	<-w.done
	return w.err
}
