// Package capture writes the packets of one sandbox as pcapng. One
// goroutine owns the file; Packet never blocks the data path (a packet
// that does not fit the queue is dropped and counted).
package capture

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/buffer"

	"github.com/childflow/childflow/engine/flowlog"
	"github.com/childflow/childflow/internal/version"
)

type packet struct {
	ts       int64 // Unix nanoseconds
	outbound bool
	data     buffer.Buffer // the Writer's reference, released once written
}

// Writer is one pcapng file with one interface.
//
// Packets wait in a list that the writing goroutine takes whole when a
// write's worth has gathered or a tick has passed: woken for each packet,
// it would cost the relay a thread switch per packet.
type Writer struct {
	mu      sync.Mutex
	waiting []packet
	bytes   int64 // in waiting
	closed  bool
	wake    chan struct{}
	done    chan struct{}
	dropped atomic.Uint64

	file *os.File
	out  blocks
	err  error // the first write error, read after Close
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
	h := header(v) // shorter than a page: the first write rewrites it
	if _, err := f.Write(h); err != nil {
		f.Close()
		return nil, fmt.Errorf("writing pcapng header to %s: %w", path, err)
	}
	w := &Writer{file: f, out: blocks{fd: int(f.Fd()), end: int64(len(h)), lastPage: h}, wake: make(chan struct{}, 1), done: make(chan struct{})}
	go w.run()
	return w, nil
}

const (
	// maxQueued bounds the memory a slow disk can make the capture hold.
	maxQueued = 32 << 20
	// tick is how long a packet may wait to be written: after a crash
	// the file holds what came before.
	tick = 50 * time.Millisecond
)

// Packet queues one IP packet, sent by the sandbox (outbound, child view)
// or to the remote end (egress views). The Writer takes over data and
// releases it: the bytes go from the relay's buffers to the file without
// a copy of their own.
func (w *Writer) Packet(outbound bool, data buffer.Buffer) {
	n := data.Size()
	w.mu.Lock()
	if w.closed || w.bytes+n > maxQueued {
		w.mu.Unlock()
		w.dropped.Add(1)
		data.Release()
		return
	}
	first := w.bytes == 0
	w.waiting = append(w.waiting, packet{ts: time.Now().UnixNano(), outbound: outbound, data: data})
	w.bytes += n
	full := w.bytes >= maxBatch && w.bytes-n < maxBatch
	w.mu.Unlock()
	if first || full {
		w.poke()
	}
}

