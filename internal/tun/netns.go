package tun

import (
	"errors"
	"fmt"
	"os"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/childflow/childflow/internal/netplan"
)

// CreateIn creates the sandbox's TUN inside the network namespace at
// netnsPath, configured by plan and persistent, so that a restarted
// daemon can open it again. On error nothing is left in the namespace.
func CreateIn(netnsPath string, plan netplan.Plan) (f *os.File, err error) {
	err = ns.WithNetNSPath(netnsPath, func(ns.NetNS) error {
		if _, err := netlink.LinkByName(plan.Interface); err == nil {
			return fmt.Errorf("%s already exists in %s", plan.Interface, netnsPath)
		}
		if f, err = Open(plan.Interface); err != nil {
			return err
		}
		if err = SetPersist(f, true); err == nil {
			err = Configure(plan)
		}
		if err != nil {
			SetPersist(f, false)
			f.Close()
			f = nil
		}
		return err
	})
	return f, err
}

// ReopenIn attaches to the persistent TUN name in the namespace.
func ReopenIn(netnsPath, name string) (f *os.File, err error) {
	err = ns.WithNetNSPath(netnsPath, func(ns.NetNS) error {
		if _, err := netlink.LinkByName(name); err != nil {
			return fmt.Errorf("finding %s in %s: %w", name, netnsPath, err)
		}
		f, err = Open(name)
		return err
	})
	return f, err
}

// DeleteIn removes the TUN name from the namespace. A namespace or link
// that is already gone is not an error.
func DeleteIn(netnsPath, name string) error {
	err := ns.WithNetNSPath(netnsPath, func(ns.NetNS) error {
		link, err := netlink.LinkByName(name)
		if err != nil {
			var nf netlink.LinkNotFoundError
			if errors.As(err, &nf) {
				return nil
			}
			return err
		}
		return netlink.LinkDel(link)
	})
	var notNS ns.NSPathNotExistErr
	if errors.As(err, &notNS) || errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ESRCH) {
		return nil
	}
	return err
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
