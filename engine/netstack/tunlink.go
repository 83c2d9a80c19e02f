package netstack

import (
	"encoding/binary"
	"fmt"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/rawfile"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/link/stopfd"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// tunLink is the stack's link on the sandbox's TUN queue (in tests, a
// datagram socket): one packet per read or write, no link header.
//
// On a TUN opened with IFF_VNET_HDR (package tun does) every packet
// carries a virtio-net header, and the device offers TSO: the sandbox's
// kernel hands over TCP segments of up to 64 KiB, and the stack writes
// segments of up to 64 KiB, which the sandbox's kernel takes in whole
// (for local delivery nothing is ever cut into MTU-sized packets). At
// an MTU of 1500 that is the difference between one system call and
// one trip through each stack per 1.5 KiB or per 64 KiB. gVisor's fdbased
// endpoint offers this for packet sockets only.
type tunLink struct {
	fd   int
	mtu  uint32
	vnet bool
	stop stopfd.StopFD
	// poller, when set, waits for packets in Go's netpoller on a dup of
	// fd (closed to stop), instead of in ppoll on fd and stop.
	poller *os.File

	mu         sync.Mutex
	dispatcher stack.NetworkDispatcher
	received   atomic.Uint64 // packets read from the TUN and delivered
	delivering atomic.Bool   // a packet read is not yet delivered
	stopped    bool
	closed     bool
	wg         sync.WaitGroup
}

// vnetHdrLen is sizeof(struct virtio_net_hdr), the TUN default.
const vnetHdrLen = 10

// virtio_net_hdr flags and GSO types (linux/virtio_net.h).
const (
	vnetNeedsCsum = 1
	vnetGSOTCPv4  = 1
	vnetGSOTCPv6  = 4
)

// gsoMaxSize bounds a segment the stack writes, headers included, with
// room below IPv4's 64 KiB limit for the largest TCP header.
const gsoMaxSize = 64<<10 - 1<<10

// readSizes are the buffers one read scatters into: a small packet takes
// only the first, a 64 KiB segment all of them, and only the buffers a
// packet filled are replaced.
var readSizes = []int{128, 256, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768}

func newTUNLink(fd int, mtu uint32) (*tunLink, error) {
	if err := unix.SetNonblock(fd, true); err != nil {
		return nil, fmt.Errorf("making fd %d non-blocking: %w", fd, err)
	}
	stop, err := stopfd.New()
	if err != nil {
		return nil, err
	}
	l := &tunLink{fd: fd, mtu: mtu, vnet: hasVnetHdr(fd), stop: stop}
	// A thread blocked in ppoll keeps its processor, and the goroutines
	// the last packet woke (the TCP processor, the forwarder's handler)
	// wait in its run queue until another thread wakes up and steals
	// them. With other processors to steal them that costs a wake-up;
	// with one processor (childflow exec) it stalls the engine until
	// the runtime takes the processor back, so there the reader parks in
	// the netpoller instead, which gives the processor up.
	if runtime.GOMAXPROCS(0) == 1 {
		dup, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			unix.Close(stop.EFD)
			return nil, fmt.Errorf("duplicating fd %d: %w", fd, err)
		}
		l.poller = os.NewFile(uintptr(dup), "tun")
	}
	return l, nil
}

// hasVnetHdr reports whether fd is a TUN queue with virtio-net headers.
func hasVnetHdr(fd int) bool {
	ifr, err := unix.NewIfreq("")
	if err != nil {
		return false
	}
	if err := unix.IoctlIfreq(fd, unix.TUNGETIFF, ifr); err != nil {
		return false // not a TUN: a socket in tests
	}
	return ifr.Uint16()&unix.IFF_VNET_HDR != 0
}

