package procnet

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"slices"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// Finder finds the owners of one sandbox's sockets.
type Finder struct {
	// InitPID is the sandbox's init, a host pid: the owners are its
	// descendants.
	InitPID int
	// Netns, if set, is the inode of the sandbox's network namespace: the
	// owners are then the processes in it, wherever they were started (a
	// runtime's exec, a pod's other containers), and InitPID may be 0.
	Netns uint64
	// Diag, if set, is a NETLINK_SOCK_DIAG socket made inside the
	// sandbox's network namespace. It looks a socket up by its 4-tuple
	// in the kernel's hash tables, where /proc/<pid>/net/tcp lists every
	// socket of the sandbox, TIME_WAIT included, on each read: after a
	// few thousand connections, that read cost more than the connection.
	Diag *os.File

	mu     sync.Mutex // one question at a time on Diag; recent
	seq    uint32
	recent []int // the last owners found, most recent first

	// The sockets of every process, as the last walk of the process
	// tree found them: a burst of connections from many processes (make
	// -j, a test runner's workers) is answered from one walk, where a
	// walk per connection, each reading every process's descriptors,
	// slowed 400 parallel curls tenfold.
	walking sync.Mutex // one walk at a time; guards known and fullScans
	index   walkIndex  // guarded by mu
	// In a namespace (Netns): the processes the last walk found in it,
	// and how many walks had to read all of /proc to find them.
	known     []int
	fullScans int
}

// walkIndex is what one walk of the process tree found.
type walkIndex struct {
	started, done int            // walks begun and finished
	owners        map[uint64]int // socket inode -> host pid
}

// Find returns the owner of the sandbox's proto ("tcp", "udp" or "icmp")
// socket from local to remote (without Diag, local alone identifies it;
// for ICMP echo, local's port is the echo identifier: a ping socket's
// port, or else see rawEchoOwner).
func (f *Finder) Find(proto string, local, remote netip.AddrPort) (Owner, bool) {
	var inode uint64
	var ok bool
	if f.Diag != nil && proto != "icmp" {
		inode, ok = f.diagInode(proto, local, remote)
	} else {
		inode, ok = socketInode(f.netPID(), proto, local)
	}
	if !ok {
		if proto == "icmp" {
			return f.rawEchoOwner(local)
		}
		return Owner{}, false
	}
	// Walking the process tree costs more than the lookup: the last
	// walk's findings and the processes that owned the last sockets are
	// asked first (an inode found there may since have closed, and its
	// number gone to another socket: each is checked).
	want := fmt.Sprintf("socket:[%d]", inode)
	f.mu.Lock()
	candidates := slices.Clone(f.recent)
	if pid, ok := f.index.owners[inode]; ok {
		candidates = slices.Insert(candidates, 0, pid)
	}
	walks := f.index.started
	f.mu.Unlock()
	for _, pid := range candidates {
		if holds(pid, want) {
			f.remember(pid)
			return owner(pid), true
		}
	}
	if pid, ok := f.walk(inode, walks); ok && holds(pid, want) {
		f.remember(pid)
		return owner(pid), true
	}
	return Owner{}, false
}

// walk returns the owner of inode as found by a walk of the process tree
// begun after walks had begun, the socket being open by then: a walk
// still to come when this one waits its turn serves every lookup waiting
// with it.
func (f *Finder) walk(inode uint64, walks int) (int, bool) {
	f.walking.Lock()
	defer f.walking.Unlock()
	f.mu.Lock()
	if f.index.done <= walks {
		f.index.started++
		f.mu.Unlock()
		owners := f.scan(inode)
		f.mu.Lock()
		f.index.owners = owners
		f.index.done = f.index.started
	}
	pid, ok := f.index.owners[inode]
	f.mu.Unlock()
	return pid, ok
}

// members lists the processes whose sockets may be the sandbox's.
func (f *Finder) members() []int {
	if f.Netns != 0 {
		return inNetns(f.Netns, maxMembers)
	}
	return descendants(f.InitPID)
}

// scan maps the sockets of the sandbox's processes to their holders, for
// a walk looking for inode. In a namespace, the processes of the last
// walk and their descendants are read first, and all of /proc (~9 µs a
// process here, a node runs thousands) only where inode is not among
// them: a pod's new processes are mostly its own processes' children.
// The caller holds walking.
func (f *Finder) scan(inode uint64) map[uint64]int {
	if f.Netns == 0 {
		return socketsOf(descendants(f.InitPID), walkBudget)
	}
	if len(f.known) > 0 {
		near := f.nearKnown()
		owners := socketsOf(near, walkBudget)
		if _, ok := owners[inode]; ok {
			f.known = near
			return owners
		}
	}
	f.fullScans++
	f.known = inNetns(f.Netns, maxMembers)
	return socketsOf(f.known, walkBudget)
}

// nearKnown lists the known processes still in the namespace and their
// descendants.
func (f *Finder) nearKnown() []int {
	seen := map[int]bool{}
	var out []int
	add := func(pid int) {
		if !seen[pid] && len(out) < maxMembers {
			seen[pid] = true
			out = append(out, pid)
		}
	}
	for _, pid := range f.known {
		if netnsOf(pid) == f.Netns {
			add(pid)
			for _, c := range descendants(pid) {
				add(c)
			}
		}
	}
	return out
}

