package engine

// What the host guard needs beyond the policy: the host's addresses as
// they are, and host sockets that cannot broadcast.

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/childflow/childflow/internal/netplan"
	"github.com/childflow/childflow/policy"
)

// followHostAddrs keeps the policy's host addresses those the host has,
// until the engine closes: a host gains addresses while a sandbox runs (a
// VPN comes up, a container runtime creates its bridge), and reaching one
// is reaching the host. The subscription comes first, so no change made
// while the addresses are read goes unseen.
func (e *Engine) followHostAddrs() error {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_RAW|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, unix.NETLINK_ROUTE)
	if err == nil {
		err = unix.Bind(fd, &unix.SockaddrNetlink{Family: unix.AF_NETLINK, Groups: unix.RTMGRP_IPV4_IFADDR | unix.RTMGRP_IPV6_IFADDR})
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
		// A notice is read only to be counted: a short buffer truncates it.
		buf := make([]byte, 256)
		for {
			// What changed does not matter: the addresses are read again.
			// ENOBUFS: notices were lost, which is a change too.
			if _, err := f.Read(buf); err != nil && !errors.Is(err, syscall.ENOBUFS) {
				return // closed
			}
			if p, err := withHostAddrs(e.cfg.Policy, e.cfg.Plan); err == nil {
				e.policy.Store(p)
			}
		}
	}, f.Close)
	return nil
}

// withHostAddrs returns a copy of p that also guards the gateway, every
// address of the host and the broadcast address of each of its IPv4
// networks.
func withHostAddrs(p *policy.Policy, plan netplan.Plan) (*policy.Policy, error) {
	addrs, err := net.InterfaceAddrs()
	if err != nil {
		return nil, fmt.Errorf("listing the host's addresses: %w", err)
	}
	cp := *p
	cp.HostAddrs = append([]netip.Prefix(nil), p.HostAddrs...)
	cp.HostAddrs = append(cp.HostAddrs, netip.PrefixFrom(plan.Gateway4, 32), netip.PrefixFrom(plan.Gateway6, 128))
	for _, a := range addrs {
		ipn, ok := a.(*net.IPNet)
		if !ok {
			continue
		}
		if ip, ok := netip.AddrFromSlice(ipn.IP); ok {
			ip = ip.Unmap()
			cp.HostAddrs = append(cp.HostAddrs, netip.PrefixFrom(ip, ip.BitLen()))
			if b, ok := broadcastOf(ip, ipn.Mask); ok {
				cp.HostAddrs = append(cp.HostAddrs, netip.PrefixFrom(b, 32))
			}
		}
	}
	return &cp, nil
}

// broadcastOf is the broadcast address of ip's IPv4 network, which has
// one unless it is a /31 or /32.
func broadcastOf(ip netip.Addr, mask net.IPMask) (netip.Addr, bool) {
	ones, bits := mask.Size()
	if !ip.Is4() || bits != 32 || ones > 30 {
		return netip.Addr{}, false
	}
	b := ip.As4()
	for i := range b {
		b[i] |= ^mask[i]
	}
	return netip.AddrFrom4(b), true
}

// refuseBroadcast, a dialer's or listener's Control, takes back the
// SO_BROADCAST Go's net package gives every UDP and raw socket: a
// broadcast reaches the host's own sockets as well as its network's, and
// the kernel then refuses every broadcast address, those the policy was
// not told of included. TCP sockets cannot broadcast.
func refuseBroadcast(network, _ string, c syscall.RawConn) error {
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
