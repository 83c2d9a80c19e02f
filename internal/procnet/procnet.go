// Package procnet finds which process inside a sandbox owns a socket: a
// sock_diag lookup, or else the sandbox's socket table (/proc/<init>/net/*),
// gives the socket's inode, and the file descriptors of init's descendants
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
	"strconv"
	"strings"
)

// Owner is a process inside the sandbox.
type Owner struct {
	PID  int    // as seen inside the sandbox's PID namespace
	Comm string // the command name
}

// holds reports whether process pid has the file link (socket:[inode])
// open.
func holds(pid int, link string) bool {
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return false
	}
	for _, fd := range fds {
		if l, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name())); err == nil && l == link {
			return true
		}
	}
	return false
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

// descendants lists initPID's descendants (host pids), children first.
func descendants(initPID int) []int {
	var out []int
	queue := []int{initPID}
	for len(queue) > 0 && len(out) < 4096 {
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
