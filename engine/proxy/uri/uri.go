// Package uri validates an upstream proxy's URI and credentials. It is
// apart from package proxy so that the OCI hook and the CNI plugin can
// check a policy without linking an HTTP and TLS client.
package uri

import (
	"net/url"
	"strconv"
	"strings"

	"github.com/childflow/childflow/policy"
)

// URI is a validated proxy address with its credentials.
type URI struct {
	Scheme         string // http, https, socks5, socks5h
	Addr           string // host:port
	Host           string
	User, Password string
}

// Parse validates the proxy URI with its user and password (-p/--proxy,
// -U/--proxy-user, -P/--proxy-password). Credentials in the URI are used
// when none are given apart. name maps the profile keys proxy,
// proxy_user and proxy_password to the flag or annotation that set them,
// for errors.
func Parse(name func(key string) string, uri, user, password string) (URI, error) {
	u, err := url.Parse(uri)
	if err != nil || u.Host == "" {
		return URI{}, policy.Usagef("invalid %s %q: want SCHEME://HOST:PORT", name("proxy"), Redact(uri))
	}
	p := URI{Scheme: strings.ToLower(u.Scheme), User: user, Password: password}
	switch p.Scheme {
	case "http", "https", "socks5", "socks5h":
	default:
		return URI{}, policy.Usagef("invalid %s %q: scheme must be http, https, socks5 or socks5h", name("proxy"), Redact(uri))
	}
	if u.Port() == "" {
		return URI{}, policy.Usagef("invalid %s %q: no port", name("proxy"), Redact(uri))
	}
	if port, err := strconv.Atoi(u.Port()); err != nil || port < 1 || port > 65535 {
		return URI{}, policy.Usagef("invalid %s %q: bad port", name("proxy"), Redact(uri))
	}
	if u.Path != "" && u.Path != "/" {
		return URI{}, policy.Usagef("invalid %s %q: a proxy URI has no path", name("proxy"), Redact(uri))
	}
	if u.User != nil && p.User == "" {
		p.User = u.User.Username()
		p.Password, _ = u.User.Password()
	}
	if p.Password != "" && p.User == "" {
		return URI{}, policy.Usagef("%s needs %s", name("proxy_password"), name("proxy_user"))
	}
	if strings.HasPrefix(p.Scheme, "socks5") && (len(p.User) > 255 || len(p.Password) > 255) {
		return URI{}, policy.Usagef("%s and %s are limited to 255 bytes for SOCKS5", name("proxy_user"), name("proxy_password"))
	}
	p.Host = u.Hostname()
	p.Addr = u.Host
	return p, nil
}

// Redact hides credentials in a proxy URI for messages, even in one that
// does not parse.
func Redact(uri string) string {
	if i := strings.Index(uri, "://"); i >= 0 {
		if at := strings.LastIndex(uri[i+3:], "@"); at >= 0 {
			return uri[:i+3] + "redacted@" + uri[i+3+at+1:]
		}
	}
	return uri
}
