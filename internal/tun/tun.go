// Package tun creates and configures the sandbox's TUN device through
// netlink. It must run inside the sandbox's network namespace.
package tun

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"unsafe"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/childflow/childflow/internal/netplan"
)

// Open creates a TUN device called name (IFF_TUN, no packet info, a
// little-endian virtio-net header on every packet) and returns its queue
// fd. The device offers TCP segmentation offload: the sandbox's kernel
// then hands over TCP segments of up to 64 KiB rather than MTU-sized
// packets, and takes in 64 KiB ones (see the engine's tunLink). UDP
// segmentation is not offered: a UDP super-packet is no datagram the
// engine could relay.
func Open(name string) (*os.File, error) {
	fd, err := unix.Open("/dev/net/tun", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("opening /dev/net/tun: %w", err)
	}
	var req struct {
		name  [unix.IFNAMSIZ]byte
		flags uint16
		_     [22]byte
	}
	copy(req.name[:], name)
	req.flags = unix.IFF_TUN | unix.IFF_NO_PI | unix.IFF_VNET_HDR
	if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.TUNSETIFF, uintptr(unsafe.Pointer(&req))); errno != 0 {
		unix.Close(fd)
		return nil, fmt.Errorf("creating tun %s (TUNSETIFF): %w", name, errno)
	}
	if err := unix.IoctlSetPointerInt(fd, unix.TUNSETVNETLE, 1); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("tun %s: little-endian virtio-net headers (TUNSETVNETLE): %w", name, err)
	}
	if err := unix.IoctlSetInt(fd, unix.TUNSETOFFLOAD, unix.TUN_F_CSUM|unix.TUN_F_TSO4|unix.TUN_F_TSO6); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("tun %s: segmentation offload (TUNSETOFFLOAD): %w", name, err)
	}
	return os.NewFile(uintptr(fd), "/dev/net/tun:"+name), nil
}

// Configure brings lo and the TUN up, adds the sandbox addresses and
// default routes for both families via the engine's gateway. All of it
// goes over one netlink socket: the package's functions open one per
// request, ten sockets on every sandbox's start.
func Configure(p netplan.Plan) error {
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return fmt.Errorf("opening netlink: %w", err)
	}
	defer h.Close()
	// A new network namespace registers its loopback first, as index 1.
	lo := &netlink.Device{LinkAttrs: netlink.LinkAttrs{Name: "lo", Index: 1}}
	if err := h.LinkSetUp(lo); err != nil {
		return fmt.Errorf("setting lo up: %w", err)
	}
	link, err := h.LinkByName(p.Interface)
	if err != nil {
		return fmt.Errorf("finding %s: %w", p.Interface, err)
	}
	if err := h.LinkSetMTU(link, p.MTU); err != nil {
		return fmt.Errorf("setting mtu %d on %s: %w", p.MTU, p.Interface, err)
	}
	// Larger queue: the engine drains in batches; short bursts must not drop.
	if err := h.LinkSetTxQLen(link, 1000); err != nil {
		return fmt.Errorf("setting txqueuelen on %s: %w", p.Interface, err)
	}
	// A runtime may have turned IPv6 off in the namespace (docker does
	// for networks without it); the sandbox gets it through the engine,
	// under the same policy as IPv4.
	if err := enableIPv6(p.Interface); err != nil {
		return err
	}
	noRouterSolicitations(p.Interface)
	if err := AddAddresses(h, link, p.SandboxPrefixes()); err != nil {
		return err
	}
	if err := h.LinkSetUp(link); err != nil {
		return fmt.Errorf("setting %s up: %w", p.Interface, err)
	}
	return AddDefaultRoutes(h, link, p.Gateways())
}

// AddAddresses adds addresses to link without duplicate address
// detection: the other end is childflow's, which never answers a probe,
// and a tentative address could not be bound yet.
func AddAddresses(h *netlink.Handle, link netlink.Link, list []netip.Prefix) error {
	for _, a := range list {
		ipn := &net.IPNet{IP: a.Addr().AsSlice(), Mask: net.CIDRMask(a.Bits(), a.Addr().BitLen())}
		if err := h.AddrAdd(link, &netlink.Addr{IPNet: ipn, Flags: unix.IFA_F_NODAD}); err != nil {
			return fmt.Errorf("adding address %s to %s: %w", ipn, link.Attrs().Name, err)
		}
	}
	return nil
}

// AddDefaultRoutes routes everything out of link via the gateways, one
// per family.
func AddDefaultRoutes(h *netlink.Handle, link netlink.Link, gateways []netip.Addr) error {
	for _, gw := range gateways {
		bits := gw.BitLen()
		r := &netlink.Route{
			LinkIndex: link.Attrs().Index,
			Dst:       &net.IPNet{IP: make(net.IP, bits/8), Mask: net.CIDRMask(0, bits)},
			Gw:        gw.AsSlice(),
		}
		if err := h.RouteAdd(r); err != nil {
			return fmt.Errorf("adding default route via %s: %w", gw, err)
		}
	}
	return nil
}

// SetPersist makes the device outlive its fds (a restarted daemon
// reopens it) or not (closing the last fd removes it).
func SetPersist(f *os.File, on bool) error {
	v := 0
	if on {
		v = 1
	}
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var errno error
	rc.Control(func(fd uintptr) {
		if _, _, e := unix.Syscall(unix.SYS_IOCTL, fd, unix.TUNSETPERSIST, uintptr(v)); e != 0 {
			errno = e
		}
	})
	if errno != nil {
		return fmt.Errorf("TUNSETPERSIST %d: %w", v, errno)
	}
	return nil
}

// noRouterSolicitations keeps the sandbox's kernel from soliciting
// routers on the link, whose routes are childflow's: it sent one as the
// link came up and more every few seconds, packets the command never
// sent in every capture, and one read as the command exited kept the
// engine lingering for ~10 ms (a quarter of `childflow -- /bin/true`
// runs). Best effort: a solicitation is only noise.
func noRouterSolicitations(name string) {
	os.WriteFile("/proc/sys/net/ipv6/conf/"+name+"/accept_ra", []byte("0"), 0o644)
}

// enableIPv6 turns IPv6 on for the interface, where it is off.
func enableIPv6(name string) error {
	path := "/proc/sys/net/ipv6/conf/" + name + "/disable_ipv6"
	b, err := os.ReadFile(path)
	if err != nil || len(b) == 0 || b[0] == '0' {
		return nil
	}
	if err := os.WriteFile(path, []byte("0"), 0o644); err != nil {
		return fmt.Errorf("enabling IPv6 on %s: %w", name, err)
	}
	return nil
}
