package engine

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/childflow/childflow/engine/dns"
	"github.com/childflow/childflow/engine/flowlog"
	"github.com/childflow/childflow/engine/netstack"
	"github.com/childflow/childflow/engine/upstream"
	"github.com/childflow/childflow/policy"
)

func (e *Engine) handleTCP(r *netstack.TCPRequest) {
	if !e.acquire(true) {
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
	bytesUp, bytesDown, resetBy := splice(e.ctx, sandbox, host, bufs.pool, func() { e.uploads.Add(-1) })
	res.ResetBy = resetBy
	e.events.End(res, bytesUp, bytesDown, time.Since(start).Milliseconds())
}

// Splice relays two host sockets (the rootful backend's proxied flows)
// as the engine does its flows, with copy buffers from b. The kernel
// holds their windows, but the tiers cost as much as the engine's: the
// copy buffers' bound errs on the safe side.
func (b *BufferBudget) Splice(ctx context.Context, sandbox, upstream net.Conn) (up, down int64, resetBy string) {
	bufs := b.take()
	defer b.give(bufs)
	return splice(ctx, sandbox, upstream, bufs.pool, func() {})
}

// splice copies both ways until both directions are done, passing on
// half-closes and resets, or until ctx ends; uploaded is called once the
// sandbox's side is done. resetBy names the side whose reset ended the
// connection (flowlog.ResetBy*), if one did. Back-pressure comes from
// the blocking writes, so a peer that stops reading holds a copy in a
// write that only closing the connections ends.
func splice(ctx context.Context, sandbox, upstream net.Conn, buffers *sync.Pool, uploaded func()) (up, down int64, resetBy string) {
	stop := context.AfterFunc(ctx, func() {
		sandbox.Close()
		upstream.Close()
	})
	defer stop()
	s, u := &side{Conn: sandbox}, &side{Conn: upstream}
	var wg sync.WaitGroup
	var sandboxReset, upstreamReset bool
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer uploaded()
		up, sandboxReset = copyHalf(u, s, buffers)
	}()
	down, upstreamReset = copyHalf(s, u, buffers)
	wg.Wait()
	sandbox.Close()
	upstream.Close()
	switch {
	case upstreamReset:
		resetBy = flowlog.ResetByDestination
	case sandboxReset:
		resetBy = flowlog.ResetBySandbox
	}
	return up, down, resetBy
}

// side is one connection of a splice.
type side struct {
	net.Conn
	halfClosed atomic.Bool // our end of it is closed for writing
}

// wasReset says whether the end just read from s was a reset: a kernel
// tells of a reset once, and the other direction's write may have been
// told. A socket closed by a reset is closed while ours still sends; one
// that merely ended waits for our end (CLOSE_WAIT). (The sandbox's side
// reports its reset on every read.)
func (s *side) wasReset() bool {
	tc := hostSocket(s.Conn)
	if s.halfClosed.Load() || tc == nil {
		return false
	}
	raw, err := tc.SyscallConn()
	if err != nil {
		return false
	}
	var state uint8
	raw.Control(func(fd uintptr) {
		if info, err := unix.GetsockoptTCPInfo(int(fd), unix.IPPROTO_TCP, unix.TCP_INFO); err == nil {
			state = info.State
		}
	})
	return state == tcpClose
}

// hostSocket is the host's TCP socket c is or wraps (a proxy's TLS or
// buffer), nil if none.
func hostSocket(c net.Conn) *net.TCPConn {
	for {
		switch u := c.(type) {
		case *net.TCPConn:
			return u
		case interface{ NetConn() net.Conn }:
			c = u.NetConn()
		default:
			return nil
		}
	}
}

const tcpClose = 7 // TCP_CLOSE in include/net/tcp_states.h

type closeWriter interface{ CloseWrite() error }

// copyHalf copies src to dst, and says whether src was reset. At src's
// end it half-closes dst; at its reset it resets dst, since an abort
// taken for an end would pass a truncated stream off as complete. A
// reset dst is left to its reader, which passes it on after what it
// still has to relay. On another error it closes both, which also ends
// the other direction.
func copyHalf(dst, src *side, buffers *sync.Pool) (int64, bool) {
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
				if !isReset(werr) {
					src.Close()
					dst.Close()
				}
				return n, false
			}
		}
		if rerr != nil {
			switch {
			case isReset(rerr) || errors.Is(rerr, io.EOF) && src.wasReset():
				reset(dst.Conn)
				src.Close()
				return n, true
			case errors.Is(rerr, io.EOF):
				dst.halfClosed.Store(true)
				if cw, ok := dst.Conn.(closeWriter); ok {
					cw.CloseWrite()
				}
			default:
				src.Close()
				dst.Close()
			}
			return n, false
		}
	}
}

func isReset(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.EPIPE)
}

// reset closes c, with a RST where it can: on the sandbox's side, or on
// the host socket it is or wraps.
func reset(c net.Conn) {
	if r, ok := c.(interface{ Reset() error }); ok {
		r.Reset()
	} else if tc := hostSocket(c); tc != nil {
		tc.SetLinger(0)
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
		if !e.acquire(false) {
			c.Close()
			continue
		}
		go func() {
			defer e.release()
			dns.ServeTCP(e.ctx, e.resolver, c)
		}()
	}
}
