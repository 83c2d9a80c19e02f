// Package proxy carries the sandbox's TCP flows through a forced upstream
// proxy: HTTP CONNECT over TCP or TLS, or SOCKS5, with credentials. The
// proxy is told the hostname the sandbox resolved where the policy would
// have allowed whatever address the proxy resolves it to (NameFor).
package proxy

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/childflow/childflow/engine/proxy/uri"
	"github.com/childflow/childflow/engine/upstream"
	"github.com/childflow/childflow/internal/netplan"
	"github.com/childflow/childflow/policy"
)

// Proxy is a parsed, validated upstream proxy.
type Proxy struct {
	Scheme   string // http, https, socks5, socks5h
	Addr     string // host:port
	host     string
	user     string
	password string
	insecure bool
	// RootCAs verifies an https proxy; nil means the system roots.
	RootCAs *x509.CertPool
	// DialContext reaches the proxy itself. Nil: a net.Dialer that
	// reports to an upstream.Watch in the context.
	DialContext func(ctx context.Context, network, addr string) (net.Conn, error)

	selfOnce sync.Once
	self     []netip.AddrPort // the proxy's own addresses, for IsSelf
	onHost   bool             // the proxy runs on this host
}

// Parse validates the proxy settings (see uri.Parse) and returns the
// proxy they describe.
func Parse(name func(key string) string, raw, user, password string, insecure bool) (*Proxy, error) {
	u, err := uri.Parse(name, raw, user, password)
	if err != nil {
		return nil, err
	}
	return FromURI(&u, insecure), nil
}

// FromURI is the proxy at a validated URI; nil for none.
func FromURI(u *uri.URI, insecure bool) *Proxy {
	if u == nil {
		return nil
	}
	return &Proxy{Scheme: u.Scheme, Addr: u.Addr, host: u.Host, user: u.User, password: u.Password, insecure: insecure}
}

// Via is p reached through dial.
func (p *Proxy) Via(dial func(ctx context.Context, network, addr string) (net.Conn, error)) *Proxy {
	return &Proxy{Scheme: p.Scheme, Addr: p.Addr, host: p.host, user: p.user, password: p.password,
		insecure: p.insecure, RootCAs: p.RootCAs, DialContext: dial}
}

// IsSelf reports whether dst is the proxy itself. A sandbox's flow to it,
// carried through it, makes the proxy its own client, which then goes
// wherever the sandbox asks inside the tunnel (a SOCKS or CONNECT request
// of its own), past a policy that saw only the proxy's address.
func (p *Proxy) IsSelf(dst netip.AddrPort) bool {
	self := p.addrs()
	for _, a := range policy.Embedded(dst.Addr()) {
		if slices.Contains(self, netip.AddrPortFrom(a.Unmap(), dst.Port())) {
			return true
		}
	}
	return false
}

// addrs are the proxy's own addresses. A proxy named by host name is
// resolved once, on the first call.
func (p *Proxy) addrs() []netip.AddrPort {
	p.selfOnce.Do(func() {
		p.self = resolve(p.Addr)
		// On this host, the proxy's connections come from the host:
		// its loopback and addresses are reachable. Where that cannot
		// be told, it is taken to be here.
		local, err := netplan.LocalRoutes()
		p.onHost = err != nil || len(p.self) == 0
		for _, a := range p.self {
			p.onHost = p.onHost || a.Addr().IsLoopback() ||
				slices.ContainsFunc(local, func(r netip.Prefix) bool { return r.Contains(a.Addr()) })
		}
	})
	return p.self
}

// onThisHost reports whether the proxy runs on this host (see addrs).
func (p *Proxy) onThisHost() bool {
	p.addrs()
	return p.onHost
}

// resolve returns the addresses of hostport.
func resolve(hostport string) []netip.AddrPort {
	if ap, err := netip.ParseAddrPort(hostport); err == nil {
		return []netip.AddrPort{netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())}
	}
	host, port, err := net.SplitHostPort(hostport)
	n, perr := strconv.ParseUint(port, 10, 16)
	if err != nil || perr != nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	addrs, _ := net.DefaultResolver.LookupNetIP(ctx, "ip", host)
	var out []netip.AddrPort
	for _, a := range addrs {
		out = append(out, netip.AddrPortFrom(a.Unmap(), uint16(n)))
	}
	return out
}

