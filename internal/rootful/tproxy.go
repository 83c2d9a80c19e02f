package rootful

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/childflow/childflow/policy"
)

// startTProxy listens, on both gateway addresses and one port, for the
// TCP connections the table intercepts; each is carried by the proxy.
func (sb *Sandbox) startTProxy() (uint16, error) {
	lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
		var serr error
		c.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_TRANSPARENT, 1)
			if serr == nil {
				unix.SetsockoptInt(int(fd), unix.SOL_IPV6, unix.IPV6_TRANSPARENT, 1)
			}
		})
		return serr
	}}
	var port uint16
	for _, gw := range sb.Plan.Gateways() {
		ln, err := lc.Listen(context.Background(), "tcp", netip.AddrPortFrom(gw, port).String())
		if err != nil {
			return 0, fmt.Errorf("listening for intercepted connections: %w", err)
		}
		sb.closers = append(sb.closers, ln)
		port = uint16(ln.Addr().(*net.TCPAddr).Port)
		sb.spawn(func() { sb.serveConns(ln, sb.proxied) })
	}
	return port, nil
}

// proxied decides one intercepted connection as the rootless engine
// does for a proxied flow, and carries it through the proxy.
func (sb *Sandbox) proxied(c net.Conn) {
	defer c.Close()
	src, _ := netip.ParseAddrPort(c.RemoteAddr().String())
	dst, _ := netip.ParseAddrPort(c.LocalAddr().String()) // the original destination
	src, dst = netip.AddrPortFrom(src.Addr().Unmap(), src.Port()), netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	names := sb.cache.Names(dst.Addr())
	d := sb.cfg.Policy.Decide(policy.Flow{Proto: policy.TCP, Dst: dst, Names: names, ViaProxy: true})
	if d.Allow && sb.cfg.Proxy.IsSelf(dst) {
		d = policy.ProxyLoop
	}
	res := sb.events.Attempt(sb.events.Flow(policy.TCP, src, dst, names), d)
	if !d.Allow {
		resetOnClose(c)
		return
	}
	res.Proxy = sb.cfg.Proxy.String()
	res.ProxyHost = sb.cfg.Proxy.NameFor(sb.cfg.Policy, d.Reason, sb.cache.Hostname(dst.Addr()))
	ctx, cancel := context.WithTimeout(sb.ctx, 30*time.Second)
	up, err := sb.cfg.Proxy.Dial(ctx, dst, res.ProxyHost)
	cancel()
	sb.events.Result(res, err)
	if err != nil {
		resetOnClose(c)
		return
	}
	start := time.Now()
	bytesUp, bytesDown, resetBy := sb.buffers.Splice(sb.ctx, c, up)
	res.ResetBy = resetBy
	sb.events.End(res, bytesUp, bytesDown, time.Since(start).Milliseconds())
}

// resetOnClose makes Close send a RST: the client sees the refusal at
// once, as from the rootless engine.
func resetOnClose(c net.Conn) {
	if tc, ok := c.(*net.TCPConn); ok {
		tc.SetLinger(0)
	}
}
