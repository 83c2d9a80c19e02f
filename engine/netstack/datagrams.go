package netstack

import (
	"net"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
	"gvisor.dev/gvisor/pkg/tcpip"
	"gvisor.dev/gvisor/pkg/waiter"
)

// A UDP flow waits for its next datagram far longer than it takes to
// copy one, and a datagram may be 64 KiB: reading into a buffer of its
// own, each of a sandbox's 8192 flows held 64 KiB per direction (512 MiB
// RSS for a flood of refused ones). The buffer is lent from here only
// once a datagram is there, for as long as it is handled.
var datagrams = sync.Pool{New: func() any { b := make([]byte, 1<<16); return &b }}

// Next waits for the flow's next datagram from the sandbox and calls use
// with it, in a buffer lent for the call. It returns an error once the
// flow is closed.
func (f *UDPFlow) Next(use func([]byte)) error {
	for {
		bp := datagrams.Get().(*[]byte)
		w := tcpip.SliceWriter(*bp)
		res, err := f.ep.Read(&w, tcpip.ReadOptions{})
		if _, wait := err.(*tcpip.ErrWouldBlock); wait {
			datagrams.Put(bp)
			// What came before is passed on. One that arrives from here
			// on holds the flow again; one that came since the read is
			// seen below.
			f.release()
			if f.ep.Readiness(waiter.ReadableEvents) != 0 {
				f.hold(waiter.ReadableEvents)
				continue
			}
			<-f.ready // a notification after the read is kept: none is lost
			continue
		}
		if err != nil {
			datagrams.Put(bp)
			return net.ErrClosed
		}
		use((*bp)[:res.Count])
		datagrams.Put(bp)
		return nil
	}
}

// NextFromHost is Next for a connected host UDP socket: it waits for a
// datagram or an error (such as ECONNREFUSED, from an ICMP error) with
// no buffer and reads it into a lent one.
func NextFromHost(host syscall.RawConn, use func([]byte)) error {
	var readErr error
	err := host.Read(func(fd uintptr) bool {
		bp := datagrams.Get().(*[]byte)
		defer datagrams.Put(bp)
		n, err := unix.Read(int(fd), *bp)
		switch {
		case err == unix.EAGAIN:
			return false
		case err != nil:
			readErr = err
		default:
			use((*bp)[:n])
		}
		return true
	})
	if err != nil {
		return err
	}
	return readErr
}

// readyEntry registers for the events that end a wait in Next: a
// datagram, or the endpoint closing.
func readyEntry(wq *waiter.Queue) chan struct{} {
	entry, ch := waiter.NewChannelEntry(waiter.ReadableEvents | waiter.EventHUp | waiter.EventErr)
	wq.EventRegister(&entry)
	return ch
}
