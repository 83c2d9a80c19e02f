package engine

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"syscall"
	"time"

	"github.com/childflow/childflow/engine/dns"
	"github.com/childflow/childflow/engine/netstack"
	"github.com/childflow/childflow/engine/upstream"
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
		c, err := r.Accept(floor.window)
		if err == nil {
			dns.ServeTCP(e.ctx, e.resolver, c)
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
	ctx, closed := upstream.Watch(ctx, e.cfg.OnUpstream)
	defer closed()
	start := time.Now()
	res := ev
	res.Upstream = up.String()
	var host net.Conn
	var err error
	if viaProxy {
		pol := e.policy.Load()
		if !e.cfg.CallerOwnsHost {
			// A container's flows never reach the identity endpoints
			// (admit): nor may a name the proxy resolves.
			identity := *pol
			identity.BlockMetadata = true
			pol = &identity
		}
		res.Proxy = e.cfg.Proxy.String()
		res.ProxyHost = e.cfg.Proxy.NameFor(pol, ev.ReasonCode, e.cache.Hostname(r.Dst.Addr()))
		host, err = e.cfg.Proxy.Dial(ctx, up, res.ProxyHost)
	} else {
		host, err = e.cfg.Dial(ctx, "tcp", up.String())
	}
	cancel()
	if err != nil {
		e.events.Result(res, err)
		if why, ok := unreachable(err); ok && !viaProxy {
			r.Unreachable(why)
		} else {
			r.Reject()
		}
		return
	}
	bufs := e.cfg.Buffers.take()
	defer e.cfg.Buffers.give(bufs)
	sandbox, err := r.Accept(bufs.window)
	e.events.Result(res, err)
	if err != nil {
		// The sandbox's side is gone before it was ours (a connection
		// reset as soon as it was open): so is the upstream's.
		reset(host)
		return
	}
	e.uploads.Add(1)
	bytesUp, bytesDown := splice(e.ctx, sandbox, host, bufs.pool, func() { e.uploads.Add(-1) })
	e.events.End(res, bytesUp, bytesDown, time.Since(start).Milliseconds())
}

// Splice relays two host sockets (the rootful backend's proxied flows)
// as the engine does its flows, with copy buffers from b. The kernel
// holds their windows, but the tiers cost as much as the engine's: the
// copy buffers' bound errs on the safe side.
func (b *BufferBudget) Splice(ctx context.Context, sandbox, upstream net.Conn) (up, down int64) {
	bufs := b.take()
	defer b.give(bufs)
	return splice(ctx, sandbox, upstream, bufs.pool, func() {})
}

// splice copies both ways until both directions are done, passing on
// half-closes, or until ctx ends; uploaded is called once the sandbox's
// side is done. Back-pressure comes from the blocking writes, so a peer
// that stops reading holds a copy in a write that only closing the
// connections ends.
func splice(ctx context.Context, sandbox, upstream net.Conn, buffers *sync.Pool, uploaded func()) (up, down int64) {
	stop := context.AfterFunc(ctx, func() {
		sandbox.Close()
		upstream.Close()
	})
	defer stop()
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer uploaded()
		up = copyHalf(upstream, sandbox, buffers)
	}()
	down = copyHalf(sandbox, upstream, buffers)
	wg.Wait()
	sandbox.Close()
	upstream.Close()
	return up, down
}

type closeWriter interface{ CloseWrite() error }

// copyHalf copies src to dst. On EOF it half-closes dst; on a reset it
// resets dst, since an abort taken for an end would pass a truncated
// stream off as complete; on another error it closes both, which also
// ends the other direction.
func copyHalf(dst, src net.Conn, buffers *sync.Pool) int64 {
	bp := buffers.Get().(*[]byte)
	defer buffers.Put(bp)
	buf := *bp
	var n int64
	for {
		nr, rerr := src.Read(buf)
		if nr > 0 {
			nw, werr := dst.Write(buf[:nr])
			n += int64(nw)
			if werr != nil {
				if isReset(werr) {
					reset(src)
				}
				src.Close()
				dst.Close()
				return n
			}
		}
		if rerr != nil {
			switch {
			case errors.Is(rerr, io.EOF):
				if cw, ok := dst.(closeWriter); ok {
					cw.CloseWrite()
				}
			case isReset(rerr):
				reset(dst)
				fallthrough
			default:
				src.Close()
				dst.Close()
			}
			return n
		}
	}
}

func isReset(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

// reset closes c, with a RST where it can: on the sandbox's side, or on
// a host socket under whatever wraps it (a proxy's TLS or buffer).
func reset(c net.Conn) {
	for under := c; under != nil; {
		switch u := under.(type) {
		case interface{ Reset() error }:
			u.Reset()
			under = nil
		case *net.TCPConn:
			u.SetLinger(0)
			under = nil
		case interface{ NetConn() net.Conn }:
			under = u.NetConn()
		default:
			under = nil
		}
	}
	c.Close()
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
			dns.ServeTCP(e.ctx, e.resolver, c)
		}()
	}
}
