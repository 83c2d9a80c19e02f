// Package procnet finds which process inside a sandbox owns a socket: a
// sock_diag lookup, or else the sandbox's socket table (/proc/<pid>/net/*),
// gives the socket's inode, and the file descriptors of init's
// descendants, or of every process in the sandbox's network namespace,
// give its owner.
package procnet

import (
	"bufio"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// Owner is a process inside the sandbox.
type Owner struct {
	PID  int    // as seen inside the sandbox's PID namespace
	Comm string // the command name
}

// socketsOf maps the inode of every socket pids hold to its holder,
// reading at most maxLinks descriptors of each process and budget in all
// (walkBudget for a walk). Processes holding fewer descriptors are read
// first (Linux 6.2 and later give the count as /proc/<pid>/fd's size), so
// that one holding a great many cannot use the budget up before the rest.
func socketsOf(pids []int, budget int) map[uint64]int {
	type proc struct{ pid, fds int }
	procs := make([]proc, len(pids))
	for i, pid := range pids {
		var st unix.Stat_t
		unix.Stat(fmt.Sprintf("/proc/%d/fd", pid), &st)
		procs[i] = proc{pid, int(st.Size)}
	}
	slices.SortStableFunc(procs, func(a, b proc) int { return a.fds - b.fds })
	owners := map[uint64]int{}
	for _, p := range procs {
		budget -= eachLink(p.pid, min(budget, maxLinks), func(l string) bool {
			if inode, ok := strings.CutPrefix(l, "socket:["); ok {
				n, err := strconv.ParseUint(strings.TrimSuffix(inode, "]"), 10, 64)
				if _, seen := owners[n]; err == nil && !seen {
					owners[n] = p.pid // of several holders, the first read
				}
			}
			return true
		})
		if budget <= 0 {
			break
		}
	}
	return owners
}

// A sandbox can hold millions of descriptors (dup is cheap), and each one
// read is a system call of the engine's, or of the node daemon's for a
// container: a walk reads at most maxLinks of each process and
// walkBudget in all. A socket past them is not attributed.
const (
	maxLinks   = 1 << 14
	walkBudget = 1 << 18
)

// eachLink calls fn with what each of pid's first budget descriptors
// links to, until fn returns false; it returns how many it read.
func eachLink(pid, budget int, fn func(link string) bool) int {
	dir := fmt.Sprintf("/proc/%d/fd/", pid)
	d, err := os.Open(dir)
	if err != nil {
		return 0
	}
	defer d.Close()
	names, _ := d.Readdirnames(budget)
	read := 0
	for _, name := range names {
		read++
		if l, err := os.Readlink(dir + name); err == nil && !fn(l) {
			break
		}
	}
	return read
}

// holds reports whether process pid has one of the file links
// (socket:[inode]) open.
func holds(pid int, links ...string) bool {
	found := false
	eachLink(pid, maxLinks, func(l string) bool {
		found = slices.Contains(links, l)
		return !found
	})
	return found
}

// rawEchoOwner finds who sent an echo request with identifier id from
// local through a raw socket (ping with CAP_NET_RAW, as in a container).
// The sandbox's raw table lists such a socket by protocol, not by the
// identifier, which ping chooses itself from its pid (iputils sends the
// pid, busybox the pid in host byte order): the one process holding a
// raw ICMP socket is the owner, or among several the one whose pid
// matches the identifier.
func (f *Finder) rawEchoOwner(local netip.AddrPort) (Owner, bool) {
	table, proto := "raw", 1 // ICMP
	if !local.Addr().Unmap().Is4() {
		table, proto = "raw6", 58 // ICMPv6
	}
	var links []string
	port := fmt.Sprintf(":%04X ", proto)
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/net/%s", f.netPID(), table))
	for _, line := range strings.Split(string(b), "\n")[1:] {
		if fields := strings.Fields(line); len(fields) >= 10 && strings.Contains(line, port) {
			if ap, ok := ParseAddr(fields[1]); ok && ap.Port() == uint16(proto) {
				links = append(links, "socket:["+fields[9]+"]")
			}
		}
	}
	if len(links) == 0 {
		return Owner{}, false
	}
	var holders []Owner
	for _, pid := range f.members() {
		if holds(pid, links...) {
			holders = append(holders, owner(pid))
		}
	}
	if len(holders) == 1 {
		return holders[0], true
	}
	id := local.Port()
	for _, o := range holders {
		if p := uint16(o.PID); p == id || p == id>>8|id<<8 {
			return o, true
		}
	}
	return Owner{}, false
}

func socketInode(initPID int, proto string, local netip.AddrPort) (uint64, bool) {
	files := []string{proto + "6", proto}
	if local.Addr().Is4() {
		files = []string{proto, proto + "6"} // a v6 socket may carry v4
	}
	port := fmt.Sprintf(":%04X ", local.Port())
	for _, f := range files {
		fh, err := os.Open(fmt.Sprintf("/proc/%d/net/%s", initPID, f))
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(fh)
		sc.Scan() // header
		for sc.Scan() {
			// Match the port's hex text before parsing: the table holds
			// every TIME_WAIT socket of the sandbox too.
			line := sc.Text()
			if !strings.Contains(line, port) {
				continue
			}
			fields := strings.Fields(line)
			if len(fields) < 10 {
				continue
			}
			ap, ok := ParseAddr(fields[1])
			if !ok || ap.Port() != local.Port() || ap.Addr().Unmap() != local.Addr().Unmap() && !ap.Addr().IsUnspecified() {
				continue
			}
			if inode, err := strconv.ParseUint(fields[9], 10, 64); err == nil && inode != 0 {
				fh.Close()
				return inode, true
			}
		}
		fh.Close()
	}
	return 0, false
}

// ParseAddr parses /proc/net's ADDR:PORT: the address in hex, 32-bit words
// in host (little-endian) order, the port in big-endian hex.
func ParseAddr(s string) (netip.AddrPort, bool) {
	host, port, ok := strings.Cut(s, ":")
	if !ok {
		return netip.AddrPort{}, false
	}
	b, err := hex.DecodeString(host)
	p, perr := strconv.ParseUint(port, 16, 16)
	if err != nil || perr != nil || (len(b) != 4 && len(b) != 16) {
		return netip.AddrPort{}, false
	}
	for i := 0; i < len(b); i += 4 {
		binary.BigEndian.PutUint32(b[i:], binary.LittleEndian.Uint32(b[i:]))
	}
	a, _ := netip.AddrFromSlice(b)
	return netip.AddrPortFrom(a, uint16(p)), true
}

// maxMembers bounds the processes a walk looks into.
const maxMembers = 4096

// descendants lists initPID's descendants (host pids), children first.
func descendants(initPID int) []int {
	var out []int
	queue := []int{initPID}
	for len(queue) > 0 && len(out) < maxMembers {
		pid := queue[0]
		queue = queue[1:]
		tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", pid))
		for _, t := range tasks {
			b, _ := os.ReadFile(t)
			for _, f := range strings.Fields(string(b)) {
				if c, err := strconv.Atoi(f); err == nil {
					out = append(out, c)
					queue = append(queue, c)
				}
			}
		}
	}
	return out
}

// inNetns lists the processes in the network namespace with inode ino,
// at most limit.
func inNetns(ino uint64, limit int) []int {
	var out []int
	eachProcessNetns(func(pid int, in uint64) bool {
		if in == ino {
			out = append(out, pid)
		}
		return len(out) < limit
	})
	return out
}

// eachProcessNetns calls fn with each process and the inode of its
// network namespace (0 if unknown), while fn returns true.
func eachProcessNetns(fn func(pid int, ino uint64) bool) {
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		if pid, err := strconv.Atoi(e.Name()); err == nil && !fn(pid, netnsOf(pid)) {
			return
		}
	}
}

