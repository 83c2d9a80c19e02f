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

// An interface added to a sandbox's namespace after it was attached
// (`docker network connect`, `podman network connect`, Multus's additional
// networks for a pod) was seen by no createRuntime hook or CNI ADD: a
// process with CAP_NET_RAW could write frames out of it around the
// sandbox, unguarded from the host. So the daemon watches each sandbox's
// namespace and treats such an interface as the hook and the plugin treat
// the first ones: a veth whose other end is the host's is guarded from
// the host and its routes steered; one whose other end or lower device is
// elsewhere and that cannot be guarded (a macvlan, a tunnel moved in) is
// deleted, fail closed, and a device of the node's (a NIC moved in) kept
// down. What is made inside the namespace (a veth to a namespace of its
// own, a bridge) carries nothing off it but through cf0 or a guarded
// veth.
type linkWatch struct {
	d     *Daemon
	sb    *sandbox
	path  string          // the sandbox's namespace, through the daemon's descriptor
	h     *netlink.Handle // in the namespace
	host  *netlink.Handle // in the host's
	nsid  int             // the host's id of the namespace, -1 until known
	known map[int]bool    // interfaces there at the start, or left alone
	added map[int]*addedLink
	done  chan struct{}
	wg    sync.WaitGroup
}

// addedLink is an interface added since the watch started.
type addedLink struct {
	held netlink.Link // its host's end, while held down
	// holding: its host's end, while steer.Guards.Hold holds it (one not
	// a bridge's port when first seen).
	holding string
	// inherited: found by an adopting daemon, added while none ran; a
	// daemon that stopped may have held its host's end down.
	inherited bool
	port      string    // the port (HostGuard.Port) of its guard, once guarded
	guarded   time.Time // when that guard was installed
	failed    time.Time // when guarding it first failed, if it did
}

// An added veth is held at first sight, as its runtime moves it in or a
// CNI plugin makes it there, before either brings it up. A veth whose
// host's end is a bridge's port (docker moves in one made on the host)
// has that end set down, and a veth whose peer is down delivers nothing.
// Any other (a CNI plugin's, whose host's end it puts on a bridge or
// routes to later; a routed one, whose host's routes would go with a
// down) is held in the guard tables (steer.Guards.Hold), a transaction
// that lands before such a plugin, which runs its IPAM plugin or
// configures the host's end first, brings it up. Both race the runtime
// and now and then lose by a few frames (docs/containers.md); the guard
// then forgets the connections those made (Guards.ForgetConnections)
// and, on a bridge, learns no one from their answers (InstallLate).
// Once the veth is up it is guarded as a hook guards one, with the
// addresses its runtime gave it before bringing it up (docker, CNI
// plugins), and its host's end is up again or the hold gone. Addresses
// added later are not taken, as a process with CAP_NET_ADMIN may add
// any: the guard drops what is sent from them. For steerFor after the
// guard, the routes its runtime adds next are steered as well.
const steerFor = 2 * time.Second

// guardRetry paces another look at an added interface that could not be
// guarded yet (renamed meanwhile, say); one that still cannot be after
// guardGiveUp is deleted.
const (
	guardRetry  = 100 * time.Millisecond
	guardGiveUp = 2 * time.Second
)

