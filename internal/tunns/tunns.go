// Package tunns puts the sandbox's TUN into (and takes it out of) a
// network namespace the sandbox's runtime made: a container's or a pod's.
// It is kept apart from package tun so the sandbox init, which needs only
// the device, stays small and starts fast.
package tunns

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/childflow/childflow/internal/netplan"
	"github.com/childflow/childflow/internal/procnet"
	"github.com/childflow/childflow/internal/steer"
	"github.com/childflow/childflow/internal/tun"
)

// ErrExists says the namespace has the sandbox's TUN already: another
// container or the CNI plugin sandboxed it.
var ErrExists = errors.New("already exists")

// CreateIn creates the sandbox's TUN inside the network namespace at
// netnsPath, configured by plan and persistent, so that a restarted
// daemon can open it again. In a namespace that has another interface,
// destinations in keep stay on it (see package steer). On error nothing
// is left in the namespace. shared says the namespace had another
// interface.
func CreateIn(netnsPath string, plan netplan.Plan, keep []netip.Prefix) (f *os.File, shared bool, err error) {
	err = inNetns(netnsPath, func(netns ns.NetNS) error {
		if _, err := netlink.LinkByName(plan.Interface); err == nil {
			return fmt.Errorf("%s %w in %s", plan.Interface, ErrExists, netnsPath)
		}
		var err error
		shared, err = steer.Needed(plan.Interface)
		if err != nil {
			return err
		}
		if f, err = tun.Open(plan.Interface); err != nil {
			return err
		}
		if err = tun.SetPersist(f, true); err == nil && shared {
			err = steer.Install(int(netns.Fd()), steer.Config{TUN: plan.Interface, Keep: keep, DNS: plan.Gateways()})
		}
		if err == nil {
			err = tun.Configure(plan)
		}
		if err != nil {
			if shared {
				steer.Remove(int(netns.Fd()))
			}
			tun.SetPersist(f, false)
			f.Close()
			f = nil
		}
		return err
	})
	return f, shared, err
}

// ReopenIn attaches to the persistent TUN name in the namespace.
func ReopenIn(netnsPath, name string) (f *os.File, err error) {
	err = ns.WithNetNSPath(netnsPath, func(ns.NetNS) error {
		if _, err := netlink.LinkByName(name); err != nil {
			return fmt.Errorf("finding %s in %s: %w", name, netnsPath, err)
		}
		f, err = tun.Open(name)
		return err
	})
	return f, err
}

// DeleteIn removes the TUN name from the namespace, and the steering of
// a shared namespace. A namespace or link that is already gone is not an
// error.
func DeleteIn(netnsPath, name string) error {
	err := inNetns(netnsPath, func(netns ns.NetNS) error {
		link, err := netlink.LinkByName(name)
		if err == nil {
			err = netlink.LinkDel(link)
		}
		var nf netlink.LinkNotFoundError
		if err != nil && !errors.As(err, &nf) {
			return err
		}
		return steer.Remove(int(netns.Fd()))
	})
	var notNS ns.NSPathNotExistErr
	if errors.As(err, &notNS) || errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ESRCH) {
		return nil
	}
	return err
}

// SockDiagIn opens a NETLINK_SOCK_DIAG socket in the namespace, which
// looks up that namespace's sockets (procnet.Finder.Diag).
func SockDiagIn(netnsPath string) (f *os.File, err error) {
	err = ns.WithNetNSPath(netnsPath, func(ns.NetNS) error {
		f, err = procnet.OpenDiag()
		return err
	})
	return f, err
}

// NetnsInode identifies a network namespace: paths are reused, inodes of
// live namespaces are not.
func NetnsInode(path string) (uint64, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return 0, fmt.Errorf("opening netns %s: %w", path, err)
	}
	return st.Ino, nil
}

