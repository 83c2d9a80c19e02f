// Package upstream tells the egress capture exactly which host sockets
// the engine opens for a sandbox. A dial whose context carries a watch
// binds its socket to an ephemeral port before connecting, so the local
// port is known before the first packet (the SYN) leaves, and reports
// the socket: the capture then follows its 4-tuple, not everything the
// host sends to the same remote end.
package upstream

import (
	"context"
	"net"
	"net/netip"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/childflow/childflow/policy"
)

// Func is told each socket when it is bound (open) and when the dial's
// user is done with it. local's address may be unspecified: the port is
// what makes it unique on the host.
type Func func(proto policy.Proto, local, remote netip.AddrPort, open bool)

type socket struct {
	proto         policy.Proto
	local, remote netip.AddrPort
}

type watch struct {
	on      Func
	mu      sync.Mutex
	sockets []socket
}

type key struct{}

// Watch returns a context whose dials (through a Dialer from this
// package) report to on, and done, which reports their sockets closed.
// With on nil, ctx is returned as is.
func Watch(ctx context.Context, on Func) (context.Context, func()) {
	if on == nil {
		return ctx, func() {}
	}
	w := &watch{on: on}
	return context.WithValue(ctx, key{}, w), func() {
		w.mu.Lock()
		defer w.mu.Unlock()
		for _, s := range w.sockets {
			on(s.proto, s.local, s.remote, false)
		}
		w.sockets = nil
	}
}

// Dialer returns a copy of d (nil: a zero Dialer) whose sockets are
// reported to the watch in the dial's context, after d's own control.
func Dialer(d *net.Dialer) *net.Dialer {
	c := net.Dialer{}
	if d != nil {
		c = *d
	}
	control, controlContext := c.Control, c.ControlContext
	c.Control = nil
	c.ControlContext = func(ctx context.Context, network, address string, raw syscall.RawConn) error {
		var err error
		switch {
		case controlContext != nil:
			err = controlContext(ctx, network, address, raw)
		case control != nil:
			err = control(network, address, raw)
		}
		if err != nil {
			return err
		}
		return report(ctx, network, address, raw)
	}
	return &c
}

func report(ctx context.Context, network, address string, raw syscall.RawConn) error {
	w, _ := ctx.Value(key{}).(*watch)
	if w == nil {
		return nil
	}
	remote, err := netip.ParseAddrPort(address)
	if err != nil {
		return nil // not an IP socket
	}
	var local netip.AddrPort
	var bindErr error
	if err := raw.Control(func(fd uintptr) { local, bindErr = bindEphemeral(int(fd)) }); err != nil {
		return err
	}
	if bindErr != nil {
		return bindErr
	}
	proto := policy.TCP
	if strings.HasPrefix(network, "udp") {
		proto = policy.UDP
	}
	s := socket{proto, local, netip.AddrPortFrom(remote.Addr().Unmap(), remote.Port())}
	w.mu.Lock()
	defer w.mu.Unlock()
	w.sockets = append(w.sockets, s)
	w.on(s.proto, s.local, s.remote, true)
	return nil
}

// bindEphemeral binds an unbound socket to a port of its own (a port
// no other socket of the protocol holds) and returns its address.
func bindEphemeral(fd int) (netip.AddrPort, error) {
	sa, err := unix.Getsockname(fd)
	if err != nil {
		return netip.AddrPort{}, err
	}
	if addrOf(sa).Port() == 0 {
		var wildcard unix.Sockaddr = &unix.SockaddrInet4{}
		if _, v6 := sa.(*unix.SockaddrInet6); v6 {
			wildcard = &unix.SockaddrInet6{}
		}
		if err := unix.Bind(fd, wildcard); err != nil {
			return netip.AddrPort{}, err
		}
		if sa, err = unix.Getsockname(fd); err != nil {
			return netip.AddrPort{}, err
		}
	}
	return addrOf(sa), nil
}

func addrOf(sa unix.Sockaddr) netip.AddrPort {
	switch a := sa.(type) {
	case *unix.SockaddrInet4:
		return netip.AddrPortFrom(netip.AddrFrom4(a.Addr), uint16(a.Port))
	case *unix.SockaddrInet6:
		return netip.AddrPortFrom(netip.AddrFrom16(a.Addr), uint16(a.Port))
	}
	return netip.AddrPort{}
}

// NoBroadcast, a dialer's or listener's Control, takes back the
// SO_BROADCAST Go's net package gives every UDP and raw socket: a
// broadcast reaches the host's own sockets as well as its network's, and
// the kernel then refuses every broadcast address, those the policy was
// not told of included. TCP sockets cannot broadcast.
func NoBroadcast(network, _ string, c syscall.RawConn) error {
	if strings.HasPrefix(network, "tcp") {
		return nil
	}
	var err error
	if cerr := c.Control(func(fd uintptr) {
		err = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_BROADCAST, 0)
	}); cerr != nil {
		return cerr
	}
	return err
}
