package capture

import (
	"bytes"
	"io"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/gopacket/gopacket/layers"
	"github.com/gopacket/gopacket/pcapgo"
	"gvisor.dev/gvisor/pkg/buffer"

	"github.com/childflow/childflow/internal/version"
)

// packetOf builds a buffer of views of the given sizes, as the relay's
// packets are: a few small header pieces and large payload pieces.
func packetOf(seed byte, sizes ...int) (buffer.Buffer, []byte) {
	var b buffer.Buffer
	var all []byte
	for i, n := range sizes {
		p := make([]byte, n)
		for j := range p {
			p[j] = seed + byte(i*7+j)
		}
		b.Append(buffer.NewViewWithData(p))
		all = append(all, p...)
	}
	return b, all
}

// TestWriterRecordsEveryPacket writes packets of many shapes, in more
// batches than one writev takes, and reads them back with pcapgo: on a
// disk's file system, written uncached, and on tmpfs, which refuses
// uncached writes.
func TestWriterRecordsEveryPacket(t *testing.T) {
	t.Run("disk", func(t *testing.T) { testWriterRecordsEveryPacket(t, t.TempDir()) })
	t.Run("tmpfs", func(t *testing.T) {
		dir, err := os.MkdirTemp("/dev/shm", "capture-test")
		if err != nil {
			t.Skipf("no tmpfs at /dev/shm: %v", err)
		}
		defer os.RemoveAll(dir)
		testWriterRecordsEveryPacket(t, dir)
	})
}

func testWriterRecordsEveryPacket(t *testing.T, dir string) {
	path := filepath.Join(dir, "c.pcapng")
	w, err := Create(path, View{Name: "child", Backend: "rootless", Interface: "cf0"})
	if err != nil {
		t.Fatal(err)
	}
	began := time.Now()
	shapes := [][]int{{20}, {41}, {40, 1}, {52, 1448}, {60, 32768, 32000}, {128, 256, 256, 512, 1024, 2048, 4096, 8192, 16384, 30000}, {3}}
	var want [][]byte
	var outbound []bool
	for i := 0; i < 3000; i++ {
		pkt, data := packetOf(byte(i), shapes[i%len(shapes)]...)
		out := i%3 == 0
		if i%5 == 0 {
			w.PacketCopy(out, data)
			pkt.Release()
		} else {
			w.Packet(out, pkt)
		}
		want, outbound = append(want, data), append(outbound, out)
		for w.queuedBytes() > maxQueued/2 {
			time.Sleep(time.Millisecond) // a bounded queue: let the writer catch up
		}
	}
	if w.Dropped() > 0 {
		t.Fatalf("dropped %d packets", w.Dropped())
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	ended := time.Now()
	st, err := os.Stat(path)
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("mode %v, %v", st.Mode(), err)
	}
	f, _ := os.Open(path)
	defer f.Close()
	r, err := pcapgo.NewNgReader(f, pcapgo.DefaultNgReaderOptions)
	if err != nil {
		t.Fatal(err)
	}
	ifc, err := r.Interface(0)
	if err != nil || ifc.Description != "childflow child view, rootless backend, interface cf0" ||
		ifc.Name != "cf0" || ifc.LinkType != layers.LinkTypeRaw || ifc.TimestampResolution != 9 {
		t.Fatalf("interface %+v, %v", ifc, err)
	}
	if app := r.SectionInfo().Application; app != "childflow "+version.Version {
		t.Fatalf("section application %q", app)
	}
	for i := 0; ; i++ {
		data, ci, opts, err := r.ReadPacketDataWithOptions()
		if err == io.EOF {
			if i != len(want) {
				t.Fatalf("read %d packets, wrote %d", i, len(want))
			}
			break
		}
		if err != nil {
			t.Fatalf("packet %d: %v", i, err)
		}
		if !bytes.Equal(data, want[i]) || ci.Length != len(want[i]) {
			t.Fatalf("packet %d: %d bytes differ from the %d written", i, len(data), len(want[i]))
		}
		dir := pcapgo.NgEpbFlagDirectionInbound
		if outbound[i] {
			dir = pcapgo.NgEpbFlagDirectionOutbound
		}
		if opts.Flags == nil || opts.Flags.Direction != dir {
			t.Fatalf("packet %d: flags %+v, want direction %v", i, opts.Flags, dir)
		}
		if ci.Timestamp.Before(began) || ci.Timestamp.After(ended) {
			t.Fatalf("packet %d: timestamp %v outside the run, %v to %v", i, ci.Timestamp, began, ended)
		}
	}
}

func (w *Writer) queuedBytes() int64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.bytes
}