// poke wakes the writing goroutine, unless a wake-up is already pending.
func (w *Writer) poke() {
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

// PacketCopy queues a copy of b, for callers that reuse their buffer.
func (w *Writer) PacketCopy(outbound bool, b []byte) {
	w.Packet(outbound, buffer.MakeWithData(b))
}

func (w *Writer) run() {
	defer close(w.done)
	fill := time.NewTimer(tick)
	fill.Stop()
	var batch []packet
	for {
		// Asleep until a batch's first packet: an idle sandbox's capture
		// costs no wake-ups.
		<-w.wake
		w.mu.Lock()
		hurry := w.closed || w.bytes >= maxBatch
		w.mu.Unlock()
		if !hurry {
			fill.Reset(tick)
			select {
			case <-w.wake: // full, or Close
			case <-fill.C:
			}
			fill.Stop()
		}
		w.mu.Lock()
		batch, w.waiting = w.waiting, batch[:0]
		w.bytes = 0
		closed := w.closed
		w.mu.Unlock()
		for _, p := range batch {
			w.write(p)
		}
		clear(batch)
		if n := w.dropped.Load(); closed && n > 0 && w.err == nil {
			w.out.addBlock(statistics(n, time.Now().UnixNano()))
		}
		w.flush()
		if closed {
			return
		}
	}
}

func (w *Writer) write(p packet) {
	if w.err != nil {
		p.data.Release()
		return
	}
	if w.out.full(p.data) {
		w.flush()
	}
	w.out.add(p)
}

func (w *Writer) flush() {
	if err := w.out.flush(); err != nil && w.err == nil {
		w.err = fmt.Errorf("writing %s: %w", w.file.Name(), err)
	}
}

// Dropped is how many packets did not fit the queue, or were Lost.
func (w *Writer) Dropped() uint64 { return w.dropped.Load() }

// Lost counts n packets lost before they reached the Writer (a full
// packet socket's): the file says they are missing, as it does of those
// dropped here.
func (w *Writer) Lost(n uint64) { w.dropped.Add(n) }

// Close writes what is queued and closes the file. Packets given after
// Close are dropped.
func (w *Writer) Close() error {
	w.mu.Lock()
	already := w.closed
	w.closed = true
	w.mu.Unlock()
	if already {
		return w.err
	}
	w.poke()
	<-w.done
	if err := w.out.release(); err != nil && w.err == nil {
		w.err = fmt.Errorf("writing %s: %w", w.file.Name(), err)
	}
	if err := w.file.Close(); err != nil && w.err == nil {
		w.err = err
	}
	return w.err
}

// header is the file's section header block and its one interface
// description block: raw IP packets, nanosecond timestamps. Written here
// like the packet blocks below, rather than through gopacket's pcapgo
// (which the tests read the files back with): its layers package's
// initialisation added ~0.4 ms to every childflow start, capture or not.
func header(v View) []byte {
	le := binary.LittleEndian
	var shb []byte
	shb = le.AppendUint32(shb, 0x1a2b3c4d) // byte-order magic
	shb = le.AppendUint16(shb, 1)          // version 1.0
	shb = le.AppendUint16(shb, 0)
	shb = le.AppendUint64(shb, ^uint64(0)) // section length not given
	var idb []byte
	idb = le.AppendUint16(idb, 101) // LINKTYPE_RAW
	idb = le.AppendUint16(idb, 0)
	idb = le.AppendUint32(idb, 0) // no snap length

	// shb_userappl; if_name, if_description, if_tsresol (nanoseconds)
	b := block(nil, 0x0a0d0d0a, shb, option(4, []byte("childflow "+version.Version)))
	return block(b, 1, idb,
		option(2, []byte(v.Interface)), option(3, []byte(v.description())), option(9, []byte{9}))
}

// statistics is the interface statistics block closing a capture that
// dropped packets: isb_ifdrop, which Wireshark shows as the interface's
// dropped packets, so the file itself says it is not whole.
func statistics(dropped uint64, ts int64) []byte {
	le := binary.LittleEndian
	var isb []byte
	isb = le.AppendUint32(isb, 0) // interface
	isb = le.AppendUint32(isb, uint32(ts>>32))
	isb = le.AppendUint32(isb, uint32(ts))
	return block(nil, 5, isb, option(5, le.AppendUint64(nil, dropped)))
}

// block appends a pcapng block of kind with body and options to b.
func block(b []byte, kind uint32, body []byte, opts ...[]byte) []byte {
	le := binary.LittleEndian
	n := 12 + len(body)
	for _, o := range opts {
		n += len(o)
	}
	n += 4 // end of options
	b = le.AppendUint32(b, kind)
	b = le.AppendUint32(b, uint32(n))
	b = append(b, body...)
	for _, o := range opts {
		b = append(b, o...)
	}
	b = le.AppendUint32(b, 0)
	return le.AppendUint32(b, uint32(n))
}

// option is one pcapng option, padded to 32 bits.
func option(code uint16, value []byte) []byte {
	le := binary.LittleEndian
	o := le.AppendUint16(nil, code)
	o = le.AppendUint16(o, uint16(len(value)))
	o = append(o, value...)
	return append(o, make([]byte, (4-len(value)&3)&3)...)
}

// blocks gathers enhanced packet blocks (pcapng's packet records:
// little-endian, interface 0, a direction flag) and
// writes a batch of them with one pwritev. Headers, trailers and small
// pieces of packets are copied into one scratch buffer; the large pieces
// are written from the packets' own buffers.
//
// Every write starts on a page boundary: the file's incomplete last page
// is kept and written again ahead of the batch. An uncached write drops
// its pages once they are on disk, and a later write into the middle of
// one has the file system read it back first: a synchronous disk read
// per batch.
type blocks struct {
	fd       int
	iov      [][]byte
	scratch  []byte
	inTail   bool // the last iov is the scratch buffer's tail
	held     []buffer.Buffer
	size     int64 // bytes in the batch
	cached   bool  // uncached writes were refused
	end      int64 // the file's size
	reserved int64 // blocks allocated up to here (-1: the file system refused)
	lastPage []byte
	spare    []byte // the next lastPage, gathered while this one is written
}

const (
	maxIov = 1000 // below the kernel's IOV_MAX of 1024
	// maxBatch is a write's worth, and what wakes the writer: each wake
	// and write takes the engine's one processor from the relay. A
	// captured stream went 11% faster with 1 MiB than with 256 KiB
	// (docs/benchmarks.md).
	maxBatch    = 1 << 20
	scratchSize = 64 << 10
	copyBelow   = 512 // smaller pieces are copied, not given an iov
	pageSize    = 4096
	// uncachedFrom is the smallest batch written uncached. Smaller ones,
	// a tick's trickle, stay cached: the next write may end inside the
	// same page, which would then have to be read back.
	uncachedFrom = 64 << 10
	reserveAhead = 64 << 20
	epbHeaderLen = 28
	epbTrailMax  = 3 + 12 + 4 // padding, flags option, end of options, block length
)

// full reports whether the batch should be written before data joins it.
func (b *blocks) full(data buffer.Buffer) bool {
	views := data.AsViewList()
	return b.size > 0 && b.size+data.Size() > maxBatch ||
		len(b.iov)+views.Len()+2 > maxIov || len(b.scratch) > scratchSize-1024
}

func (b *blocks) add(p packet) {
	n := int(p.data.Size())
	pad := (4 - n&3) & 3
	length := uint32(epbHeaderLen + n + pad + 12 + 4)
	le := binary.LittleEndian
	var h [epbHeaderLen]byte
	le.PutUint32(h[0:], 6) // enhanced packet block
	le.PutUint32(h[4:], length)
	le.PutUint32(h[8:], 0) // interface
	le.PutUint32(h[12:], uint32(p.ts>>32))
	le.PutUint32(h[16:], uint32(p.ts))
	le.PutUint32(h[20:], uint32(n)) // captured
	le.PutUint32(h[24:], uint32(n)) // on the wire
	b.copyIn(h[:])
	views := p.data.AsViewList()
	for v := views.Front(); v != nil; v = v.Next() {
		if s := v.AsSlice(); len(s) < copyBelow {
			b.copyIn(s)
		} else {
			b.iov = append(b.iov, s)
			b.inTail = false
		}
	}
	direction := uint32(1) // inbound
	if p.outbound {
		direction = 2
	}
	var t [epbTrailMax]byte
	le.PutUint16(t[pad:], 2) // epb_flags
	le.PutUint16(t[pad+2:], 4)
	le.PutUint32(t[pad+4:], direction)
	// end of options: four zero bytes
	le.PutUint32(t[pad+12:], length)
	b.copyIn(t[:pad+16])
	b.held = append(b.held, p.data)
	b.size += int64(length)
}

// addBlock adds a block made whole elsewhere to the batch.
func (b *blocks) addBlock(s []byte) {
	b.copyIn(s)
	b.size += int64(len(s))
}

func (b *blocks) copyIn(s []byte) {
	if len(b.scratch)+len(s) > cap(b.scratch) {
		// A new scratch buffer; the iovs already taken keep the old one.
		b.scratch = make([]byte, 0, max(scratchSize, len(s)))
		b.inTail = false
	}
	start := len(b.scratch)
	b.scratch = append(b.scratch, s...)
	if b.inTail {
		last := &b.iov[len(b.iov)-1]
		*last = (*last)[:len(*last)+len(s)]
		return
	}
	b.iov = append(b.iov, b.scratch[start:])
	b.inTail = true
}

// write writes iov at pos, uncached where the kernel and the file system
// can (Linux 6.14; older kernels refuse the flag, tmpfs the uncached
// write).
func (b *blocks) write(iov [][]byte, pos int64) (int, error) {
	if !b.cached && b.size >= uncachedFrom {
		n, err := unix.Pwritev2(b.fd, iov, pos, unix.RWF_DONTCACHE)
		if err != unix.EOPNOTSUPP && err != unix.EINVAL && err != unix.ENOSYS {
			b.reserve()
			return n, err
		}
		b.cached = true
	}
	return unix.Pwritev(b.fd, iov, pos)
}

// reserve allocates the file's blocks a stretch ahead of its end: on a
// disk, allocated one write at a time (ext4's delayed allocation,
// reserving block by block) they cost the writer more CPU. Only where
// uncached writes go, a disk's file system: tmpfs would hold the stretch
// in memory. Close gives back what was not written.
func (b *blocks) reserve() {
	if b.reserved < 0 || b.end+maxBatch <= b.reserved {
		return
	}
	if err := unix.Fallocate(b.fd, unix.FALLOC_FL_KEEP_SIZE, b.reserved, reserveAhead); err != nil {
		b.reserved = -1
		return
	}
	b.reserved += reserveAhead
}

// release gives back the blocks reserved beyond the file's end: cut to
// the size it has (a failed write may have ended before b.end), which
// changes none of its bytes.
func (b *blocks) release() error {
	if b.reserved <= 0 {
		return nil
	}
	b.reserved = 0
	var st unix.Stat_t
	if err := unix.Fstat(b.fd, &st); err != nil {
		return err
	}
	return unix.Ftruncate(b.fd, st.Size)
}

// flush writes the batch after the file's last page, whole blocks only
// unless the disk fails, and releases its packets.
func (b *blocks) flush() error {
	if len(b.iov) == 0 {
		return nil
	}
	iov := append([][]byte{b.lastPage}, b.iov...)
	pos := b.end - int64(len(b.lastPage))
	b.end += b.size
	next := gatherTail(b.spare[:0], iov, int(b.end%pageSize))
	var err error
	for len(iov) > 0 {
		n, werr := b.write(iov, pos)
		if werr == unix.EINTR {
			continue
		}
		if werr != nil {
			err = werr
			break
		}
		if n == 0 {
			err = errors.New("short write")
			break
		}
		pos += int64(n)
		for n > 0 && len(iov) > 0 {
			if n < len(iov[0]) {
				iov[0] = iov[0][n:]
				break
			}
			n -= len(iov[0])
			iov = iov[1:]
		}
	}
	b.lastPage, b.spare = next, b.lastPage
	for i := range b.held {
		b.held[i].Release()
	}
	clear(b.iov)
	b.iov, b.held, b.scratch, b.inTail, b.size = b.iov[:0], b.held[:0], b.scratch[:0], false, 0
	return err
}

// gatherTail appends the last n bytes of iov to dst.
func gatherTail(dst []byte, iov [][]byte, n int) []byte {
	i, skip := len(iov), 0
	for have := 0; have < n && i > 0; {
		i--
		have += len(iov[i])
		skip = have - n // iov[i]'s bytes before the tail
	}
	if i == len(iov) {
		return dst
	}
	dst = append(dst, iov[i][max(skip, 0):]...)
	for _, v := range iov[i+1:] {
		dst = append(dst, v...)
	}
	return dst
}