func (l *tunLink) MTU() uint32                             { return l.mtu }
func (l *tunLink) SetMTU(mtu uint32)                       { l.mtu = mtu }
func (l *tunLink) MaxHeaderLength() uint16                 { return 0 }
func (l *tunLink) LinkAddress() tcpip.LinkAddress          { return "" }
func (l *tunLink) SetLinkAddress(tcpip.LinkAddress)        {}
func (l *tunLink) ARPHardwareType() header.ARPHardwareType { return header.ARPHardwareNone }
func (l *tunLink) AddHeader(*stack.PacketBuffer)           {}
func (l *tunLink) ParseHeader(*stack.PacketBuffer) bool    { return true }
func (l *tunLink) SetOnCloseAction(func())                 {}
func (l *tunLink) Capabilities() stack.LinkEndpointCapabilities {
	// The sandbox's kernel computed (or, with TSO, left to the device)
	// every checksum; checking again only costs, and a bad one hurts
	// the sandbox alone.
	return stack.CapabilityRXChecksumOffload
}

// GSOMaxSize and SupportedGSO make the stack write large TCP segments
// with the checksum left partial, as a host NIC with TSO would take them.
func (l *tunLink) GSOMaxSize() uint32 {
	if l.vnet {
		return gsoMaxSize
	}
	return 0
}

func (l *tunLink) SupportedGSO() stack.SupportedGSO {
	if l.vnet {
		return stack.HostGSOSupported
	}
	return stack.GSONotSupported
}

func (l *tunLink) IsAttached() bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.dispatcher != nil
}

// Attach starts reading packets into d; nil stops.
func (l *tunLink) Attach(d stack.NetworkDispatcher) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if d == nil {
		l.stopLocked()
		return
	}
	if l.dispatcher != nil || l.stopped {
		return
	}
	l.dispatcher = d
	l.wg.Add(1)
	go l.readLoop(d)
}

func (l *tunLink) stopLocked() {
	if !l.stopped {
		l.stopped = true
		l.stop.Stop()
		if l.poller != nil {
			l.poller.Close()
		}
	}
}

func (l *tunLink) Wait() { l.wg.Wait() }

// Close stops reading and releases the stop eventfd. The stack calls it
// after Attach(nil) and Wait; the TUN fd is the caller's.
func (l *tunLink) Close() {
	l.mu.Lock()
	l.stopLocked()
	l.mu.Unlock()
	l.wg.Wait()
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.closed {
		l.closed = true
		unix.Close(l.stop.EFD)
	}
}

func (l *tunLink) readLoop(d stack.NetworkDispatcher) {
	defer l.wg.Done()
	var vnetHdr [vnetHdrLen]byte
	read := l.reader()
	views := make([]*buffer.View, len(readSizes))
	iovecs := make([]unix.Iovec, 0, len(readSizes)+1)
	for {
		l.delivering.Store(false)
		iovecs = iovecs[:0]
		if l.vnet {
			// The header says how the packet was segmented and its
			// checksum left; the packet's own IP length says the rest.
			iovecs = append(iovecs, rawfile.IovecFromBytes(vnetHdr[:]))
		}
		for i, size := range readSizes {
			if views[i] == nil {
				views[i] = buffer.NewViewSize(size)
			}
			iovecs = append(iovecs, rawfile.IovecFromBytes(views[i].AsSlice()))
		}
		n, errno := read(iovecs)
		l.delivering.Store(n > 0)
		if n == -1 {
			return // stopped
		}
		if errno != 0 {
			if errno == unix.EINTR {
				continue
			}
			return // the device is gone: the sandbox ended
		}
		if n == 0 {
			return // end of file: the peer of a test's socket closed
		}
		if l.vnet {
			n -= vnetHdrLen
		}
		if n <= 0 {
			continue
		}
		var proto tcpip.NetworkProtocolNumber
		switch views[0].AsSlice()[0] >> 4 {
		case 4:
			proto = header.IPv4ProtocolNumber
		case 6:
			proto = header.IPv6ProtocolNumber
		default:
			continue // not IP: the buffers are reused
		}
		var payload buffer.Buffer
		for i := 0; n > 0; i++ {
			v := views[i]
			views[i] = nil
			if v.Size() > n {
				v.CapLength(n)
			}
			n -= v.Size()
			payload.Append(v)
		}
		pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: payload})
		d.DeliverNetworkPacket(proto, pkt)
		pkt.DecRef()
		l.received.Add(1)
	}
}