// NameFor is what to tell the proxy of a flow to an address the sandbox
// resolved from name (empty: unknown) and pol allowed for reason: the
// name where any address the proxy may resolve it to would have been
// allowed too (policy.NameHoldsAnywhere), else nothing, and the proxy is
// given the address. So is it for a name that is no plain host name.
func (p *Proxy) NameFor(pol *policy.Policy, reason, name string) string {
	if !plainHostname(name) || !pol.NameHoldsAnywhere(name, reason, p.onThisHost()) {
		return ""
	}
	return name
}

// plainHostname reports whether name is letters, digits, '-', '_' and
// dots, at most 253 of them. A DNS label may hold any byte, which the
// resolver writes escaped ("a\032b", "a\ b"): longer than SOCKS5's
// length byte holds, such a name would be cut short there (the proxy
// would take its first bytes for the name, the next two for the port),
// and a space in it would end a CONNECT request's target.
func plainHostname(name string) bool {
	if name == "" || len(name) > 253 {
		return false
	}
	for _, c := range []byte(name) {
		if !('a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9' || c == '-' || c == '_' || c == '.') {
			return false
		}
	}
	return true
}

// String names the proxy without credentials.
func (p *Proxy) String() string { return p.Scheme + "://" + p.Addr }

// Dial opens a connection to target through the proxy. host, if not
// empty, is the name the sandbox resolved to target: HTTP and socks5h
// proxies are given the name, socks5 the address.
func (p *Proxy) Dial(ctx context.Context, target netip.AddrPort, host string) (net.Conn, error) {
	dial := p.DialContext
	if dial == nil {
		dial = upstream.Dialer(nil).DialContext // the egress capture follows it
	}
	c, err := dial(ctx, "tcp", p.Addr)
	if err != nil {
		return nil, fmt.Errorf("proxy %s: %w", p, err)
	}
	if deadline, ok := ctx.Deadline(); ok {
		c.SetDeadline(deadline)
	}
	conn, err := p.handshake(ctx, c, target, host)
	if err != nil {
		c.Close()
		return nil, fmt.Errorf("proxy %s: %w", p, err)
	}
	conn.SetDeadline(time.Time{})
	return conn, nil
}

func (p *Proxy) handshake(ctx context.Context, c net.Conn, target netip.AddrPort, host string) (net.Conn, error) {
	switch p.Scheme {
	case "https":
		tc := tls.Client(c, p.tlsConfig())
		if err := tc.HandshakeContext(ctx); err != nil {
			return nil, fmt.Errorf("TLS: %w", err)
		}
		return p.connect(tc, target, host)
	case "http":
		return p.connect(c, target, host)
	case "socks5h":
		return p.socks5(c, target, host)
	default:
		return p.socks5(c, target, "")
	}
}

// tlsConfig verifies the proxy's certificate; --proxy-insecure skips the
// chain but still checks that it was issued for the proxy's host name.
func (p *Proxy) tlsConfig() *tls.Config {
	cfg := &tls.Config{ServerName: p.host, RootCAs: p.RootCAs, MinVersion: tls.VersionTLS12}
	if p.insecure {
		cfg.InsecureSkipVerify = true
		cfg.VerifyConnection = func(cs tls.ConnectionState) error {
			if len(cs.PeerCertificates) == 0 {
				return errors.New("proxy sent no certificate")
			}
			return cs.PeerCertificates[0].VerifyHostname(p.host)
		}
	}
	return cfg
}

// bufferedConn keeps the bytes read past a CONNECT response: a server
// that speaks first may already have sent them.
type bufferedConn struct {
	net.Conn
	r *bufio.Reader
}

func (b *bufferedConn) Read(p []byte) (int, error) { return b.r.Read(p) }

// NetConn is the connection under the buffer (a reset is sent on it).
func (b *bufferedConn) NetConn() net.Conn { return b.Conn }

func (b *bufferedConn) CloseWrite() error {
	if cw, ok := b.Conn.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return nil
}

