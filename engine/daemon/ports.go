package daemon

import (
	"fmt"
	"os"
)

// halfEphemeralPorts is the default bound on the flows of all sandboxes:
// half the node's ephemeral ports (net.ipv4.ip_local_port_range), the
// rest left to the node's own sockets.
func halfEphemeralPorts() int {
	lo, hi := 32768, 60999 // the kernel's default
	if b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range"); err == nil {
		fmt.Sscan(string(b), &lo, &hi)
	}
	return max((hi-lo+1)/2, 1024)
}
