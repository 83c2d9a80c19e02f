package sandbox

import (
	"fmt"
	"os"
	"strconv"

	"golang.org/x/sys/unix"

	"github.com/childflow/childflow/policy"
)

// The command gets the fds childflow was given, as under env or timeout
// (a shell's 3>file, make's jobserver). Some would take it around the
// sandbox: a socket opened outside works in the host's network (a TCP
// socket can even be disconnected and connected anywhere, a unix one
// reaches a host service), a directory reopens what the sandbox covers
// (/proc/self/fd/N/docker.sock), a pidfd takes another process's
// sockets, a /proc file writes another process's memory, a TUN device
// sends into the host, a pseudo-terminal's master types into the shell
// on its other side. Only kinds that carry data and nothing else pass.

// WithholdInheritedFDs marks close-on-exec every inherited fd above 2 the
// command must not get, returning a one-line note for each; stdin, stdout
// or stderr of such a kind is a usage error (*policy.UsageError), as the
// command could not run without it.
func WithholdInheritedFDs() (notes []string, err error) {
	for fd, name := range []string{"stdin", "stdout", "stderr"} {
		if kind, ok := passable(fd, true); !ok {
			return nil, policy.Usagef("%s is %s from outside the sandbox, which the command could use to get around it: give it a pipe, a file or a terminal", name, kind)
		}
	}
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return nil, fmt.Errorf("listing inherited fds: %w", err)
	}
	for _, e := range entries {
		fd, err := strconv.Atoi(e.Name())
		if err != nil || fd <= 2 {
			continue
		}
		// childflow's own, the directory listing's among them, are
		// close-on-exec already.
		if flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFD, 0); err != nil || flags&unix.FD_CLOEXEC != 0 {
			continue
		}
		if kind, ok := passable(fd, false); !ok {
			unix.CloseOnExec(fd)
			notes = append(notes, fmt.Sprintf("fd %d (%s) is not passed to the command: it would be a way around the sandbox", fd, kind))
		}
	}
	return notes, nil
}

// Pseudo file systems whose regular files are handles on something else.
var handleFS = map[int64]string{
	unix.PROC_SUPER_MAGIC:    "a /proc file",
	unix.NSFS_MAGIC:          "a namespace",
	unix.PID_FS_MAGIC:        "a pidfd",
	unix.ANON_INODE_FS_MAGIC: "an anonymous inode",
	unix.BPF_FS_MAGIC:        "a BPF object",
	unix.CGROUP2_SUPER_MAGIC: "a cgroup file",
	unix.CGROUP_SUPER_MAGIC:  "a cgroup file",
	unix.SOCKFS_MAGIC:        "a socket",
}

// passable says whether fd may pass into the sandbox and, if not, what
// it is. A socket passes only as stdio, and only a connected unix stream
// (journald's stdout, a socketpair): it talks to its peer and cannot be
// connected elsewhere.
func passable(fd int, stdio bool) (kind string, ok bool) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return "an fd that cannot be inspected", err == unix.EBADF // a closed stdio fd is the caller's business
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFIFO:
		return "", true
	case unix.S_IFREG:
		var fs unix.Statfs_t
		if err := unix.Fstatfs(fd, &fs); err != nil {
			return "a file on an unknown file system", false
		}
		if kind, handle := handleFS[int64(fs.Type)]; handle {
			return kind, false
		}
		return "", true
	case unix.S_IFCHR:
		major, minor := unix.Major(st.Rdev), unix.Minor(st.Rdev)
		switch {
		case major == 1 && minor != 1 && minor != 2 && minor != 4: // null, zero, random...; not mem, kmem, port
			return "", true
		case major == 5 && minor == 2: // a pseudo-terminal's master: what it writes, the shell on the other side reads as typed
			return "a pseudo-terminal master", false
		case major == 4 || major == 5 || major >= 136 && major <= 143: // terminals, /dev/tty
			return "", true
		}
		return fmt.Sprintf("device %d:%d", major, minor), false
	case unix.S_IFSOCK:
		if stdio && connectedUnixStream(fd) {
			return "", true
		}
		return "a socket", false
	case unix.S_IFDIR:
		return "a directory", false
	}
	// Anonymous inodes (io_uring, pidfd, eventfd) and the rest: the link
	// names the kind, anon_inode:[io_uring].
	if link, err := os.Readlink("/proc/self/fd/" + strconv.Itoa(fd)); err == nil {
		return link, false
	}
	return "a handle of another kind", false
}

func connectedUnixStream(fd int) bool {
	domain, err1 := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_DOMAIN)
	typ, err2 := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_TYPE)
	listening, err3 := unix.GetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_ACCEPTCONN)
	if err1 != nil || err2 != nil || err3 != nil || domain != unix.AF_UNIX || listening != 0 {
		return false
	}
	if typ != unix.SOCK_STREAM && typ != unix.SOCK_SEQPACKET {
		return false
	}
	_, err := unix.Getpeername(fd)
	return err == nil
}