func (p *Proxy) connect(c net.Conn, target netip.AddrPort, host string) (net.Conn, error) {
	authority := target.String()
	if host != "" {
		authority = net.JoinHostPort(host, strconv.Itoa(int(target.Port())))
	}
	req := "CONNECT " + authority + " HTTP/1.1\r\nHost: " + authority + "\r\n"
	if p.user != "" {
		req += "Proxy-Authorization: Basic " + base64.StdEncoding.EncodeToString([]byte(p.user+":"+p.password)) + "\r\n"
	}
	req += "\r\n"
	if _, err := io.WriteString(c, req); err != nil {
		return nil, err
	}
	br := bufio.NewReader(c)
	resp, err := http.ReadResponse(br, &http.Request{Method: http.MethodConnect})
	if err != nil {
		return nil, fmt.Errorf("reading CONNECT response: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("CONNECT %s: %s", authority, resp.Status)
	}
	return &bufferedConn{Conn: c, r: br}, nil
}

var socksReplies = map[byte]string{
	1: "general failure", 2: "connection not allowed by ruleset", 3: "network unreachable",
	4: "host unreachable", 5: "connection refused", 6: "TTL expired", 7: "command not supported",
	8: "address type not supported",
}

func (p *Proxy) socks5(c net.Conn, target netip.AddrPort, host string) (net.Conn, error) {
	methods := []byte{0}
	if p.user != "" {
		methods = []byte{2}
	}
	if _, err := c.Write(append([]byte{5, byte(len(methods))}, methods...)); err != nil {
		return nil, err
	}
	var sel [2]byte
	if _, err := io.ReadFull(c, sel[:]); err != nil {
		return nil, fmt.Errorf("SOCKS5 greeting: %w", err)
	}
	switch {
	case sel[0] != 5:
		return nil, fmt.Errorf("not a SOCKS5 proxy")
	case sel[1] == 0xff:
		return nil, fmt.Errorf("SOCKS5: no acceptable authentication method (credentials needed?)")
	case sel[1] == 2:
		if p.user == "" {
			return nil, fmt.Errorf("SOCKS5 proxy asks for a user name and password")
		}
		auth := []byte{1, byte(len(p.user))}
		auth = append(auth, p.user...)
		auth = append(auth, byte(len(p.password)))
		auth = append(auth, p.password...)
		if _, err := c.Write(auth); err != nil {
			return nil, err
		}
		var st [2]byte
		if _, err := io.ReadFull(c, st[:]); err != nil {
			return nil, fmt.Errorf("SOCKS5 authentication: %w", err)
		}
		if st[1] != 0 {
			return nil, fmt.Errorf("SOCKS5 authentication failed")
		}
	case sel[1] != 0:
		return nil, fmt.Errorf("SOCKS5 proxy chose unsupported method %d", sel[1])
	}
	req := []byte{5, 1, 0}
	switch {
	case host != "" && len(host) <= 255:
		req = append(req, 3, byte(len(host)))
		req = append(req, host...)
	case target.Addr().Is4():
		a := target.Addr().As4()
		req = append(append(req, 1), a[:]...)
	default:
		a := target.Addr().As16()
		req = append(append(req, 4), a[:]...)
	}
	req = binary.BigEndian.AppendUint16(req, target.Port())
	if _, err := c.Write(req); err != nil {
		return nil, err
	}
	var head [4]byte
	if _, err := io.ReadFull(c, head[:]); err != nil {
		return nil, fmt.Errorf("SOCKS5 reply: %w", err)
	}
	if head[1] != 0 {
		msg := socksReplies[head[1]]
		if msg == "" {
			msg = fmt.Sprintf("error %d", head[1])
		}
		return nil, fmt.Errorf("SOCKS5 CONNECT %s: %s", target, msg)
	}
	var skip int
	switch head[3] {
	case 1:
		skip = 4
	case 4:
		skip = 16
	case 3:
		var l [1]byte
		if _, err := io.ReadFull(c, l[:]); err != nil {
			return nil, err
		}
		skip = int(l[0])
	default:
		return nil, fmt.Errorf("SOCKS5 reply with address type %d", head[3])
	}
	if _, err := io.ReadFull(c, make([]byte, skip+2)); err != nil {
		return nil, err
	}
	return c, nil
}
