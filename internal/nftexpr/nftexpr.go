// Package nftexpr builds the nftables expressions childflow's tables are
// made of (github.com/google/nftables/expr), shared by the rootful
// backend and the steering of shared namespaces, and sizes the netlink
// sockets their transactions go through.
package nftexpr

import (
	"fmt"
	"net"
	"net/netip"
	"strings"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// Cat joins expression lists into one rule.
func Cat(parts ...[]expr.Any) []expr.Any {
	var out []expr.Any
	for _, p := range parts {
		out = append(out, p...)
	}
	return out
}

// Logged logs to NFLOG group with prefix, then applies v.
func Logged(group uint16, prefix string, v *expr.Verdict) []expr.Any {
	return []expr.Any{
		&expr.Log{Key: 1<<unix.NFTA_LOG_GROUP | 1<<unix.NFTA_LOG_PREFIX, Group: group, Data: []byte(prefix)},
		v,
	}
}

// IfName matches (eq) or excludes (!eq) one interface by name; a name
// ending in '*' matches as a prefix.
func IfName(key expr.MetaKey, name string, eq bool) []expr.Any {
	op := expr.CmpOpEq
	if !eq {
		op = expr.CmpOpNeq
	}
	data := []byte(name)
	if strings.HasSuffix(name, "*") {
		data = data[:len(data)-1]
	} else {
		data = IfNameBytes(name)
	}
	return []expr.Any{&expr.Meta{Key: key, Register: 1}, &expr.Cmp{Op: op, Register: 1, Data: data}}
}

// IfNameBytes pads an interface name as the kernel compares it.
func IfNameBytes(n string) []byte {
	b := make([]byte, unix.IFNAMSIZ)
	copy(b, n)
	return b
}

// NFProto is the netfilter family number of IPv4 or IPv6.
func NFProto(is6 bool) uint32 {
	if is6 {
		return unix.NFPROTO_IPV6
	}
	return unix.NFPROTO_IPV4
}

// Family matches packets of one IP family (in inet tables).
func Family(is6 bool) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{byte(NFProto(is6))}},
	}
}

// EtherType matches frames of one IP family in bridge tables, whose
// nfproto (Family) is the bridge's.
func EtherType(is6 bool) []expr.Any {
	if is6 {
		return EtherTypeIs(unix.ETH_P_IPV6)
	}
	return EtherTypeIs(unix.ETH_P_IP)
}

// EtherTypeIs matches frames of a link-layer protocol (unix.ETH_P_*) in
// bridge tables.
func EtherTypeIs(p uint16) []expr.Any {
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseLLHeader, Offset: 12, Len: 2},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.BigEndian.PutUint16(p)},
	}
}

// LoadAddr loads the packet's source or destination address of the
// family (already matched) into register 1.
func LoadAddr(is6, src bool) *expr.Payload {
	off := uint32(16) // in the IPv4 header
	switch {
	case is6 && src:
		off = 8
	case is6:
		off = 24
	case src:
		off = 12
	}
	return &expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: off, Len: AddrLen(is6)}
}

// AddrLen is the length of an address of the family.
func AddrLen(is6 bool) uint32 {
	if is6 {
		return 16
	}
	return 4
}

// L4 matches one transport protocol.
func L4(proto byte) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{proto}},
	}
}

// Dport matches a TCP or UDP destination port (after L4).
func Dport(port uint16) []expr.Any {
	return []expr.Any{
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.BigEndian.PutUint16(port)},
	}
}

// Daddr matches packets to a.
func Daddr(a netip.Addr) []expr.Any {
	return DaddrIn(netip.PrefixFrom(a, a.BitLen()))
}

// NotDaddr matches packets of a's family to any other address.
func NotDaddr(a netip.Addr) []expr.Any {
	is6 := a.Is6()
	return Cat(Family(is6), []expr.Any{
		LoadAddr(is6, false),
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: a.AsSlice()},
	})
}

// DaddrIn matches packets to the prefix p.
func DaddrIn(p netip.Prefix) []expr.Any {
	return Cat(Family(p.Addr().Is6()), AddrIn(p, false))
}

// AddrIn matches packets of p's family (already matched) whose source
// or destination address is in p.
func AddrIn(p netip.Prefix, src bool) []expr.Any {
	is6 := p.Addr().Is6()
	n := AddrLen(is6)
	return []expr.Any{
		LoadAddr(is6, src),
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: n, Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen()), Xor: make([]byte, n)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: p.Masked().Addr().AsSlice()},
	}
}

// MarkIs matches the packet mark m.
func MarkIs(m uint32) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(m)},
	}
}

// SetMark sets the packet's mark to m.
func SetMark(m uint32) []expr.Any {
	return []expr.Any{
		&expr.Immediate{Register: 1, Data: binaryutil.NativeEndian.PutUint32(m)},
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1, SourceRegister: true},
	}
}

// MarkMasked matches packets whose mark, masked, is m.
func MarkMasked(m, mask uint32) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: binaryutil.NativeEndian.PutUint32(mask), Xor: make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(m)},
	}
}