// initPIDNamespace is the inode of the host's PID namespace (the
// kernel's PROC_PID_INIT_INO).
const initPIDNamespace = 0xEFFFFFFC

// Occupied says whether a process is in the network namespace whose
// inode is ino. Where the caller sees only some processes (a PID
// namespace of its own), it cannot tell: yes.
func Occupied(ino uint64) bool {
	_, occupied := AProcessIn(ino)
	return occupied
}

// AProcessIn is a process in the network namespace whose inode is ino,
// and whether there is one; pid is 0 where the caller cannot tell (a PID
// namespace of its own), which counts as occupied.
func AProcessIn(ino uint64) (pid int, occupied bool) {
	if ino == 0 {
		return 0, false // netnsOf's unknown
	}
	if !SeesEveryProcess() {
		return 0, true
	}
	if pids := inNetns(ino, 1); len(pids) > 0 {
		return pids[0], true
	}
	return 0, false
}

// AProcessInEach is a process in each network namespace that has one, by
// the namespace's inode: AProcessIn for many namespaces in one walk of
// /proc. Nil where the caller cannot see every process.
func AProcessInEach() map[uint64]int {
	if !SeesEveryProcess() {
		return nil
	}
	out := map[uint64]int{}
	eachProcessNetns(func(pid int, ino uint64) bool {
		if ino != 0 && out[ino] == 0 {
			out[ino] = pid
		}
		return true
	})
	return out
}

// SeesEveryProcess says whether the caller is in the host's PID namespace.
func SeesEveryProcess() bool {
	var st unix.Stat_t
	return unix.Stat("/proc/self/ns/pid", &st) == nil && st.Ino == initPIDNamespace
}

// netnsOf is the inode of pid's network namespace, 0 if unknown.
func netnsOf(pid int) uint64 {
	var st unix.Stat_t
	if unix.Stat(fmt.Sprintf("/proc/%d/ns/net", pid), &st) != nil {
		return 0
	}
	return st.Ino
}

func owner(pid int) Owner {
	o := Owner{PID: pid}
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "Name:"); ok {
			o.Comm = strings.TrimSpace(v)
		}
		// The last NSpid is the pid in the innermost namespace: the sandbox's.
		if v, ok := strings.CutPrefix(line, "NSpid:"); ok {
			if f := strings.Fields(v); len(f) > 0 {
				o.PID, _ = strconv.Atoi(f[len(f)-1])
			}
		}
	}
	return o
}
