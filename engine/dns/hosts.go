package dns

import (
	"bufio"
	"bytes"
	"io"
	"net/netip"
	"slices"

	"github.com/childflow/childflow/policy"
)

// ParseHosts reads a hosts file (hosts(5): an address, then its names):
// the names the sandbox resolves without asking the engine. Addresses
// that never reach the engine (loopback, unspecified) are left out, and
// what is kept is bounded as the cache is. Blocklists installed as
// /etc/hosts give 0.0.0.0 a hundred thousand names: the file is read a
// line at a time, and those lines are dropped before anything is made of
// them, so that such a file costs a start little.
func ParseHosts(r io.Reader) map[netip.Addr][]string {
	hosts := make(map[netip.Addr][]string)
	br := bufio.NewReaderSize(r, 64<<10)
	for {
		line, err := br.ReadSlice('\n')
		for err == bufio.ErrBufferFull { // a line longer than any hosts(5) has
			line = nil
			_, err = br.ReadSlice('\n')
		}
		if len(line) > 0 {
			hostsLine(hosts, line)
		}
		if err != nil {
			return hosts
		}
	}
}

func hostsLine(hosts map[netip.Addr][]string, line []byte) {
	if i := bytes.IndexByte(line, '#'); i >= 0 {
		line = line[:i]
	}
	line = bytes.TrimLeft(line, " \t")
	end := bytes.IndexAny(line, " \t\r\n")
	if end < 0 {
		return
	}
	first, rest := line[:end], line[end:]
	switch string(first) { // no allocation: the blocklists' addresses
	case "0.0.0.0", "127.0.0.1", "::", "::1":
		return
	}
	addr, err := netip.ParseAddr(string(first))
	if err != nil || addr.Zone() != "" {
		return
	}
	addr = addr.Unmap()
	if addr.IsLoopback() || addr.IsUnspecified() {
		return
	}
	names, known := hosts[addr]
	if !known && len(hosts) >= MaxAddrs || len(names) >= MaxNamesPerAddr {
		return
	}
	for _, n := range bytes.Fields(rest) {
		name := policy.NormalizeName(string(n))
		if len(names) < MaxNamesPerAddr && !slices.Contains(names, name) {
			names = append(names, name)
		}
	}
	if len(names) > 0 {
		hosts[addr] = names
	}
}
