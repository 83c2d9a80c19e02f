package capture

import (
	"encoding/binary"
	"net/netip"

	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// The host tap's packet socket sees every packet on the host. Left to
// user space, the host's other traffic is copied to the tap and crowds
// its receive queue, and the sandbox's own packets are dropped from the
// capture when the host is busy. The kernel makes a first cut instead:
// ICMP, and TCP and UDP packets from or to one of the remote ends the
// sandbox's sockets talk to, reach the tap, where match decides. Keyed
// by remote end, the filter changes when the sandbox reaches a new one,
// not with every connection.

// maxFilterRemotes bounds the program (two comparisons per remote end)
// and what a new end costs: the program is built and compiled by the
// kernel again. Past it every TCP and UDP packet reaches the tap, as
// without a filter, until the ends are counted again (recountEvery).
const maxFilterRemotes = 256

const (
	keep = 1 << 18 // the whole packet
	skip = 0
)

// remoteKey folds a remote end into the one word the filter compares: its
// address (an IPv6 address's last 32 bits) xor its port. Ends that fold
// alike pass alike; match tells them apart.
func remoteKey(remote netip.AddrPort) uint32 {
	a := remote.Addr().As16()
	return binary.BigEndian.Uint32(a[12:]) ^ uint32(remote.Port())
}

// Scratch memory slots.
const (
	srcPort = iota
	dstPort
	srcAddr
	dstAddr
)

// loopback is what the filter does with packets on loopback interfaces
// (their indexes): each shows twice there, sent and received, and the
// wire-egress view wants neither.
type loopback struct {
	indexes []uint32
	none    bool
}

// remoteFilter is the program for a packet socket of type SOCK_DGRAM,
// whose packets start at the IP header. keys (remoteKey) must not repeat.
func remoteFilter(keys []uint32, lo loopback) []bpf.Instruction {
	ip := ipFilter(keys)
	return append(lo.prelude(len(ip)), ip...)
}

// prelude keeps one copy of each loopback packet, the received one, or
// none; then goes on to the next rest instructions, the last two of
// which return skip and keep.
func (lo loopback) prelude(rest int) []bpf.Instruction {
	k := len(lo.indexes)
	if k == 0 {
		return nil
	}
	var onLoopback []bpf.Instruction
	if !lo.none {
		onLoopback = []bpf.Instruction{
			bpf.LoadExtension{Num: bpf.ExtType},
			bpf.JumpIf{Cond: bpf.JumpEqual, Val: unix.PACKET_OUTGOING, SkipFalse: 1},
		}
	}
	p := []bpf.Instruction{bpf.LoadExtension{Num: bpf.ExtInterfaceIndex}}
	for i, index := range lo.indexes {
		p = append(p, bpf.JumpIf{Cond: bpf.JumpEqual, Val: index, SkipTrue: uint8(k - i)})
	}
	p = append(p, bpf.Jump{Skip: uint32(len(onLoopback) + 1)}) // not a loopback interface
	p = append(p, onLoopback...)
	// To skip: the rest's next to last instruction.
	return append(p, bpf.Jump{Skip: uint32(rest - 2)})
}

// ipFilter is the filter past the prelude: ICMP, and TCP and UDP to or
// from one of keys.
func ipFilter(keys []uint32) []bpf.Instruction {
	// After the headers, A: the transport protocol, X: where its header starts.
	ends := []bpf.Instruction{bpf.RetConstant{Val: keep}}
	if len(keys) <= maxFilterRemotes {
		ends = []bpf.Instruction{
			bpf.LoadIndirect{Off: 0, Size: 2},
			bpf.StoreScratch{Src: bpf.RegA, N: srcPort},
			bpf.LoadIndirect{Off: 2, Size: 2},
			bpf.StoreScratch{Src: bpf.RegA, N: dstPort},
		}
		// From a remote end (the source), then to one (the destination).
		for _, end := range [][2]int{{srcAddr, srcPort}, {dstAddr, dstPort}} {
			ends = append(ends,
				bpf.LoadScratch{Dst: bpf.RegX, N: end[1]},
				bpf.LoadScratch{Dst: bpf.RegA, N: end[0]},
				bpf.ALUOpX{Op: bpf.ALUOpXor})
			ends = append(ends, oneOf(keys)...)
		}
		ends = append(ends, bpf.RetConstant{Val: skip})
	}
	// The headers' verdicts jump over ends to returns of their own: the
	// kernel checks that a scratch slot is stored before it is read along
	// straight runs too, and a return followed by ends' reads fails it.
	toSkip, toKeep := uint32(len(ends)), uint32(len(ends)+1)
	p := []bpf.Instruction{
		/* 0 */ bpf.LoadAbsolute{Off: 0, Size: 1},
		/* 1 */ bpf.ALUOpConstant{Op: bpf.ALUOpShiftRight, Val: 4},
		/* 2 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: 6, SkipTrue: 11}, // IPv6 at 14
		/* 3 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: 4, SkipFalse: 19}, // neither: skip at 23
		// IPv4: a later fragment has no ports (match skips it too).
		/* 4 */ bpf.LoadAbsolute{Off: 6, Size: 2},
		/* 5 */ bpf.JumpIf{Cond: bpf.JumpBitsSet, Val: 0x1fff, SkipTrue: 17},
		/* 6 */ bpf.LoadAbsolute{Off: 12, Size: 4},
		/* 7 */ bpf.StoreScratch{Src: bpf.RegA, N: srcAddr},
		/* 8 */ bpf.LoadAbsolute{Off: 16, Size: 4},
		/* 9 */ bpf.StoreScratch{Src: bpf.RegA, N: dstAddr},
		/* 10 */ bpf.LoadAbsolute{Off: 9, Size: 1},
		/* 11 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: unix.IPPROTO_ICMP, SkipTrue: 12},
		/* 12 */ bpf.LoadMemShift{Off: 0}, // X: the IPv4 header's length
		/* 13 */ bpf.Jump{Skip: 7},
		// IPv6, its next header taken as the transport's (as match does);
		// its addresses' last 32 bits.
		/* 14 */ bpf.LoadAbsolute{Off: 20, Size: 4},
		/* 15 */ bpf.StoreScratch{Src: bpf.RegA, N: srcAddr},
		/* 16 */ bpf.LoadAbsolute{Off: 36, Size: 4},
		/* 17 */ bpf.StoreScratch{Src: bpf.RegA, N: dstAddr},
		/* 18 */ bpf.LoadAbsolute{Off: 6, Size: 1},
		/* 19 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: unix.IPPROTO_ICMPV6, SkipTrue: 4},
		/* 20 */ bpf.LoadConstant{Dst: bpf.RegX, Val: 40},
		/* 21 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: unix.IPPROTO_TCP, SkipTrue: 3},
		/* 22 */ bpf.JumpIf{Cond: bpf.JumpEqual, Val: unix.IPPROTO_UDP, SkipTrue: 2},
		/* 23 */ bpf.Jump{Skip: toSkip + 1},
		/* 24 */ bpf.Jump{Skip: toKeep},
	}
	p = append(p, ends...)
	return append(p, bpf.RetConstant{Val: skip}, bpf.RetConstant{Val: keep})
}

// oneOf keeps the packet if A is one of keys, and goes on after it
// otherwise. A conditional jump reaches at most 255 instructions on, so
// the comparisons come in runs, each with its own return.
func oneOf(keys []uint32) []bpf.Instruction {
	const run = 250
	var p []bpf.Instruction
	for len(keys) > 0 {
		n := min(len(keys), run)
		for i, k := range keys[:n] {
			p = append(p, bpf.JumpIf{Cond: bpf.JumpEqual, Val: k, SkipTrue: uint8(n - i)})
		}
		p = append(p, bpf.Jump{Skip: 1}, bpf.RetConstant{Val: keep})
		keys = keys[n:]
	}
	return p
}

// attachFilter puts prog on the socket fd in place of its filter.
func attachFilter(fd int, prog []bpf.Instruction) error {
	raw, err := bpf.Assemble(prog)
	if err != nil {
		return err
	}
	f := make([]unix.SockFilter, len(raw))
	for i, r := range raw {
		f[i] = unix.SockFilter{Code: r.Op, Jt: r.Jt, Jf: r.Jf, K: r.K}
	}
	return unix.SetsockoptSockFprog(fd, unix.SOL_SOCKET, unix.SO_ATTACH_FILTER, &unix.SockFprog{Len: uint16(len(f)), Filter: &f[0]})
}