// drained reports whether no packet waits on the TUN queue or is being
// delivered. (A packet read just now, its delivery not yet marked, is
// missed: Engine.Linger also waits for the count of packets received to
// stay still.)
func (l *tunLink) drained() bool {
	if l.delivering.Load() {
		return false
	}
	fds := []unix.PollFd{{Fd: int32(l.fd), Events: unix.POLLIN}}
	n, err := unix.Poll(fds, 0)
	return err == nil && (n == 0 || fds[0].Revents&unix.POLLIN == 0)
}

// reader returns the blocking read of one packet: n is -1 once the link
// is stopped.
func (l *tunLink) reader() func(iovecs []unix.Iovec) (n int, errno unix.Errno) {
	if l.poller == nil {
		return func(iovecs []unix.Iovec) (int, unix.Errno) {
			return rawfile.BlockingReadvUntilStopped(l.stop.EFD, l.fd, iovecs)
		}
	}
	rc, _ := l.poller.SyscallConn() // an *os.File's never fails
	return func(iovecs []unix.Iovec) (n int, errno unix.Errno) {
		if err := rc.Read(func(fd uintptr) bool {
			r, _, e := unix.RawSyscall(unix.SYS_READV, fd, uintptr(unsafe.Pointer(&iovecs[0])), uintptr(len(iovecs)))
			n, errno = int(r), e
			return errno != unix.EAGAIN
		}); err != nil {
			return -1, 0 // stopped: the dup was closed
		}
		return n, errno
	}
}

// WritePackets writes each packet with one writev. A TUN write does not
// block: were the sandbox's backlog full, the kernel would drop it.
func (l *tunLink) WritePackets(pkts stack.PacketBufferList) (int, tcpip.Error) {
	var iovecsArr [8]unix.Iovec
	n := 0
	for _, pkt := range pkts.AsSlice() {
		var vnetHdr [vnetHdrLen]byte
		iovecs := iovecsArr[:0]
		if l.vnet {
			l.fillVnetHdr(&vnetHdr, pkt)
			iovecs = append(iovecs, rawfile.IovecFromBytes(vnetHdr[:]))
		}
		for _, v := range pkt.AsSlices() {
			iovecs = append(iovecs, rawfile.IovecFromBytes(v))
		}
		if errno := rawfile.NonBlockingWriteIovec(l.fd, iovecs); errno != 0 {
			return n, tcpip.TranslateErrno(errno)
		}
		n++
	}
	return n, nil
}

// fillVnetHdr describes a segment the stack left for "the device" to cut
// and checksum (stack.GSO): for a TUN there is no link header, so the
// checksum starts right after the IP header.
func (l *tunLink) fillVnetHdr(h *[vnetHdrLen]byte, pkt *stack.PacketBuffer) {
	gso := pkt.GSOOptions
	if gso.Type == stack.GSONone {
		return
	}
	le := binary.LittleEndian // TUNSETVNETLE, set by package tun
	le.PutUint16(h[2:], uint16(pkt.HeaderSize()))
	if gso.NeedsCsum {
		h[0] = vnetNeedsCsum
		le.PutUint16(h[6:], gso.L3HdrLen)
		le.PutUint16(h[8:], gso.CsumOffset)
	}
	if pkt.Data().Size() > int(gso.MSS) {
		switch gso.Type {
		case stack.GSOTCPv4:
			h[1] = vnetGSOTCPv4
		case stack.GSOTCPv6:
			h[1] = vnetGSOTCPv6
		}
		le.PutUint16(h[4:], gso.MSS)
	}
}
