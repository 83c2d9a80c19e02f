package daemon

import (
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/childflow/childflow/internal/steer"
	"github.com/childflow/childflow/internal/tunns"
)

// An interface added to a container's namespace while it runs (`docker
// network connect`, `podman network connect`) was seen by no
// createRuntime hook: a process with CAP_NET_RAW could write frames out
// of it around the sandbox, unguarded from the host. So the daemon
// watches each container sandbox's namespace and treats such an
// interface as the hook treats the first ones: a veth whose other end
// is the host's is guarded from the host and its routes steered; one
// whose other end or lower device is elsewhere and that cannot be
// guarded (a macvlan, a tunnel moved in) is deleted, fail closed. What
// is made inside the namespace (a veth to a namespace of its own, a
// bridge) carries nothing off it but through cf0 or a guarded veth.
type linkWatch struct {
	d     *Daemon
	sb    *sandbox
	path  string // the sandbox's namespace, through the daemon's descriptor
	h     *netlink.Handle
	nsid  int          // the host's id of the namespace, -1 until known
	known map[int]bool // interfaces there at the start, or left alone
	added map[int]*addedLink
	done  chan struct{}
	wg    sync.WaitGroup
}

// addedLink is an interface added since the watch started.
type addedLink struct {
	held    string    // the host's end, while steer.Guards.Hold holds it
	port    string    // the port (HostGuard.Port) of its guard, once guarded
	guarded time.Time // when that guard was installed
	failed  time.Time // when guarding it first failed, if it did
}

// An added veth is held at first sight, as its runtime moves it in and
// before it brings it up, if the watch wins that race (it took 0.1-0.5
// ms here; docker took 0.5-4): nothing it sends passes the host. Once it
// is up it is guarded as a hook guards one, with the addresses its
// runtime gave it before bringing it up (docker, CNI plugins); the guard
// takes its name from the hold in the same transaction. Addresses added
// later are not taken, as a process with CAP_NET_ADMIN may add any: the
// guard drops what is sent from them. For steerFor after the guard, the
// routes its runtime adds next are steered as well.
const steerFor = 2 * time.Second

// guardRetry paces another look at an added interface that could not be
// guarded yet (renamed meanwhile, say); one that still cannot be after
// guardGiveUp is deleted.
const (
	guardRetry  = 100 * time.Millisecond
	guardGiveUp = 2 * time.Second
)

// watchLinks starts sb's watch. The namespace's interfaces at this point
// are the hook's to guard (it does once the sandbox is attached).
func (d *Daemon) watchLinks(sb *sandbox) (*linkWatch, error) {
	fd := netns.NsHandle(int(sb.netns.Fd()))
	h, err := netlink.NewHandleAt(fd, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("watching the interfaces of sandbox %s: %w", sb.att.ID, err)
	}
	w := &linkWatch{d: d, sb: sb, path: fmt.Sprintf("/proc/self/fd/%d", sb.netns.Fd()), h: h,
		nsid: -1, known: map[int]bool{}, added: map[int]*addedLink{}, done: make(chan struct{})}
	links := make(chan netlink.LinkUpdate, 64)
	addrs := make(chan netlink.AddrUpdate, 64)
	lost := func(err error) {
		select {
		case <-w.done: // stopped: the subscriptions' sockets were closed
		default:
			d.cfg.Logf("sandbox %s: watching its interfaces: %v", sb.att.ID, err)
		}
	}
	err = netlink.LinkSubscribeWithOptions(links, w.done, netlink.LinkSubscribeOptions{Namespace: &fd, ErrorCallback: lost})
	if err == nil {
		err = netlink.AddrSubscribeWithOptions(addrs, w.done, netlink.AddrSubscribeOptions{Namespace: &fd, ErrorCallback: lost})
	}
	var list []netlink.Link
	if err == nil {
		list, err = h.LinkList()
	}
	if err != nil {
		close(w.done)
		h.Close()
		return nil, fmt.Errorf("watching the interfaces of sandbox %s: %w", sb.att.ID, err)
	}
	// An interface an earlier daemon held is still to be guarded (the
	// daemon stopped in between): one added while none ran is not seen.
	held, err := steer.Guards{Dir: d.cfg.StateDir}.Held()
	if err != nil {
		d.cfg.Logf("sandbox %s: listing held interfaces: %v", sb.att.ID, err)
	}
	for _, l := range list {
		if hostIf, ok := w.hostEnd(l); ok && held[hostIf] {
			w.added[l.Attrs().Index] = &addedLink{held: hostIf}
		} else {
			w.known[l.Attrs().Index] = true
		}
	}
	w.wg.Add(1)
	go w.run(links, addrs)
	return w, nil
}

