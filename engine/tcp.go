package engine

import (
	"context"
	"errors"
	"io"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/childflow/childflow/engine/dns"
	"github.com/childflow/childflow/engine/flowlog"
	"github.com/childflow/childflow/engine/netstack"
	"github.com/childflow/childflow/policy"
)

func (e *Engine) handleTCP(r *netstack.TCPRequest) {
	if !e.acquire() {
		r.Reject()
		return
	}
	defer e.release()
	if r.Dst.Port() == portDNS {
		// DNS over TCP to any address is answered by our resolver.
		c, err := r.Accept()
		if err == nil {
			e.serveDNSConn(c)
		}
		return
	}
	viaProxy := e.cfg.Proxy != nil
	ev, ok := e.admit(policy.TCP, r.Src, r.Dst, viaProxy)
	if !ok {
		r.Reject()
		return
	}

	up := e.upstreamAddr(r.Dst)
	ctx, cancel := context.WithTimeout(e.ctx, e.cfg.DialTimeout)
	start := time.Now()
	res := ev
	res.Upstream = up.String()
	var upstream net.Conn
	var err error
	if viaProxy {
		res.Proxy, res.ProxyHost = e.cfg.Proxy.String(), e.cache.Hostname(r.Dst.Addr())
		upstream, err = e.cfg.Proxy.Dial(ctx, up, res.ProxyHost)
		if err == nil {
			// The proxy may be named by host name: known once connected.
			remote, _ := netip.ParseAddrPort(upstream.RemoteAddr().String())
			defer e.upstreamOpen(policy.TCP, remote)()
		}
	} else {
		defer e.upstreamOpen(policy.TCP, up)()
		upstream, err = e.cfg.Dial(ctx, "tcp", up.String())
	}
	cancel()
	if err != nil {
		e.logResult(res, err)
		r.Reject()
		return
	}
	sandbox, err := r.Accept()
	e.logResult(res, err)
	if err != nil {
		upstream.Close()
		return
	}
	bytesUp, bytesDown := Splice(sandbox, upstream)
	e.logEnd(res, bytesUp, bytesDown, start)
}

var bufPool = sync.Pool{New: func() any { b := make([]byte, 256<<10); return &b }}

// Splice copies both ways until both directions are done, passing on
// half-closes. Back-pressure comes from the blocking writes.
func Splice(sandbox, upstream net.Conn) (up, down int64) {
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		up = copyHalf(upstream, sandbox)
	}()
	down = copyHalf(sandbox, upstream)
	wg.Wait()
	sandbox.Close()
	upstream.Close()
	return up, down
}

type closeWriter interface{ CloseWrite() error }

// copyHalf copies src to dst. On EOF it half-closes dst; on an error it
// closes both, which also ends the other direction.
func copyHalf(dst, src net.Conn) int64 {
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	buf := *bp
	var n int64
	for {
		nr, rerr := src.Read(buf)
		if nr > 0 {
			nw, werr := dst.Write(buf[:nr])
			n += int64(nw)
			if werr != nil {
				src.Close()
				dst.Close()
				return n
			}
		}
		if rerr != nil {
			if errors.Is(rerr, io.EOF) {
				if cw, ok := dst.(closeWriter); ok {
					cw.CloseWrite()
				}
			} else {
				src.Close()
				dst.Close()
			}
			return n
		}
	}
}

// serveDNSConn answers DNS over TCP on one connection.
func (e *Engine) serveDNSConn(c net.Conn) {
	defer c.Close()
	for {
		c.SetReadDeadline(time.Now().Add(30 * time.Second))
		msg, err := dns.ReadTCPMessage(c)
		if err != nil {
			return
		}
		resp := e.resolver.Answer(e.ctx, msg, true)
		if resp == nil || dns.WriteTCPMessage(c, resp) != nil {
			return
		}
	}
}

func (e *Engine) serveDNSListener(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		// DNS-over-TCP connections count as flows, like any other.
		if !e.acquire() {
			c.Close()
			continue
		}
		go func() {
			defer e.release()
			e.serveDNSConn(c)
		}()
	}
}

func (e *Engine) logQuery(q dns.Query) {
	ev := flowlog.Event{Event: flowlog.DNSQuery, QName: q.Name, QType: q.Type, Proto: "dns"}
	e.emit(ev)
	if !q.Decision.Allow {
		v := ev
		v.MatchedDomain = q.Decision.MatchedDomain
		e.violation(v, q.Decision)
	}
	ev.Event, ev.RCode, ev.Answers, ev.Upstream = flowlog.DNSAnswer, q.RCode, q.Answers, q.Upstream
	if q.Err != nil {
		ev.Error = q.Err.Error()
	}
	e.emit(ev)
}
