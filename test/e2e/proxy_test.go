//go:build e2e

package e2e

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// Proxies run in the testnet at 203.0.113.30 (hack/testnet.sh).
const (
	squidOpen   = "http://203.0.113.30:3128"
	squidAuth   = "http://203.0.113.30:3129"
	socksOpen   = "203.0.113.30:1080"
	socksAuth   = "203.0.113.30:1081"
	danteOpen   = "203.0.113.30:1082"
	proxyLogDir = "/run/childflow-testnet/" + testnet
)

func squidLog(t *testing.T) string {
	b, _ := os.ReadFile(filepath.Join(proxyLogDir, "squid", "access.log"))
	return string(b)
}

// waitFor polls the log until it contains want (squid writes asynchronously).
func waitFor(t *testing.T, read func(*testing.T) string, want string) {
	t.Helper()
	for i := 0; i < 50; i++ {
		if strings.Contains(read(t), want) {
			return
		}
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("%q never appeared in:\n%s", want, read(t))
}

// forced: tools that ignore or are told to ignore proxy variables, and a
// protocol where the server speaks first.
const forced = `set -e
curl -sS -m5 --noproxy '*' http://web.test/
wget -q -O- --no-proxy http://web.test/
(echo quit; sleep 1) | nc -w3 web.test 25
`

func TestProxyHTTPConnect(t *testing.T) {
	users(t, func(t *testing.T, u as) {
		dir := logDir(t)
		log := filepath.Join(dir, "flows.jsonl")
		r := sh(t, u, []string{"-p", squidAuth, "-U", "alice", "-P", "s3cret", "--flow-log", log}, forced)
		if r.code != 0 || strings.Count(r.stdout, "hello from the test internet") != 2 || !strings.Contains(r.stdout, "220 banner.test ESMTP ready\nquit") {
			t.Fatal(r)
		}
		waitFor(t, squidLog, "CONNECT web.test:25 alice")
		if !strings.Contains(squidLog(t), "TCP_TUNNEL/200") {
			t.Fatalf("squid did not tunnel:\n%s", squidLog(t))
		}
		b, _ := os.ReadFile(log)
		if !strings.Contains(string(b), `"proxy":"http://203.0.113.30:3129"`) || !strings.Contains(string(b), `"proxy_host":"web.test"`) {
			t.Fatalf("flow log does not name the proxy and host:\n%s", b)
		}
		if strings.Contains(string(b)+r.stderr+r.stdout, "s3cret") {
			t.Fatal("the proxy password leaked into the flow log or output")
		}
		// An address nobody resolved reaches the proxy as the address.
		if r := sh(t, u, []string{"-p", squidOpen}, "curl -sS -m5 -o /dev/null http://203.0.113.20/"); r.code != 0 {
			t.Fatal(r)
		}
		waitFor(t, squidLog, "CONNECT 203.0.113.20:80")
	})
}

func TestProxyFailsClosed(t *testing.T) {
	users(t, func(t *testing.T, u as) {
		dir := logDir(t)
		for name, flags := range map[string][]string{
			"no credentials": {"-p", squidAuth},
			"wrong password": {"-p", squidAuth, "-U", "alice", "-P", "wrong"},
			"proxy down":     {"-p", "http://203.0.113.30:3999"},
			"socks no auth":  {"-p", "socks5://" + socksAuth},
			"socks wrong pw": {"-p", "socks5h://" + socksAuth, "-U", "alice", "-P", "nope"},
		} {
			log := filepath.Join(dir, strings.ReplaceAll(name, " ", "-")+".jsonl")
			start := time.Now()
			r := sh(t, u, append(flags, "--flow-log", log), "curl -sS -m8 http://web.test/")
			if r.code != 7 {
				t.Errorf("%s: curl exit %d, want 7 (connection reset, no direct fallback)\n%s", name, r.code, r)
			}
			if d := time.Since(start); d > 5*time.Second {
				t.Errorf("%s: took %v, want a quick failure", name, d)
			}
			b, _ := os.ReadFile(log)
			if !strings.Contains(string(b), `"event":"connect_result"`) || !strings.Contains(string(b), `"ok":false`) || !strings.Contains(string(b), `"error":"proxy `) {
				t.Errorf("%s: flow log does not say why:\n%s", name, b)
			}
			if strings.Contains(string(b), "wrong") || strings.Contains(string(b), "nope") {
				t.Errorf("%s: password in the flow log", name)
			}
		}
	})
}

func TestProxySOCKS5(t *testing.T) {
	users(t, func(t *testing.T, u as) {
		socksLog := func(name string) func(*testing.T) string {
			return func(*testing.T) string {
				b, _ := os.ReadFile(filepath.Join(proxyLogDir, name+".log"))
				return string(b)
			}
		}
		r := sh(t, u, []string{"-p", "socks5h://" + socksAuth, "-U", "alice", "-P", "s3cret"}, forced)
		if r.code != 0 || !strings.Contains(r.stdout, "220 banner.test") {
			t.Fatal(r)
		}
		waitFor(t, socksLog("microsocks-auth"), "connected to web.test:25")
		// socks5:// resolves locally: the proxy gets the address.
		if r := sh(t, u, []string{"-p", "socks5://" + socksOpen}, "curl -sS -m5 -o /dev/null http://web.test/"); r.code != 0 {
			t.Fatal(r)
		}
		waitFor(t, socksLog("microsocks"), "connected to 203.0.113.10:80")
		// A proxy on an IPv6 address, in brackets.
		if hasIPv6 {
			if r := sh(t, u, []string{"-p", "socks5h://[2001:db8::30]:1080"}, "curl -sS -m5 -o /dev/null http://web.test:80/"); r.code != 0 {
				t.Fatal(r)
			}
			waitFor(t, socksLog("microsocks6"), "connected to web.test:80")
		}
		// Dante, whose replies carry the address it bound, resolves the
		// name itself and logs where it went.
		r = sh(t, u, []string{"-p", "socks5h://" + danteOpen}, forced)
		if r.code != 0 || !strings.Contains(r.stdout, "220 banner.test") || !strings.Contains(r.stdout, "hello from the test internet") {
			t.Fatal(r)
		}
		waitFor(t, socksLog("dante"), "-> 203.0.113.30.")
		waitFor(t, socksLog("dante"), " 203.0.113.10.25")
	})
}

// TestTheProxyIsNoDestination: a flow to the forced proxy itself, carried
// through it, makes the proxy its own client, which then goes wherever
// the sandbox asks inside the tunnel (its own SOCKS request for a denied
// name), past a policy that saw only the proxy's address. It is refused
// (proxy_loop); other flows still go through the proxy. (Another address
// of the proxy's host, or another proxy the policy allows, is a relay the
// policy cannot see into, as any allowed host that relays.)
func TestTheProxyIsNoDestination(t *testing.T) {
	requireRoot(t)
	for _, backend := range backends {
		t.Run(backend.name, func(t *testing.T) {
			if backend.u == rootless {
				withRootlessAllowed(t)
			}
			log := filepath.Join(logDir(t), "flows.jsonl")
			r := sh(t, backend.u, append([]string{"-p", "socks5h://" + socksOpen, "--deny-domain", "denied.test", "--deny-cidr", "203.0.113.20/32", "--flow-log", log}, backend.flags...), `
curl -sS -m5 --socks5-hostname `+socksOpen+` http://denied.test/ && echo through-v4
curl -sS -m5 -o /dev/null http://web.test/ && echo proxied-ok`)
			if r.code != 0 || r.stdout != "proxied-ok\n" {
				t.Fatal(r)
			}
			if !hasEvent(readFlowLog(t, log), map[string]any{"event": "policy_violation", "reason_code": "proxy_loop", "control": "proxy"}) {
				t.Errorf("no proxy_loop policy_violation in the flow log")
			}
		})
	}
}

func TestProxyOnly(t *testing.T) {
	users(t, func(t *testing.T, u as) {
		r := sh(t, u, []string{"--proxy-only", "-p", squidOpen}, assertions+`
ok get http://web.test/
ok resolves web.test
no udp UDP:203.0.113.10:7
no ping -c1 -W2 203.0.113.10`)
		if r.code != 0 {
			t.Fatal(r)
		}
		// Policy still applies to the original destination first.
		r = sh(t, u, []string{"-p", squidOpen, "--deny-cidr", "203.0.113.20/32"}, assertions+`
no get http://203.0.113.20/
ok get http://203.0.113.10/`)
		if r.code != 0 {
			t.Fatal(r)
		}
	})
}

func TestProxyUsageErrors(t *testing.T) {
	requireRoot(t)
	for args, want := range map[string]string{
		"-p ftp://203.0.113.30:21":        `invalid --proxy "ftp://203.0.113.30:21"`,
		"-p http://203.0.113.30":          "no port",
		"-p http://bob:pw@203.0.113.30:x": "--proxy",
		"-U alice":                        "need --proxy",
	} {
		r := run(t, root, append(strings.Fields(args), "--", "true")...)
		if r.code != 2 || !strings.Contains(r.stderr, want) || strings.Contains(r.stderr, "pw@") {
			t.Errorf("%s: %s", args, r)
		}
	}
}

func logDir(t *testing.T) string {
	dir, err := os.MkdirTemp("", "cfproxy")
	if err != nil {
		t.Fatal(err)
	}
	os.Chmod(dir, 0o777)
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

func TestProxyHTTPSAndTinyproxy(t *testing.T) {
	users(t, func(t *testing.T, u as) {
		ca := filepath.Join(proxyLogDir, "tls", "ca.pem")
		withCA := func(flags []string, script string) result {
			// The test CA stands in for the system roots (Go reads SSL_CERT_FILE).
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			args := append(append([]string{"--dns", "203.0.113.53"}, flags...), "--", "sh", "-c", script)
			cmd := command(ctx, u, args...)
			cmd.Env = append(cmd.Environ(), "SSL_CERT_FILE="+ca)
			out, err := cmd.CombinedOutput()
			code := 0
			if ee, ok := err.(*exec.ExitError); ok {
				code = ee.ExitCode()
			}
			return result{stdout: string(out), code: code}
		}
		get := "curl -sS -m5 http://web.test/"
		if r := withCA([]string{"-p", "https://203.0.113.30:3443"}, get); r.code != 0 || !strings.Contains(r.stdout, "hello") {
			t.Fatalf("trusted HTTPS proxy: %s", r)
		}
		if r := sh(t, u, []string{"-p", "https://203.0.113.30:3443"}, get); r.code != 7 {
			t.Fatalf("untrusted HTTPS proxy without --proxy-insecure: want curl exit 7\n%s", r)
		}
		if r := sh(t, u, []string{"-p", "https://203.0.113.30:3443", "--proxy-insecure"}, get); r.code != 0 {
			t.Fatalf("--proxy-insecure with the right host name: %s", r)
		}
		if r := withCA([]string{"-p", "https://203.0.113.30:3444", "--proxy-insecure"}, get); r.code != 7 {
			t.Fatalf("--proxy-insecure must still check the host name: %s", r)
		}
		if r := sh(t, u, []string{"-p", "http://203.0.113.30:8888"}, forced); r.code != 0 || !strings.Contains(r.stdout, "220 banner.test") {
			t.Fatalf("tinyproxy: %s", r)
		}
		waitFor(t, func(*testing.T) string {
			b, _ := os.ReadFile(filepath.Join(proxyLogDir, "tinyproxy", "tinyproxy.log"))
			return string(b)
		}, "CONNECT web.test:25")
	})
}

// TestTheProxyGoesWhereThePolicyDecided: a proxy told a name resolves it
// itself, and may get another address than the sandbox did: the answer
// changed since (DNS rebinding), or the proxy asks another resolver.
// rebind.test is 203.0.113.10 at unbound, which the sandbox asks here,
// and 203.0.113.20 at dnsmasq, which the proxies ask. Where the policy
// decided on the address (a deny-cidr, an allow-cidr), the proxy must be
// told the address: told the name, squid and dante went to the denied
// .20. Where any address would do, it is still told the name.
func TestTheProxyGoesWhereThePolicyDecided(t *testing.T) {
	requireRoot(t)
	proxies := []struct{ uri, log, went string }{
		{squidOpen, "squid/access.log", "HIER_DIRECT/%s"},
		{"socks5h://" + danteOpen, "dante.log", " %s.80\n"},
	}
	for _, backend := range backends {
		t.Run(backend.name, func(t *testing.T) {
			if backend.u == rootless {
				withRootlessAllowed(t)
			}
			dir := logDir(t)
			for _, c := range []struct {
				flags []string
				name  bool // the proxy may be told the name
			}{
				{[]string{"--deny-cidr", "203.0.113.20/32"}, false},
				{[]string{"--allow-cidr", "203.0.113.10/32"}, false},
				{nil, true},
				{[]string{"--default-policy", "deny", "--allow-domain", "rebind.test"}, true},
			} {
				for _, p := range proxies {
					proxyLog := func(*testing.T) string {
						b, _ := os.ReadFile(filepath.Join(proxyLogDir, p.log))
						return string(b)
					}
					before := len(proxyLog(t))
					since := func(t *testing.T) string { return proxyLog(t)[before:] }
					flows := filepath.Join(dir, "flows.jsonl")
					args := append([]string{"--dns", "203.0.113.54", "-p", p.uri, "--flow-log", flows}, c.flags...)
					args = append(append(args, backend.flags...), "--", "curl", "-sS", "-4", "-m5", "http://rebind.test/")
					r := run(t, backend.u, args...)
					if r.code != 0 || !strings.Contains(r.stdout, "hello from the test internet") {
						t.Fatalf("%s %v: %v", p.uri, c.flags, r)
					}
					want, wrong := "203.0.113.10", "203.0.113.20"
					if c.name {
						want, wrong = wrong, want
					}
					waitFor(t, since, fmt.Sprintf(p.went, want))
					if strings.Contains(since(t), fmt.Sprintf(p.went, wrong)) {
						t.Errorf("%s %v: the proxy went to %s:\n%s", p.uri, c.flags, wrong, since(t))
					}
					b, _ := os.ReadFile(flows)
					if told := strings.Contains(string(b), `"proxy_host":"rebind.test"`); told != c.name {
						t.Errorf("%s %v: proxy_host rebind.test in the flow log: %v, want %v", p.uri, c.flags, told, c.name)
					}
				}
			}
		})
	}
}
