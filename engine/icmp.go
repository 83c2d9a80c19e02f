package engine

import (
	"bytes"
	"net"
	"net/netip"
	"time"

	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"

	"github.com/childflow/childflow/engine/netstack"
	"github.com/childflow/childflow/policy"
)

const echoTimeout = 5 * time.Second

func (e *Engine) handleEcho(req netstack.EchoRequest, reply func()) {
	src, dst := netip.AddrPortFrom(req.Src, 0), netip.AddrPortFrom(req.Dst, 0)
	ev, ok := e.admit(policy.ICMP, src, dst, false)
	if !ok {
		return
	}
	if !e.acquire() {
		return
	}
	e.wg.Add(1)
	go func() {
		defer e.wg.Done()
		defer e.release()
		res := ev
		target := e.upstreamAddr(dst).Addr()
		res.Upstream = target.String()
		err := ping(target, req)
		if err == nil {
			reply()
		}
		e.events.Result(res, err)
	}()
}

// ping sends one echo request from the host and waits for its reply. It
// uses an unprivileged ICMP socket (net.ipv4.ping_group_range) where the
// host allows one, else a raw socket (CAP_NET_RAW).
func ping(target netip.Addr, req netstack.EchoRequest) error {
	v4 := target.Is4()
	nets := []string{"udp6", "ip6:ipv6-icmp"}
	var typ, replyType icmp.Type = ipv6.ICMPTypeEchoRequest, ipv6.ICMPTypeEchoReply
	proto := 58
	if v4 {
		nets = []string{"udp4", "ip4:icmp"}
		typ, replyType, proto = ipv4.ICMPTypeEcho, ipv4.ICMPTypeEchoReply, 1
	}
	var conn *icmp.PacketConn
	var err error
	var raw bool
	for i, n := range nets {
		if conn, err = icmp.ListenPacket(n, ""); err == nil {
			raw = i == 1
			break
		}
	}
	if err != nil {
		return err
	}
	defer conn.Close()
	msg := icmp.Message{Type: typ, Body: &icmp.Echo{ID: int(req.ID), Seq: int(req.Seq), Data: req.Payload}}
	b, err := msg.Marshal(nil)
	if err != nil {
		return err
	}
	var to net.Addr = &net.UDPAddr{IP: target.AsSlice()}
	if raw {
		to = &net.IPAddr{IP: target.AsSlice()}
	}
	if _, err := conn.WriteTo(b, to); err != nil {
		return err
	}
	conn.SetReadDeadline(time.Now().Add(echoTimeout))
	buf := make([]byte, 65535)
	for {
		n, from, err := conn.ReadFrom(buf)
		if err != nil {
			return err
		}
		m, err := icmp.ParseMessage(proto, buf[:n])
		if err != nil || m.Type != replyType {
			continue
		}
		echo, ok := m.Body.(*icmp.Echo)
		// Ping sockets rewrite the id; raw sockets see every reply, so
		// match the sender and id there.
		if !ok || echo.Seq != int(req.Seq) || !bytes.Equal(echo.Data, req.Payload) {
			continue
		}
		if raw && (echo.ID != int(req.ID) || addrOf(from) != target) {
			continue
		}
		return nil
	}
}

func addrOf(a net.Addr) netip.Addr {
	var ip net.IP
	switch a := a.(type) {
	case *net.IPAddr:
		ip = a.IP
	case *net.UDPAddr:
		ip = a.IP
	}
	addr, _ := netip.AddrFromSlice(ip)
	return addr.Unmap()
}