// watchLinks starts sb's watch. The namespace's interfaces at this point
// are the hook's or the plugin's to guard (they do once it is attached).
func (d *Daemon) watchLinks(sb *sandbox) (*linkWatch, error) {
	fd := netns.NsHandle(int(sb.netns.Fd()))
	h, err := netlink.NewHandleAt(fd, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("watching the interfaces of sandbox %s: %w", sb.att.ID, err)
	}
	host, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		h.Close()
		return nil, fmt.Errorf("watching the interfaces of sandbox %s: %w", sb.att.ID, err)
	}
	w := &linkWatch{d: d, sb: sb, path: fmt.Sprintf("/proc/self/fd/%d", sb.netns.Fd()), h: h, host: host,
		nsid: -1, known: map[int]bool{}, added: map[int]*addedLink{}, done: make(chan struct{})}
	links := make(chan netlink.LinkUpdate, 64)
	lost := func(err error) {
		select {
		case <-w.done: // stopped: the subscriptions' sockets were closed
		default:
			d.cfg.Logf("sandbox %s: watching its interfaces: %v", sb.att.ID, err)
		}
	}
	// Links only: an added veth is guarded once it is up, and routes its
	// runtime adds after are looked for on a timer (steerFor).
	err = netlink.LinkSubscribeWithOptions(links, w.done, netlink.LinkSubscribeOptions{Namespace: &fd, ErrorCallback: lost})
	var list []netlink.Link
	if err == nil {
		list, err = h.LinkList()
	}
	if err != nil {
		close(w.done)
		h.Close()
		host.Close()
		return nil, fmt.Errorf("watching the interfaces of sandbox %s: %w", sb.att.ID, err)
	}
	// An adopted sandbox's veths are the hook's where it guarded them;
	// where it guarded any, those no guard names were added since (while
	// no daemon ran) and are still to be guarded.
	var guarded map[string]bool
	if sb.adopted {
		guarded = steer.Guards{Dir: d.cfg.StateDir}.HostIfs(sb.att.ID)
	}
	for _, l := range list {
		if peer := w.hostEnd(l); peer != nil && len(guarded) > 0 && !guarded[peer.Attrs().Name] {
			// A daemon that stopped may have held it in the guard tables.
			w.added[l.Attrs().Index] = &addedLink{inherited: true, holding: peer.Attrs().Name}
		} else {
			w.known[l.Attrs().Index] = true
		}
	}
	w.wg.Add(1)
	go w.run(links)
	return w, nil
}

func (w *linkWatch) stop() {
	close(w.done)
	w.wg.Wait()
	w.h.Close()
	w.host.Close()
}

func (w *linkWatch) run(links chan netlink.LinkUpdate) {
	defer w.wg.Done()
	retry := time.NewTimer(0) // added ones are looked at first
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
		case <-retry.C:
		}
		drain(links)
		if w.look() {
			retry.Reset(guardRetry)
		}
	}
}

