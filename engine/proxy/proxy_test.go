package proxy

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"io"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/childflow/childflow/policy"
)

func TestParse(t *testing.T) {
	for _, tc := range []struct {
		uri, user, pw string
		want          string // error substring, or "" for success
	}{
		{"http://127.0.0.1:3128", "", "", ""},
		{"https://proxy.test:443", "u", "p", ""},
		{"socks5h://[2001:db8::30]:1080", "", "", ""},
		{"socks5://alice:s3cret@127.0.0.1:1080", "", "", ""},
		{"ftp://127.0.0.1:21", "", "", "scheme must be"},
		{"http://127.0.0.1", "", "", "no port"},
		{"http://127.0.0.1:99999", "", "", "bad port"},
		{"127.0.0.1:3128", "", "", "want SCHEME://HOST:PORT"},
		{"http://127.0.0.1:3128/path", "", "", "no path"},
		{"http://127.0.0.1:3128", "", "pw", "needs --proxy-user"},
		{"http://bob:hunter2@127.0.0.1:x", "", "", "redacted@"},
	} {
		p, err := Parse(flagName, tc.uri, tc.user, tc.pw, false)
		switch {
		case tc.want == "" && err != nil:
			t.Errorf("%s: %v", tc.uri, err)
		case tc.want != "" && (err == nil || !strings.Contains(err.Error(), tc.want)):
			t.Errorf("%s: error %v, want %q", tc.uri, err, tc.want)
		case err != nil && strings.Contains(err.Error(), "hunter2"):
			t.Errorf("%s: password in error %v", tc.uri, err)
		case err == nil && strings.Contains(p.String(), "s3cret"):
			t.Errorf("String() shows the password: %s", p)
		}
	}
}

// tlsConnectProxy is an HTTPS proxy: CONNECT over TLS to an echo server,
// requiring Basic auth.
func tlsConnectProxy(t *testing.T, cert tls.Certificate, requests chan<- string) string {
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				req, err := http.ReadRequest(bufio.NewReader(c))
				if err != nil {
					return
				}
				requests <- req.Method + " " + req.Host + " " + req.Header.Get("Proxy-Authorization")
				if req.Header.Get("Proxy-Authorization") == "" {
					io.WriteString(c, "HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
					return
				}
				// The server speaks first, in the same write as the 200.
				io.WriteString(c, "HTTP/1.1 200 Connection established\r\n\r\n220 ready\r\n")
				io.Copy(c, c)
			}()
		}
	}()
	return ln.Addr().String()
}

func selfSigned(t *testing.T, dnsName string, ip net.IP) (tls.Certificate, *x509.CertPool) {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test proxy"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		IsCA: true, BasicConstraintsValid: true,
	}
	if dnsName != "" {
		tmpl.DNSNames = []string{dnsName}
	}
	if ip != nil {
		tmpl.IPAddresses = []net.IP{ip}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	pool := x509.NewCertPool()
	pool.AddCert(cert)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}, pool
}

func TestHTTPSProxyTrust(t *testing.T) {
	target := netip.MustParseAddrPort("203.0.113.10:25")
	requests := make(chan string, 10)
	goodCert, goodPool := selfSigned(t, "", net.ParseIP("127.0.0.1"))
	wrongNameCert, wrongPool := selfSigned(t, "elsewhere.test", nil)
	good := tlsConnectProxy(t, goodCert, requests)
	wrongName := tlsConnectProxy(t, wrongNameCert, requests)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()

	dial := func(addr string, insecure bool, pool *x509.CertPool, user string) (net.Conn, error) {
		p, err := Parse(flagName, "https://"+addr, user, "pw", insecure)
		if err != nil && user != "" {
			t.Fatal(err)
		}
		if p == nil {
			p, _ = Parse(flagName, "https://"+addr, "", "", insecure)
		}
		p.RootCAs = pool
		return p.Dial(ctx, target, "mail.test")
	}

	c, err := dial(good, false, goodPool, "alice")
	if err != nil {
		t.Fatalf("trusted proxy: %v", err)
	}
	banner := make([]byte, 11)
	if _, err := io.ReadFull(c, banner); err != nil || string(banner) != "220 ready\r\n" {
		t.Fatalf("bytes after the CONNECT response lost: %q %v", banner, err)
	}
	c.Close()
	if got := <-requests; !strings.HasPrefix(got, "CONNECT mail.test:25 Basic ") {
		t.Fatalf("proxy saw %q, want the hostname and Basic auth", got)
	}

	if _, err := dial(good, false, nil, "alice"); err == nil {
		t.Fatal("untrusted chain accepted without --proxy-insecure")
	}
	if c, err := dial(good, true, nil, "alice"); err != nil {
		t.Fatalf("--proxy-insecure with the right host name: %v", err)
	} else {
		c.Close()
	}
	if _, err := dial(wrongName, true, wrongPool, "alice"); err == nil || !strings.Contains(err.Error(), "127.0.0.1") {
		t.Fatalf("--proxy-insecure accepted a certificate for another host: %v", err)
	}
	if _, err := dial(good, false, goodPool, ""); err == nil || !strings.Contains(err.Error(), "407") {
		t.Fatalf("missing credentials: %v, want the 407 named", err)
	}
}

func flagName(key string) string { return "--" + strings.ReplaceAll(key, "_", "-") }

// A proxy on this host reaches the host's loopback and addresses, which
// no sandbox may: it is never told a name, which it might resolve to
// them. One elsewhere is, where the policy allows whatever the name
// resolves to.
func TestNameForAProxyHereOrElsewhere(t *testing.T) {
	anywhere := &policy.Policy{}
	for _, tc := range []struct {
		addr string
		want string
	}{
		{"127.0.0.1:3128", ""},
		{"[::1]:3128", ""},
		{"localhost:3128", ""},
		{"203.0.113.30:3128", "web.test"},
	} {
		p := &Proxy{Scheme: "http", Addr: tc.addr}
		if got := p.NameFor(anywhere, policy.ReasonDefaultAllow, "web.test"); got != tc.want {
			t.Errorf("proxy %s: told %q, want %q", tc.addr, got, tc.want)
		}
	}
	p := &Proxy{Scheme: "http", Addr: "203.0.113.30:3128"}
	for _, name := range []string{`a\ b.test`, `a\001b.test`, strings.Repeat("a", 254)} {
		if got := p.NameFor(anywhere, policy.ReasonDefaultAllow, name); got != "" {
			t.Errorf("%q, no plain host name: told %q, want the address", name, got)
		}
	}
	if got := p.NameFor(&policy.Policy{DenyCIDRs: []netip.Prefix{netip.MustParsePrefix("203.0.113.20/32")}}, policy.ReasonDefaultAllow, "web.test"); got != "" {
		t.Errorf("under a deny-cidr: told %q, want the address", got)
	}
}