// SetMarkBits sets the packet's mark to (mark & mask) ^ xor, leaving
// the bits of others be: mask ^b and xor b set b, xor 0 clears it.
func SetMarkBits(mask, xor uint32) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: binaryutil.NativeEndian.PutUint32(mask), Xor: binaryutil.NativeEndian.PutUint32(xor)},
		&expr.Meta{Key: expr.MetaKeyMARK, Register: 1, SourceRegister: true},
	}
}

// SetCtMark sets the connection's mark to m.
func SetCtMark(m uint32) []expr.Any {
	return []expr.Any{
		&expr.Immediate{Register: 1, Data: binaryutil.NativeEndian.PutUint32(m)},
		&expr.Ct{Key: expr.CtKeyMARK, Register: 1, SourceRegister: true},
	}
}

// CtMarkIs matches packets whose connection carries mark m.
func CtMarkIs(m uint32) []expr.Any {
	return []expr.Any{
		&expr.Ct{Key: expr.CtKeyMARK, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(m)},
	}
}

// CtMarkMasked matches packets whose connection's mark, masked, is m.
func CtMarkMasked(m, mask uint32) []expr.Any {
	return []expr.Any{
		&expr.Ct{Key: expr.CtKeyMARK, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: binaryutil.NativeEndian.PutUint32(mask), Xor: make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.NativeEndian.PutUint32(m)},
	}
}

// CtExpected matches connections conntrack expected: a helper (ftp's,
// sip's) announced them.
func CtExpected() []expr.Any {
	return []expr.Any{
		&expr.Ct{Key: expr.CtKeySTATUS, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: binaryutil.NativeEndian.PutUint32(1 << 0 /* IPS_EXPECTED */), Xor: make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: make([]byte, 4)},
	}
}

// Established matches connections conntrack knows: established or related.
func Established() []expr.Any {
	return CtState(expr.CtStateBitESTABLISHED | expr.CtStateBitRELATED)
}

// CtReply matches packets of a connection's reply direction: the side
// that did not open it.
func CtReply() []expr.Any {
	return []expr.Any{
		&expr.Ct{Key: expr.CtKeyDIRECTION, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{1 /* IP_CT_DIR_REPLY */}},
	}
}

// CtStateNew matches a connection's first packet.
func CtStateNew() []expr.Any { return CtState(expr.CtStateBitNEW) }

// CtState matches packets whose connection is in one of states
// (expr.CtStateBit*).
func CtState(states uint32) []expr.Any {
	return []expr.Any{
		&expr.Ct{Key: expr.CtKeySTATE, Register: 1},
		&expr.Bitwise{SourceRegister: 1, DestRegister: 1, Len: 4, Mask: binaryutil.NativeEndian.PutUint32(states), Xor: make([]byte, 4)},
		&expr.Cmp{Op: expr.CmpOpNeq, Register: 1, Data: make([]byte, 4)},
	}
}

// NeighbourDiscovery matches ICMPv6 types 133-136.
func NeighbourDiscovery() []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_ICMPV6}},
		&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 0, Len: 1},
		&expr.Range{Op: expr.CmpOpEq, Register: 1, FromData: []byte{133}, ToData: []byte{136}},
	}
}

// DNSTo redirects DNS of to's family over proto (UDP or TCP) to to, port 53.
func DNSTo(to netip.Addr, proto byte) []expr.Any {
	return Cat(Family(to.Is6()), L4(proto), Dport(53), []expr.Any{
		&expr.Immediate{Register: 1, Data: to.AsSlice()},
		&expr.NAT{Type: expr.NATTypeDestNAT, Family: NFProto(to.Is6()), RegAddrMin: 1},
	})
}

// ForceBuffers sets a netlink socket's buffers (the options
// SO_SNDBUFFORCE, SO_RCVBUFFORCE) past the sysctl maxima, as root may:
// the kernel acknowledges every message of an nftables transaction, and
// the default buffers hold a few hundred.
func ForceBuffers(c *netlink.Conn, size int, opts ...int) error {
	raw, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := raw.Control(func(fd uintptr) {
		for _, opt := range opts {
			if serr == nil {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, opt, size)
			}
		}
	}); err != nil {
		return err
	}
	return serr
}

// Flush sends c's transaction. The library returns one error per
// message the kernel refused, joined line by line, and a transaction
// refused at one message refuses every one after it (a table deleted
// meanwhile: one error per rule, 77 lines): the first says why, the
// others are counted, so that the error stays one line.
func Flush(c *nftables.Conn) error {
	err := c.Flush()
	if err == nil {
		return nil
	}
	first, rest, many := strings.Cut(err.Error(), "\n")
	if !many {
		return err
	}
	return &batchError{err, fmt.Sprintf("%s (and %d more errors)", first, strings.Count(rest, "\n")+1)}
}

type batchError struct {
	err error
	msg string
}

func (e *batchError) Error() string { return e.msg }
func (e *batchError) Unwrap() error { return e.err }
