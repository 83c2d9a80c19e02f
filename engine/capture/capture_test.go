package capture

import (
	"bytes"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/gopacket/gopacket/layers"
	"github.com/gopacket/gopacket/pcapgo"
	"golang.org/x/sys/unix"
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
	t.Run("disk", func(t *testing.T) { testWriterRecordsEveryPacket(t, diskDir(t), true) })
	t.Run("tmpfs", func(t *testing.T) {
		dir, err := os.MkdirTemp("/dev/shm", "capture-test")
		if err != nil {
			t.Fatalf("no tmpfs at /dev/shm: %v", err)
		}
		defer os.RemoveAll(dir)
		testWriterRecordsEveryPacket(t, dir, false)
	})
}

// diskDir is a temporary directory on a disk's file system: t.TempDir(),
// unless that is on tmpfs (as /tmp is on Debian 13), then one in
// /var/tmp, which distributions keep on disk.
func diskDir(t *testing.T) string {
	if dir := t.TempDir(); !onTmpfs(t, dir) {
		return dir
	}
	dir, err := os.MkdirTemp("/var/tmp", "capture-test")
	if err != nil {
		t.Fatalf("no directory on a disk's file system: %v", err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if onTmpfs(t, dir) {
		t.Fatalf("no directory on a disk's file system: %s and %s are on tmpfs", os.TempDir(), dir)
	}
	return dir
}

func onTmpfs(t *testing.T, dir string) bool {
	var fs unix.Statfs_t
	if err := unix.Statfs(dir, &fs); err != nil {
		t.Fatal(err)
	}
	return fs.Type == unix.TMPFS_MAGIC
}

// reserves says whether the writer is to allocate blocks ahead on dir's
// file system, which tmpfs would hold in memory.
func testWriterRecordsEveryPacket(t *testing.T, dir string, reserves bool) {
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
	var written unix.Stat_t
	if err := unix.Stat(path, &written); err != nil {
		t.Fatal(err)
	}
	if ahead := written.Blocks*512 > written.Size+maxBatch; ahead != reserves {
		t.Errorf("%d bytes allocated to %d written; want blocks reserved ahead: %v", written.Blocks*512, written.Size, reserves)
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

// TestWritesDoNotReadBack writes batches that end inside a page and puts
// each on disk before the next: an uncached write's pages are gone by
// then, and a write that began inside one would have the file system
// read it back first, into reserved blocks as into new ones.
func TestWritesDoNotReadBack(t *testing.T) {
	runtime.LockOSThread() // the read is counted to the thread
	defer runtime.UnlockOSThread()
	path := filepath.Join(diskDir(t), "c.pcapng")
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := header(View{Name: "child", Backend: "rootless", Interface: "cf0"})
	if _, err := f.Write(h); err != nil {
		t.Fatal(err)
	}
	b := blocks{fd: int(f.Fd()), end: int64(len(h)), lastPage: h}
	// The file's blocks reserved, as the writer has them after its first
	// write: allocating them may read the file system's bitmaps, once.
	b.reserve()
	if b.reserved != reserveAhead {
		t.Fatalf("no blocks reserved (%d)", b.reserved)
	}
	var want [][]byte
	var read int64 // by the writes; putting them on disk may read metadata
	for i := range 20 {
		for b.size < maxBatch-100<<10 {
			pkt, data := packetOf(byte(i), 60, 32768, 1000+i)
			b.add(packet{ts: time.Now().UnixNano(), data: pkt})
			want = append(want, data)
		}
		if (b.end+b.size)%pageSize == 0 {
			t.Fatalf("batch %d ends on a page boundary", i)
		}
		before := threadReadBytes(t)
		if err := b.flush(); err != nil {
			t.Fatal(err)
		}
		read += threadReadBytes(t) - before
		if err := unix.Fdatasync(b.fd); err != nil {
			t.Fatal(err)
		}
	}
	if read != 0 {
		t.Fatalf("the file system read %d bytes back while writing", read)
	}

	r, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	ng, err := pcapgo.NewNgReader(r, pcapgo.DefaultNgReaderOptions)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; ; i++ {
		data, _, err := ng.ReadPacketData()
		if err == io.EOF && i == len(want) {
			break
		}
		if err != nil || !bytes.Equal(data, want[i]) {
			t.Fatalf("packet %d of %d: %d bytes, %v", i, len(want), len(data), err)
		}
	}
}

// threadReadBytes is what this thread has had read from storage.
func threadReadBytes(t *testing.T) int64 {
	io, err := os.ReadFile("/proc/thread-self/io")
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.Lines(string(io)) {
		if v, ok := strings.CutPrefix(line, "read_bytes: "); ok {
			n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			return n
		}
	}
	t.Fatalf("no read_bytes in /proc/thread-self/io")
	return 0
}

// TestBlocksAreReservedAheadAndGivenBack: on a disk's file system the
// writer allocates the file's blocks ahead of its end while it writes,
// and the file holds no more than its size once closed.
func TestBlocksAreReservedAheadAndGivenBack(t *testing.T) {
	path := filepath.Join(diskDir(t), "c.pcapng")
	w, err := Create(path, View{Name: "child", Backend: "rootless", Interface: "cf0"})
	if err != nil {
		t.Fatal(err)
	}
	pkt, _ := packetOf(1, 60000)
	for range 40 {
		w.Packet(false, pkt.Clone())
	}
	pkt.Release()
	var st unix.Stat_t
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if err := unix.Stat(path, &st); err != nil {
			t.Fatal(err)
		}
		if st.Size >= 40*60000 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d bytes written after 5 s", st.Size)
		}
	}
	if st.Blocks*512 < reserveAhead {
		t.Errorf("%d bytes allocated to a file of %d while written, want %d reserved ahead", st.Blocks*512, st.Size, reserveAhead)
	}
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	// st_blocks counts the file system's own blocks for the file too: an
	// extent tree's, once the written and reserved stretches split the
	// file into more extents than its inode holds. A few of those, never
	// a stretch reserved ahead.
	const metadata = 64 << 10
	if roundUp := (st.Size + pageSize - 1) / pageSize * pageSize; st.Blocks*512 > roundUp+metadata {
		t.Errorf("%d bytes allocated to a closed file of %d", st.Blocks*512, st.Size)
	}
}

// A capture that dropped packets (more than maxQueued waiting for the
// disk) says so in the file: an interface statistics block whose
// isb_ifdrop is the number dropped, after every packet kept.
func TestDroppedPacketsAreInTheFile(t *testing.T) {
	path := filepath.Join(t.TempDir(), "c.pcapng")
	w, err := Create(path, View{Name: "child", Backend: "rootless", Interface: "cf0"})
	if err != nil {
		t.Fatal(err)
	}
	pkt, _ := packetOf(1, 60000)
	for i := 0; i < 4*maxQueued/60000; i++ { // clones cost nothing: the queue fills
		w.Packet(false, pkt.Clone())
	}
	pkt.Release()
	if err := w.Close(); err != nil {
		t.Fatal(err)
	}
	dropped := w.Dropped()
	if dropped == 0 {
		t.Fatal("nothing dropped")
	}
	f, _ := os.Open(path)
	defer f.Close()
	var stats []pcapgo.NgInterfaceStatistics
	opts := pcapgo.DefaultNgReaderOptions
	opts.StatisticsCallback = func(_ int, s pcapgo.NgInterfaceStatistics) { stats = append(stats, s) }
	r, err := pcapgo.NewNgReader(f, opts)
	if err != nil {
		t.Fatal(err)
	}
	kept := 0
	for {
		if _, _, err := r.ReadPacketData(); err == io.EOF {
			break
		} else if err != nil {
			t.Fatalf("packet %d: %v", kept, err)
		}
		kept++
	}
	if len(stats) != 1 || stats[0].PacketsDropped != dropped || kept == 0 {
		t.Fatalf("statistics %+v after %d packets, want one block with %d dropped", stats, kept, dropped)
	}
	if out, err := exec.Command("tshark", "-r", path, "-q").CombinedOutput(); err != nil {
		t.Errorf("tshark: %v\n%s", err, out)
	}
}