// netPID is a process in the sandbox's network namespace, whose
// /proc/<pid>/net lists the sandbox's sockets: init, or else the last
// owner found or any member, still in it.
func (f *Finder) netPID() int {
	if f.InitPID != 0 {
		return f.InitPID
	}
	f.mu.Lock()
	recent := slices.Clone(f.recent)
	f.mu.Unlock()
	for _, pid := range recent {
		if netnsOf(pid) == f.Netns {
			return pid
		}
	}
	if m := inNetns(f.Netns, maxMembers); len(m) > 0 {
		return m[0]
	}
	return 0
}

// remember puts pid first among the recent owners.
func (f *Finder) remember(pid int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.recent = slices.DeleteFunc(f.recent, func(p int) bool { return p == pid })
	f.recent = slices.Insert(f.recent, 0, pid)
	if len(f.recent) > 4 {
		f.recent = f.recent[:4]
	}
}

// Sizes and offsets of struct inet_diag_req_v2 and struct inet_diag_msg
// (linux/inet_diag.h).
const (
	sizeofDiagReq   = 56
	diagMsgInodeOff = 68
	sizeofDiagMsg   = 72
)

// diagInode asks the kernel for the inode of the socket. A socket from
// an IPv4 address may be an IPv6 socket with a mapped address.
func (f *Finder) diagInode(proto string, local, remote netip.AddrPort) (uint64, bool) {
	ipproto := uint8(unix.IPPROTO_TCP)
	if proto == "udp" {
		ipproto = unix.IPPROTO_UDP
	}
	local = netip.AddrPortFrom(local.Addr().Unmap(), local.Port())
	remote = netip.AddrPortFrom(remote.Addr().Unmap(), remote.Port())
	families := []uint8{unix.AF_INET6}
	if local.Addr().Is4() {
		families = []uint8{unix.AF_INET, unix.AF_INET6}
	}
	src, dst := local, remote
	if ipproto == unix.IPPROTO_UDP {
		// The UDP lookup reads the tuple the other way round ("src and
		// dst are swapped for historical reasons", net/ipv4/udp_diag.c).
		src, dst = remote, local
	}
	for _, family := range families {
		if inode, err := f.query(family, ipproto, src, dst, local.Port()); err == nil {
			return inode, true
		}
	}
	return 0, false
}

// query sends one exact lookup and returns the inode of the socket found,
// if its own port is localPort.
func (f *Finder) query(family, proto uint8, src, dst netip.AddrPort, localPort uint16) (uint64, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.seq++
	req := make([]byte, unix.SizeofNlMsghdr+sizeofDiagReq)
	ne := binary.NativeEndian
	ne.PutUint32(req[0:], uint32(len(req)))
	ne.PutUint16(req[4:], unix.SOCK_DIAG_BY_FAMILY)
	ne.PutUint16(req[6:], unix.NLM_F_REQUEST)
	ne.PutUint32(req[8:], f.seq)
	r := req[unix.SizeofNlMsghdr:]
	r[0], r[1] = family, proto
	ne.PutUint32(r[4:], 0xffffffff) // every state
	id := r[8:]
	binary.BigEndian.PutUint16(id[0:], src.Port())
	binary.BigEndian.PutUint16(id[2:], dst.Port())
	putDiagAddr(id[4:20], family, src.Addr())
	putDiagAddr(id[20:36], family, dst.Addr())
	ne.PutUint32(id[40:], 0xffffffff) // INET_DIAG_NOCOOKIE
	ne.PutUint32(id[44:], 0xffffffff)
	fd := int(f.Diag.Fd())
	if err := unix.Sendto(fd, req, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		return 0, err
	}
	buf := make([]byte, 4096)
	for {
		n, _, err := unix.Recvfrom(fd, buf, 0)
		if err != nil {
			return 0, err
		}
		msgs, err := syscall.ParseNetlinkMessage(buf[:n])
		if err != nil {
			return 0, err
		}
		for _, m := range msgs {
			if m.Header.Seq != f.seq {
				continue // the answer to an earlier, abandoned question
			}
			switch {
			case m.Header.Type == unix.NLMSG_ERROR:
				if len(m.Data) >= 4 {
					if errno := int32(ne.Uint32(m.Data)); errno != 0 {
						return 0, syscall.Errno(-errno)
					}
				}
				return 0, errors.New("sock_diag: empty answer")
			case m.Header.Type == unix.SOCK_DIAG_BY_FAMILY && len(m.Data) >= sizeofDiagMsg:
				if binary.BigEndian.Uint16(m.Data[4:]) != localPort {
					return 0, errors.New("sock_diag: another socket")
				}
				return uint64(ne.Uint32(m.Data[diagMsgInodeOff:])), nil
			}
		}
	}
}

// putDiagAddr writes a in the family's form: IPv4 in the first word,
// IPv6 whole, an IPv4 address for an IPv6 socket as a mapped address.
func putDiagAddr(b []byte, family uint8, a netip.Addr) {
	if family == unix.AF_INET {
		v4 := a.As4()
		copy(b, v4[:])
		return
	}
	v6 := a.As16()
	copy(b, v6[:])
}

// OpenDiag opens a NETLINK_SOCK_DIAG socket in the caller's network
// namespace, for Finder.Diag.
func OpenDiag() (*os.File, error) {
	fd, err := unix.Socket(unix.AF_NETLINK, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, unix.NETLINK_SOCK_DIAG)
	if err != nil {
		return nil, os.NewSyscallError("socket(NETLINK_SOCK_DIAG)", err)
	}
	return os.NewFile(uintptr(fd), "sock_diag"), nil
}
