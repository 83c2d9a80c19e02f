package sandbox

import (
	"bytes"
	"fmt"
	"os"
	"slices"
	"strings"

	"golang.org/x/sys/unix"
)

// Unix sockets with a path are reached through the filesystem, which the
// sandbox shares with the host, not through its network: a command in a
// network namespace can still ask a host service to connect for it
// (docker run --network host, systemd-run through the user's manager, a
// tmux or screen session's shell, an X server's keystrokes) or to
// resolve a name (nscd, systemd-resolved's varlink and D-Bus), bypassing
// every rule and the flow log. Each one the host has bound when the
// sandbox starts is covered in the sandbox, as the output files are;
// those the command binds itself are in its own namespace and not
// listed. One bound later by the host is not covered, nor one the host
// binds again at a covered path: removing the socket's file detaches the
// cover in every namespace (locked mounts too), so a restarted service's
// new socket is reachable. Covering again from a watcher would leave a
// race, and miss mount namespaces the command makes itself (unshare -Urm,
// private by default), so the README says it as it is.

// hostSocketPaths lists the paths of the unix sockets bound in the
// calling process's network namespace (the host's: childflow's parent
// side), from /proc/net/unix.
func hostSocketPaths() ([]string, error) {
	b, err := os.ReadFile("/proc/net/unix")
	if err != nil {
		return nil, fmt.Errorf("listing the host's unix sockets: %w", err)
	}
	var paths []string
	for i, line := range bytes.Split(b, []byte("\n")) {
		// Num RefCount Protocol Flags Type St Inode Path
		f := strings.Fields(string(line))
		if i == 0 || len(f) < 8 || !strings.HasPrefix(f[7], "/") {
			continue // the header, unbound, abstract (@...) or relative
		}
		paths = append(paths, strings.Join(f[7:], " "))
	}
	slices.Sort(paths)
	return slices.Compact(paths), nil // accepted sockets repeat their listener's
}

// coverHostSockets binds /dev/null over each of paths that is a socket in
// the sandbox's view: a connect or send to it is refused, as it is no
// socket, and as a mount point it cannot be removed or replaced. One
// mount each (a read-only remount, as for the output files, would
// double the cost and change nothing here): 300 sockets add ~10 ms to
// a start with both.
func coverHostSockets(paths []string) error {
	for _, path := range paths {
		st, err := os.Lstat(path)
		if err != nil || st.Mode().Type() != os.ModeSocket {
			continue // gone, replaced, or out of the command's reach too
		}
		if err := unix.Mount("/dev/null", path, "", unix.MS_BIND, ""); err != nil {
			return fmt.Errorf("covering the host's unix socket %s: %w", path, err)
		}
	}
	return nil
}