func (w *linkWatch) stop() {
	close(w.done)
	w.wg.Wait()
	w.h.Close()
}

func (w *linkWatch) run(links chan netlink.LinkUpdate, addrs chan netlink.AddrUpdate) {
	defer w.wg.Done()
	retry := time.NewTimer(0) // held interfaces are looked at first
	if len(w.added) == 0 {
		<-retry.C
	}
	for {
		select {
		case <-w.done:
			retry.Stop()
			return
		case u, ok := <-links:
			if !ok {
				links = nil // the subscription failed: ErrorCallback said so
				break
			}
			// Before anything else, lest its runtime bring it up first.
			if i := u.Link.Attrs().Index; u.Header.Type == unix.RTM_NEWLINK && !w.known[i] && w.added[i] == nil && u.Link.Attrs().NetNsID >= 0 {
				if _, ok := u.Link.(*netlink.Veth); ok {
					w.hold(u.Link)
				}
			}
		case _, ok := <-addrs:
			if !ok {
				addrs = nil
			}
		case <-retry.C:
		}
		drain(links)
		drain(addrs)
		if w.look() {
			retry.Reset(guardRetry)
		}
	}
}

// drain takes what else is queued on c: one look serves a burst.
func drain[T any](c chan T) {
	for c != nil {
		select {
		case _, ok := <-c:
			if !ok {
				return
			}
		default:
			return
		}
	}
}

// look guards, steers or deletes the interfaces added since the start
// and removes the guards of those gone; again says to look again soon.
func (w *linkWatch) look() (again bool) {
	id := w.sb.att.ID
	logf := w.d.cfg.Logf
	list, err := w.h.LinkList()
	if err != nil {
		logf("sandbox %s: listing its interfaces: %v", id, err)
		return true
	}
	guards := steer.Guards{Dir: w.d.cfg.StateDir}
	present := map[int]bool{}
	steerThem := false
	for _, l := range list {
		index, name := l.Attrs().Index, l.Attrs().Name
		present[index] = true
		a := w.added[index]
		if a != nil && !a.guarded.IsZero() {
			if time.Since(a.guarded) < steerFor {
				steerThem, again = true, true
			}
			continue
		}
		if w.known[index] || l.Attrs().NetNsID < 0 {
			continue // the hook's, or made here with its other end (if any) here too
		}
		if _, ok := l.(*netlink.Veth); !ok {
			w.remove(l, fmt.Sprintf("a %s whose lower device is in another namespace cannot be guarded from the host", l.Type()))
			continue
		}
		if a == nil {
			a = w.hold(l)
		}
		up := l.Attrs().Flags&net.FlagUp != 0
		if !up {
			continue // sends nothing yet
		}
		g, err := tunns.HostGuardOf(w.path, name, id, nil)
		if errors.Is(err, tunns.ErrNotHostPeer) {
			delete(w.added, index)
			w.known[index] = true // to another namespace, not the host's
			continue
		}
		if err == nil {
			g.Port = name
			err = guards.Install(g)
		}
		if err != nil {
			if a.failed.IsZero() {
				a.failed = time.Now()
			}
			if time.Since(a.failed) > guardGiveUp {
				w.remove(l, err.Error())
			} else {
				again = true
			}
			continue
		}
		a.held, a.failed = "", time.Time{} // the guard took the hold's name
		a.port, a.guarded = g.Port, time.Now()
		logf("sandbox %s: interface %s was added to its namespace: guarded on the host (%s)", id, name, g.HostIf)
		steerThem, again = true, true
	}
	for index, a := range w.added {
		if !present[index] {
			delete(w.added, index)
			if a.held != "" {
				if err := guards.Release(a.held); err != nil {
					logf("sandbox %s: releasing the hold of %s: %v", id, a.held, err)
				}
			}
			if a.port != "" {
				w.unguard(a.port)
			}
		}
	}
	for index := range w.known {
		if !present[index] {
			delete(w.known, index) // an index may come back as another interface
		}
	}
	if steerThem {
		if err := tunns.SteerAddedIn(w.path, w.sb.att.Plan, nil); err != nil {
			logf("sandbox %s: steering its added interfaces: %v", id, err)
			again = true
		}
	}
	return again
}