// drain takes what else is queued on c: one look serves a burst.
func drain(c chan netlink.LinkUpdate) {
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
		if _, device := l.(*netlink.Device); device && !w.known[index] {
			w.keepDown(l)
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
		g, err := tunns.HostGuardOf(w.path, name, id, w.sb.att.Keep)
		if errors.Is(err, tunns.ErrNotHostPeer) {
			w.unhold(a)
			delete(w.added, index)
			w.known[index] = true // to another namespace, not the host's
			continue
		}
		if err == nil && a.held == nil && a.holding == "" && !a.inherited && a.failed.IsZero() {
			// Its host's end was not found at first sight: it carried
			// frames unheld until now (CI saw a flood pass once).
			logf("sandbox %s: interface %s was added to its namespace and came up before it was held (its host's end %s was not found at first sight)", id, name, g.HostIf)
		}
		if err == nil {
			g.Port = name
			err = guards.InstallLate(g)
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
		if err := guards.ForgetConnections(g); err != nil {
			logf("sandbox %s: interface %s was added to its namespace and guarded, but what it sent before may pass for answers: %v", id, name, err)
		}
		w.release(a, g.HostIf)
		a.holding = "" // the guard took the name from both families' holds
		a.failed = time.Time{}
		a.port, a.guarded = g.Port, time.Now()
		logf("sandbox %s: interface %s was added to its namespace: guarded on the host (%s)", id, name, g.HostIf)
		steerThem, again = true, true
	}
	for index, a := range w.added {
		if !present[index] {
			w.unhold(a)
			delete(w.added, index)
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
		if err := tunns.SteerAddedIn(w.path, w.sb.att.Plan, w.sb.att.Keep); err != nil {
			logf("sandbox %s: steering its added interfaces: %v", id, err)
			again = true
		}
	}
	return again
}

// hold starts tracking l, an interface added to the namespace whose
// other end or lower device is elsewhere, and holds it if it is a veth
// whose other end is the host's: down if that is a bridge's port, else
// in the guard tables.
func (w *linkWatch) hold(l netlink.Link) *addedLink {
	a := &addedLink{}
	w.added[l.Attrs().Index] = a
	peer := w.hostEnd(l)
	if peer == nil {
		return a
	}
	if !w.onBridge(peer) {
		if err := (steer.Guards{Dir: w.d.cfg.StateDir}).Hold(peer.Attrs().Name); err != nil {
			w.d.cfg.Logf("sandbox %s: interface %s was added to its namespace, and holding its host's end %s failed: %v", w.sb.att.ID, l.Attrs().Name, peer.Attrs().Name, err)
			return a
		}
		a.holding = peer.Attrs().Name
		return a
	}
	if err := w.host.LinkSetDown(peer); err != nil {
		w.d.cfg.Logf("sandbox %s: interface %s was added to its namespace, and setting its host's end %s down failed: %v", w.sb.att.ID, l.Attrs().Name, peer.Attrs().Name, err)
		return a
	}
	a.held = peer
	return a
}

// release brings an added veth's host's end hostIf up once it is
// guarded, where it was held down (by this daemon, or maybe by one that
// stopped): its runtime had brought it up.
func (w *linkWatch) release(a *addedLink, hostIf string) {
	peer := a.held
	a.held = nil
	if peer == nil {
		if !a.inherited {
			return
		}
		var err error
		if peer, err = w.host.LinkByName(hostIf); err != nil || peer.Attrs().Flags&net.FlagUp != 0 {
			return
		}
	}
	if err := w.host.LinkSetUp(peer); err != nil {
		w.d.cfg.Logf("sandbox %s: setting the host's end %s of an added interface up again: %v", w.sb.att.ID, hostIf, err)
	}
}

// onBridge says whether the host's interface is a bridge's port.
func (w *linkWatch) onBridge(l netlink.Link) bool {
	if l.Attrs().MasterIndex == 0 {
		return false
	}
	master, err := w.host.LinkByIndex(l.Attrs().MasterIndex)
	return err == nil && master.Type() == "bridge"
}

// unhold ends what is left of a hold in the guard tables.
func (w *linkWatch) unhold(a *addedLink) {
	if a.holding == "" {
		return
	}
	if err := (steer.Guards{Dir: w.d.cfg.StateDir}).Release(a.holding); err != nil {
		w.d.cfg.Logf("sandbox %s: releasing the hold of %s: %v", w.sb.att.ID, a.holding, err)
	}
	a.holding = ""
}

// hostEnd is the host's end of the veth l, if that is where its other
// end is (tunns.HostEnd); else nil.
func (w *linkWatch) hostEnd(l netlink.Link) netlink.Link {
	if _, ok := l.(*netlink.Veth); !ok || l.Attrs().NetNsID < 0 {
		return nil
	}
	if w.nsid < 0 { // the host's id of the namespace, once it has one
		nsid, err := w.host.GetNetNsIdByFd(int(w.sb.netns.Fd()))
		if err != nil {
			return nil
		}
		w.nsid = nsid
	}
	peer, err := tunns.HostEnd(w.host, l.Attrs().Index, l.Attrs().ParentIndex, w.nsid)
	if err != nil {
		return nil
	}
	return peer
}

// unguard removes the guard of one of the sandbox's ports.
func (w *linkWatch) unguard(port string) {
	guards := steer.Guards{Dir: w.d.cfg.StateDir}
	if err := guards.RemovePort(w.sb.att.ID, port); err != nil {
		w.d.cfg.Logf("sandbox %s: removing the host guard of its interface %s: %v", w.sb.att.ID, port, err)
	}
}

// keepDown sets down an added interface of no kind: a device's (a NIC
// or a VF of the node's that the host-device plugin, or an admin, moved
// in), as nothing made in a namespace lacks one, and one that nothing on
// the host can guard nor delete. Down it carries nothing; a process with
// CAP_NET_ADMIN may bring it up, and is set down again. Moving it out
// instead would fail its plugin's DEL, and a pod's deletion with it.
func (w *linkWatch) keepDown(l netlink.Link) {
	if l.Attrs().Flags&net.FlagUp == 0 {
		return
	}
	id, name := w.sb.att.ID, l.Attrs().Name
	if err := w.h.LinkSetDown(l); err != nil {
		w.d.cfg.Logf("sandbox %s: device %s was moved into its namespace and brought up, and setting it down failed: %v", id, name, err)
		return
	}
	w.d.cfg.Logf("sandbox %s: device %s was moved into its namespace and brought up: set down, as nothing on the host can guard it", id, name)
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
