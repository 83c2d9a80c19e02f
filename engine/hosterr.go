package engine

import (
	"encoding/binary"
	"errors"
	"net/netip"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/childflow/childflow/engine/netstack"
)

// The engine forwards a sandbox's datagram as a router would: one hop
// less, and ICMP errors about it passed back. Host sockets get the hop
// count with setHops and report errors through their error queue
// (IP_RECVERR), read with hostICMPErrors.

// setHops sets the TTL (hop limit) of what the socket sends and asks for
// ICMP errors on its error queue.
func setHops(rc syscall.RawConn, v6 bool, hops uint8) error {
	var err error
	cerr := rc.Control(func(fd uintptr) {
		if v6 {
			if err = unix.SetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_UNICAST_HOPS, int(hops)); err == nil {
				err = unix.SetsockoptInt(int(fd), unix.IPPROTO_IPV6, unix.IPV6_RECVERR, 1)
			}
			return
		}
		if err = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_TTL, int(hops)); err == nil {
			err = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_RECVERR, 1)
		}
	})
	return errors.Join(cerr, err)
}

// hostError is one ICMP error a host socket received.
type hostError struct {
	err netstack.ICMPError
	// from is who sent it: a router on the way, or the destination.
	from netip.Addr
	// payloadLen is how much of the datagram came back with it.
	payloadLen int
}

// hostICMPErrors drains the socket's error queue.
func hostICMPErrors(rc syscall.RawConn) []hostError {
	var out []hostError
	rc.Control(func(fd uintptr) {
		var data [64]byte
		var oob [128]byte
		for {
			n, oobn, _, _, err := unix.Recvmsg(int(fd), data[:], oob[:], unix.MSG_ERRQUEUE|unix.MSG_DONTWAIT)
			if err != nil {
				return
			}
			msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
			if err != nil {
				continue
			}
			for _, m := range msgs {
				if e, ok := parseExtendedErr(m); ok {
					e.payloadLen = n
					out = append(out, e)
				}
			}
		}
	})
	return out
}

// parseExtendedErr reads a struct sock_extended_err (linux/errqueue.h)
// and the offender's address after it.
func parseExtendedErr(m unix.SocketControlMessage) (hostError, bool) {
	v4 := m.Header.Level == unix.IPPROTO_IP && m.Header.Type == unix.IP_RECVERR
	v6 := m.Header.Level == unix.IPPROTO_IPV6 && m.Header.Type == unix.IPV6_RECVERR
	d := m.Data
	if !v4 && !v6 || len(d) < 16 {
		return hostError{}, false
	}
	origin, typ, code := d[4], d[5], d[6]
	if origin != unix.SO_EE_ORIGIN_ICMP && origin != unix.SO_EE_ORIGIN_ICMP6 {
		return hostError{}, false // a local error, not one from the network
	}
	kind, ok := netstack.ICMPErrorOf(origin == unix.SO_EE_ORIGIN_ICMP6, typ, code)
	if !ok {
		return hostError{}, false
	}
	var from netip.Addr
	switch sa := d[16:]; {
	case len(sa) >= 8 && binary.NativeEndian.Uint16(sa) == unix.AF_INET:
		from = netip.AddrFrom4([4]byte(sa[4:8]))
	case len(sa) >= 24 && binary.NativeEndian.Uint16(sa) == unix.AF_INET6:
		from = netip.AddrFrom16([16]byte(sa[8:24])).Unmap()
	}
	return hostError{err: kind, from: from}, from.IsValid()
}

// sandboxView is where an error from the host's side appears to come from
// for the sandbox: a router's own address as it is, but the destination
// (which the host may know as loopback, or in another form) as the
// address the sandbox sent to.
func sandboxView(from, upstream, sandboxDst netip.Addr) netip.Addr {
	if from == upstream || from.IsLoopback() || from.Is4() != sandboxDst.Is4() {
		return sandboxDst
	}
	return from
}

// unreachable is the ICMP error a router sends where the host's dial
// failed with err: no route, or no answer to ARP or neighbour discovery.
func unreachable(err error) (netstack.ICMPError, bool) {
	switch {
	case errors.Is(err, syscall.EHOSTUNREACH):
		return netstack.HostUnreachable, true
	case errors.Is(err, syscall.ENETUNREACH):
		return netstack.NetUnreachable, true
	}
	return 0, false
}
