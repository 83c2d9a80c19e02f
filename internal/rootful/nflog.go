package rootful

import (
	"encoding/binary"
	"fmt"
	"net/netip"
	"time"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// A minimal NFLOG reader (nfnetlink_log): the rules log the first packet
// of every flow they decide, with the verdict and reason as the prefix.
// (github.com/florianl/go-nflog is not on the module proxy here.)

const (
	nfulnlMsgPacket = 0
	nfulnlMsgConfig = 1
	nfulaCfgCmd     = 1
	nfulaCfgMode    = 2
	nfulaCfgQThresh = 5
	nfulnlCfgBind   = 1
	nfulnlCopyPkt   = 2
	nfulaPayload    = 9
	nfulaPrefix     = 10
)

type nflog struct {
	c     *netlink.Conn
	group uint16
}

// logged is one logged packet's prefix and its first bytes.
type loggedPacket struct {
	prefix  string
	payload []byte
}

func openNFLOG(group uint16) (*nflog, error) {
	c, err := netlink.Dial(unix.NETLINK_NETFILTER, nil)
	if err != nil {
		return nil, fmt.Errorf("opening nflog: %w", err)
	}
	// Room for a burst of new flows: verdicts that do not fit are lost
	// (ENOBUFS, marked in the flow log by watchFlows).
	if err := forceReadBuffer(c, 8<<20); err != nil {
		c.Close()
		return nil, fmt.Errorf("opening nflog: %w", err)
	}
	l := &nflog{c: c, group: group}
	mode := make([]byte, 6)
	binary.BigEndian.PutUint32(mode, 128) // headers are enough
	mode[4] = nfulnlCopyPkt
	if err := l.config(netlink.Attribute{Type: nfulaCfgCmd, Data: []byte{nfulnlCfgBind}}); err != nil {
		c.Close()
		return nil, fmt.Errorf("binding nflog group %d: %w", group, err)
	}
	// One message per packet, at once: the kernel's default batches up
	// to 100 packets or a second, and the last ones would come too late.
	one := binary.BigEndian.AppendUint32(nil, 1)
	for _, a := range []netlink.Attribute{{Type: nfulaCfgMode, Data: mode}, {Type: nfulaCfgQThresh, Data: one}} {
		if err := l.config(a); err != nil {
			c.Close()
			return nil, fmt.Errorf("configuring nflog group %d: %w", group, err)
		}
	}
	return l, nil
}

func (l *nflog) config(attr netlink.Attribute) error {
	attrs, err := netlink.MarshalAttributes([]netlink.Attribute{attr})
	if err != nil {
		return err
	}
	hdr := []byte{unix.AF_UNSPEC, unix.NFNETLINK_V0, byte(l.group >> 8), byte(l.group)}
	_, err = l.c.Execute(netlink.Message{
		Header: netlink.Header{Type: netlink.HeaderType(unix.NFNL_SUBSYS_ULOG<<8 | nfulnlMsgConfig), Flags: netlink.Request | netlink.Acknowledge},
		Data:   append(hdr, attrs...),
	})
	return err
}

// read blocks for the next batch of logged packets.
func (l *nflog) read() ([]loggedPacket, error) {
	msgs, err := l.c.Receive()
	if err != nil {
		return nil, err
	}
	var out []loggedPacket
	for _, m := range msgs {
		if m.Header.Type != netlink.HeaderType(unix.NFNL_SUBSYS_ULOG<<8|nfulnlMsgPacket) || len(m.Data) < 4 {
			continue
		}
		ad, err := netlink.NewAttributeDecoder(m.Data[4:])
		if err != nil {
			continue
		}
		var p loggedPacket
		for ad.Next() {
			switch ad.Type() {
			case nfulaPrefix:
				p.prefix = ad.String()
			case nfulaPayload:
				p.payload = ad.Bytes()
			}
		}
		if p.payload != nil {
			out = append(out, p)
		}
	}
	return out, nil
}

// drain lets the reader take what comes in the next 20 ms, then fail:
// its loop ends unless it drains again (watchFlows, up to drainFor).
// The drain begins once the sandbox's last process is gone: a verdict is
// queued as its packet passes the rule, one message per packet, and
// only packets the kernel has yet to carry over the veth can come.
func (l *nflog) drain() { l.c.SetReadDeadline(time.Now().Add(20 * time.Millisecond)) }

// pending says whether a message waits to be read.
func (l *nflog) pending() bool {
	rc, err := l.c.SyscallConn()
	if err != nil {
		return false
	}
	ready := false
	rc.Control(func(fd uintptr) {
		p := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		n, err := unix.Poll(p, 0)
		ready = err == nil && n > 0 && p[0].Revents&unix.POLLIN != 0
	})
	return ready
}

// drainFor bounds how long a sandbox's end waits for its verdicts to be
// read (after one that opened 8192 connections, the rest took 0.3 s).
const drainFor = 5 * time.Second

// Close unbinds the group with the socket (an unbind message would wait
// for the reader holding the connection).
func (l *nflog) Close() error { return l.c.Close() }

// flowKey is a packet's protocol and addresses.
type flowKey struct {
	proto    byte
	src, dst netip.AddrPort
}

// parsePacket reads the 5-tuple of an IPv4 or IPv6 packet (no extension
// headers are followed). An echo request's source port is its
// identifier, as the rootless engine has it: one ping is one flow, and
// the identifier finds its socket; other ICMP has ports zero.
func parsePacket(b []byte) (flowKey, bool) {
	var k flowKey
	if len(b) < 1 {
		return k, false
	}
	var l4 []byte
	var src, dst netip.Addr
	switch b[0] >> 4 {
	case 4:
		if len(b) < 20 {
			return k, false
		}
		ihl := int(b[0]&0xf) * 4
		k.proto = b[9]
		src, _ = netip.AddrFromSlice(b[12:16])
		dst, _ = netip.AddrFromSlice(b[16:20])
		if len(b) >= ihl {
			l4 = b[ihl:]
		}
	case 6:
		if len(b) < 40 {
			return k, false
		}
		k.proto = b[6]
		src, _ = netip.AddrFromSlice(b[8:24])
		dst, _ = netip.AddrFromSlice(b[24:40])
		l4 = b[40:]
	default:
		return k, false
	}
	var sp, dp uint16
	switch {
	case (k.proto == unix.IPPROTO_TCP || k.proto == unix.IPPROTO_UDP) && len(l4) >= 4:
		sp, dp = binary.BigEndian.Uint16(l4), binary.BigEndian.Uint16(l4[2:])
	case len(l4) >= 6 && (k.proto == unix.IPPROTO_ICMP && l4[0] == 8 || k.proto == unix.IPPROTO_ICMPV6 && l4[0] == 128):
		sp = binary.BigEndian.Uint16(l4[4:])
	}
	k.src, k.dst = netip.AddrPortFrom(src, sp), netip.AddrPortFrom(dst, dp)
	return k, true
}
