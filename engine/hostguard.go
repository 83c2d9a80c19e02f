package engine

// What the host guard needs beyond the policy: the host's addresses as
// they are, and host sockets that cannot broadcast.

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/childflow/childflow/engine/upstream"
	"github.com/childflow/childflow/internal/netplan"
	"github.com/childflow/childflow/policy"
)

// followHostAddrs keeps the policy's host addresses those the host has,
// until the engine closes: a host gains addresses while a sandbox runs (a
// VPN comes up, a container runtime creates its bridge, a route makes a
// range local), and reaching one is reaching the host. The subscription
// comes first, so no change made while the addresses are read goes
// unseen.
func (e *Engine) followHostAddrs() error {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, unix.NETLINK_ROUTE)
	if err == nil {
		groups := uint32(unix.RTMGRP_IPV4_IFADDR | unix.RTMGRP_IPV6_IFADDR | unix.RTMGRP_IPV4_ROUTE | unix.RTMGRP_IPV6_ROUTE)
		err = unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK, Groups: groups})
		if err != nil {
			unix.Close(fd)
		}
	}
	if err != nil {
		return fmt.Errorf("following the host's addresses: %w", err)
	}
	f := os.NewFile(uintptr(fd), "host addresses") // non-blocking: Close ends a Read
	p, err := withHostAddrs(e.cfg.Policy, e.cfg.Plan)
	if err != nil {
		f.Close()
		return err
	}
	e.policy.Store(p)
	e.goServe(func() {
		// A notice is read for its headers only: a short buffer truncates it.
		buf := make([]byte, 256)
		for {
			n, err := f.Read(buf)
			// ENOBUFS: notices were lost, which may hide a change.
			if err != nil && !errors.Is(err, syscall.ENOBUFS) {
				return // closed
			}
			if err == nil && !hostChange(buf[:n]) {
				continue
			}
			if p, err := withHostAddrs(e.cfg.Policy, e.cfg.Plan); err == nil {
				e.policy.Store(p)
			}
		}
	}, f.Close)
	return nil
}

// hostChange reports whether a notice changes what is the host's: any
// address notice, and those of routes that deliver to the host. A node's
// other routes (a pod's, every few seconds) are not worth a new reading.
func hostChange(notice []byte) bool {
	if len(notice) < unix.SizeofNlMsghdr+unix.SizeofRtMsg {
		return true
	}
	typ := binary.NativeEndian.Uint16(notice[4:6])
	if typ != unix.RTM_NEWROUTE && typ != unix.RTM_DELROUTE {
		return true
	}
	rtm := notice[unix.SizeofNlMsghdr:] // family, dst_len, src_len, tos, table, protocol, scope, type
	return netplan.IsLocalRoute(rtm[4], rtm[7])
}

// withHostAddrs returns a copy of p that also guards the gateway and
// whatever the host's kernel delivers to the host itself, as its local
// routes say: its addresses, the broadcast address of each of its IPv4
// networks, and whole ranges a route makes its own.
func withHostAddrs(p *policy.Policy, plan netplan.Plan) (*policy.Policy, error) {
	local, err := netplan.LocalRoutes()
	if err != nil {
		return nil, fmt.Errorf("listing the host's addresses: %w", err)
	}
	cp := *p
	cp.HostAddrs = append([]netip.Prefix(nil), p.HostAddrs...)
	cp.HostAddrs = append(cp.HostAddrs, netip.PrefixFrom(plan.Gateway4, 32), netip.PrefixFrom(plan.Gateway6, 128))
	cp.HostAddrs = append(cp.HostAddrs, local...)
	return &cp, nil
}

// errHostLoopback refuses a connection to the host's loopback.
var errHostLoopback = errors.New("the host's loopback is not reachable from this sandbox")

// errHostIdentity refuses a connection to a metadata service that would
// take it for the host.
var errHostIdentity = errors.New("the metadata service that answers with the host's identity is not reachable from this sandbox")

// refuseHostLoopback, a dialer's Control, refuses the host's loopback
// (the unspecified address is loopback too), after the address is
// resolved, the metadata services that answer with the host's identity
// (a proxy's name may lead there), and broadcast.
func refuseHostLoopback(network, address string, c syscall.RawConn) error {
	a, err := netip.ParseAddrPort(address)
	if err != nil || policy.Canonical(a.Addr()).IsLoopback() {
		return errHostLoopback
	}
	if _, ok := policy.IdentityEndpoint(a.Addr()); ok {
		return errHostIdentity
	}
	return upstream.NoBroadcast(network, address, c)
}