// hold starts tracking l, an interface added to the namespace whose
// other end or lower device is elsewhere, and holds its host's end if
// that is where its other end is (steer.Guards.Hold).
func (w *linkWatch) hold(l netlink.Link) *addedLink {
	a := &addedLink{}
	w.added[l.Attrs().Index] = a
	hostIf, ok := w.hostEnd(l)
	if !ok {
		return a
	}
	if err := (steer.Guards{Dir: w.d.cfg.StateDir}).Hold(hostIf); err != nil {
		w.d.cfg.Logf("sandbox %s: interface %s was added to its namespace, and holding it failed: %v", w.sb.att.ID, l.Attrs().Name, err)
		return a
	}
	a.held = hostIf
	return a
}

// hostEnd names the host's end of the veth l, if that is where its
// other end is: the index it names there must be a veth that names l
// back, from this namespace (an index alone could name anything).
func (w *linkWatch) hostEnd(l netlink.Link) (string, bool) {
	peer, err := netlink.LinkByIndex(l.Attrs().ParentIndex)
	if err != nil {
		return "", false
	}
	if _, ok := peer.(*netlink.Veth); !ok || peer.Attrs().ParentIndex != l.Attrs().Index {
		return "", false
	}
	if w.nsid < 0 { // the host's id of the namespace, once it has one
		if w.nsid, err = netlink.GetNetNsIdByFd(int(w.sb.netns.Fd())); err != nil {
			w.nsid = -1
		}
	}
	if w.nsid < 0 || peer.Attrs().NetNsID != w.nsid {
		return "", false
	}
	return peer.Attrs().Name, true
}

// releaseHolds ends the holds an earlier daemon left on interfaces that
// are gone (their name could be taken again); those of live ones stay,
// for the watch of their sandbox to guard.
func (d *Daemon) releaseHolds() {
	guards := steer.Guards{Dir: d.cfg.StateDir}
	held, err := guards.Held()
	if err != nil {
		d.cfg.Logf("host guards: listing held interfaces: %v", err)
	}
	for hostIf := range held {
		if _, err := netlink.LinkByName(hostIf); err == nil {
			continue
		}
		if err := guards.Release(hostIf); err != nil {
			d.cfg.Logf("host guards: releasing the hold of %s: %v", hostIf, err)
		}
	}
}

// unguard removes the guard of one of the sandbox's ports.
func (w *linkWatch) unguard(port string) {
	guards := steer.Guards{Dir: w.d.cfg.StateDir}
	if err := guards.RemovePort(w.sb.att.ID, port); err != nil {
		w.d.cfg.Logf("sandbox %s: removing the host guard of its interface %s: %v", w.sb.att.ID, port, err)
	}
}

// remove deletes an added interface that cannot be guarded.
func (w *linkWatch) remove(l netlink.Link, why string) {
	id, name := w.sb.att.ID, l.Attrs().Name
	if err := w.h.LinkDel(l); err != nil {
		w.d.cfg.Logf("sandbox %s: interface %s was added to its namespace and %s, and deleting it failed: %v", id, name, why, err)
		return
	}
	w.d.cfg.Logf("sandbox %s: interface %s was added to its namespace and deleted: %s", id, name, why)
}
