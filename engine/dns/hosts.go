package dns

import (
	"net/netip"
	"slices"
	"strings"

	"github.com/childflow/childflow/policy"
)

// ParseHosts reads a hosts file (hosts(5): an address, then its names):
// the names the sandbox resolves without asking the engine. Addresses
// that never reach the engine (loopback, unspecified) are left out, and
// what is kept is bounded as the cache is (ad-blocking hosts files give
// one address a hundred thousand names).
func ParseHosts(data []byte) map[netip.Addr][]string {
	hosts := make(map[netip.Addr][]string)
	for _, line := range strings.Split(string(data), "\n") {
		line, _, _ = strings.Cut(line, "#")
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		addr, err := netip.ParseAddr(f[0])
		if err != nil || addr.Zone() != "" {
			continue
		}
		addr = addr.Unmap()
		if addr.IsLoopback() || addr.IsUnspecified() {
			continue
		}
		names, known := hosts[addr]
		if !known && len(hosts) >= MaxAddrs {
			continue
		}
		for _, n := range f[1:] {
			n = policy.NormalizeName(n)
			if len(names) < MaxNamesPerAddr && !slices.Contains(names, n) {
				names = append(names, n)
			}
		}
		hosts[addr] = names
	}
	return hosts
}