// OpenNetns opens the network namespace at path, which must be the one
// whose inode is ino. It is opened from inside, not through path: a
// descriptor opened through a bind mount of it (a pod's pinned
// namespace) keeps its runtime from unmounting that.
func OpenNetns(path string, ino uint64) (f *os.File, err error) {
	err = inNetns(path, func(ns.NetNS) error {
		f, err = os.Open("/proc/thread-self/ns/net")
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("opening netns %s: %w", path, err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil || st.Ino != ino {
		f.Close()
		return nil, fmt.Errorf("netns %s is no longer the one attached", path)
	}
	return f, nil
}

// inNetns runs fn on a thread in the namespace at path and hands it that
// namespace (ns.WithNetNSPath hands over the caller's instead).
func inNetns(path string, fn func(target ns.NetNS) error) error {
	target, err := ns.GetNS(path)
	if err != nil {
		return err
	}
	defer target.Close()
	return target.Do(func(ns.NetNS) error { return fn(target) })
}

// CheckIn reports whether the TUN name is up in the namespace with the
// default routes through it.
func CheckIn(netnsPath, name string) error {
	return inNetns(netnsPath, func(ns.NetNS) error {
		link, err := netlink.LinkByName(name)
		if err != nil {
			return fmt.Errorf("no %s in %s: %w", name, netnsPath, err)
		}
		if link.Attrs().Flags&net.FlagUp == 0 {
			return fmt.Errorf("%s is down in %s", name, netnsPath)
		}
		for _, family := range netplan.Families() {
			routes, err := netlink.RouteList(link, family)
			if err != nil {
				return err
			}
			found := false
			for _, r := range routes {
				if r.Dst == nil || r.Dst.IP.IsUnspecified() && isZeroMask(r.Dst.Mask) {
					found = true
				}
			}
			if !found {
				return fmt.Errorf("no default route through %s in %s", name, netnsPath)
			}
		}
		return nil
	})
}

func isZeroMask(m net.IPMask) bool { ones, _ := m.Size(); return ones == 0 }

// LinksIn names the namespace's interfaces that could carry its packets
// off it: all but lo and the tunnels whose outer packets the namespace
// routes itself, out by one of the others (tunl0, sit0, gre0: a loaded
// ipip, sit or gre module puts one in every namespace).
func LinksIn(netnsPath string) (names []string, err error) {
	err = inNetns(netnsPath, func(ns.NetNS) error {
		links, err := netlink.LinkList()
		if err != nil {
			return fmt.Errorf("listing links: %w", err)
		}
		for _, l := range links {
			if n := l.Attrs().Name; n != "lo" && !tunnelRoutedHere(l) {
				names = append(names, n)
			}
		}
		return nil
	})
	return names, err
}

// tunnelRoutedHere says whether l is a tunnel whose underlay is its own
// namespace. One created in another namespace and moved in (the kernel
// then reports its link namespace) sends from there.
func tunnelRoutedHere(l netlink.Link) bool {
	switch l.Type() {
	case "ipip", "sit", "ip6tnl", "gre", "gretap", "ip6gre", "ip6gretap", "erspan", "ip6erspan", "vti", "vti6", "vxlan", "geneve":
		return l.Attrs().NetNsID < 0
	}
	return false
}

// HostGuardOf describes the host guard of the veth ifName in the
// namespace (see steer.HostGuard), for sandbox id, with keep its kept
// destinations.
func HostGuardOf(netnsPath, ifName, id string, keep []netip.Prefix) (steer.HostGuard, error) {
	peer, err := HostPeerOf(netnsPath, ifName)
	if err != nil {
		return steer.HostGuard{}, err
	}
	return steer.HostGuard{ID: id, HostIf: peer.HostIf, Pod: peer.Addrs, Keep: keep, MAC: peer.MAC, LinkLocal: peer.LinkLocal}, nil
}

// ErrNotHostPeer says a veth's other end is not in the host's namespace.
var ErrNotHostPeer = errors.New("not in the host's namespace")

// SteerAddedIn steers the interfaces added to the namespace since its
// TUN was set up by plan (steer.Extend).
func SteerAddedIn(netnsPath string, plan netplan.Plan, keep []netip.Prefix) error {
	return inNetns(netnsPath, func(netns ns.NetNS) error {
		return steer.Extend(int(netns.Fd()), steer.Config{TUN: plan.Interface, Keep: keep, DNS: plan.Gateways()})
	})
}

// HostEnd is the host's end of a veth whose index in its namespace, whose
// peer's index (IFLA_LINK) and whose namespace's id on the host are
// given: the host's interface at peer must be a veth that names index
// back, from that namespace (an index alone could name anything). h is a
// handle in the host's namespace.
func HostEnd(h *netlink.Handle, index, peer, nsid int) (netlink.Link, error) {
	link, err := h.LinkByIndex(peer)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrNotHostPeer, err)
	}
	if _, ok := link.(*netlink.Veth); !ok || nsid < 0 || link.Attrs().NetNsID != nsid || link.Attrs().ParentIndex != index {
		return nil, ErrNotHostPeer
	}
	return link, nil
}

// Peer is a pod's veth as its host guard sees it.
type Peer struct {
	HostIf    string       // the host's end
	Addrs     []netip.Addr // the pod end's global addresses
	LinkLocal []netip.Addr // its link-local ones, for neighbour discovery only
	MAC       string       // its MAC address
}

// HostPeerOf describes the veth ifName in the namespace and names its
// host end. It checks both ends point at each other across exactly these
// two namespaces: an index alone could name an unrelated host interface.
func HostPeerOf(netnsPath, ifName string) (Peer, error) {
	var peer, index int
	var p Peer
	err := inNetns(netnsPath, func(ns.NetNS) error {
		link, err := netlink.LinkByName(ifName)
		if err != nil {
			return err
		}
		veth, ok := link.(*netlink.Veth)
		if !ok {
			return fmt.Errorf("%s is a %s, not a veth: childflow cannot guard it from the host", ifName, link.Type())
		}
		index = link.Attrs().Index
		if peer, err = netlink.VethPeerIndex(veth); err != nil {
			return err
		}
		p.MAC = link.Attrs().HardwareAddr.String()
		list, err := netlink.AddrList(link, netlink.FAMILY_ALL)
		for _, a := range list {
			ip, ok := netip.AddrFromSlice(a.IP)
			switch {
			case !ok:
			case a.Scope == unix.RT_SCOPE_UNIVERSE:
				p.Addrs = append(p.Addrs, ip.Unmap())
			case ip.Is6() && ip.IsLinkLocalUnicast():
				p.LinkLocal = append(p.LinkLocal, ip)
			}
		}
		return err
	})
	if err != nil {
		return Peer{}, err
	}
	target, err := ns.GetNS(netnsPath)
	if err != nil {
		return Peer{}, err
	}
	defer target.Close()
	nsid, err := netlink.GetNetNsIdByFd(int(target.Fd()))
	if err != nil {
		return Peer{}, fmt.Errorf("finding the host's id of %s: %w", netnsPath, err)
	}
	link, err := HostEnd(&netlink.Handle{}, index, peer, nsid)
	if err != nil {
		return Peer{}, fmt.Errorf("the host end of %s is %w", ifName, err)
	}
	p.HostIf = link.Attrs().Name
	return p, nil
}
