package api

import (
	"strings"
	"testing"

	"github.com/childflow/childflow/policy/annotations"
)

func TestContainerSettingsKeepOffTheNode(t *testing.T) {
	for _, tc := range []struct {
		key, value string
		refused    bool
	}{
		{"allow-cidrs", "203.0.113.10/32, 2001:db8::/32", false},
		{"allow-cidrs", "0.0.0.0/0, ::/0, 10.0.0.0/8", false}, // contain the loopback, do not open it
		{"allow-cidrs", "127.0.0.1/32", true},
		{"allow-cidrs", "127.0.0.0/8", true},
		{"allow-cidrs", "::1/128", true},
		{"allow-cidrs", "0.0.0.0/32", true},
		{"allow-cidrs", "224.0.0.251/32", true},
		{"allow-cidrs", "ff02::fb/128", true},
		{"allow-cidrs", "255.255.255.255/32", true},
		{"allow-cidrs", "64:ff9b::7f00:1/128", true}, // NAT64 of 127.0.0.1, named so
		{"allow-cidrs", "::127.0.0.1", true},
		{"dns", "203.0.113.53, 2001:db8::53", false},
		{"dns", "127.0.0.53", true},
		{"dns", "[::1]:5353", true},
		{"dns", "0.0.0.0", true},
		{"dns", "::ffff:127.0.0.1", true},
		{"proxy", "http://proxy.test:3128", false},
		{"proxy", "http://203.0.113.30:3128", false},
		{"proxy", "http://127.0.0.1:3128", true},
		{"proxy", "socks5://[::1]:1080", true},
		{"proxy", "socks5h://LocalHost.:1080", true},
		{"proxy", "http://api.localhost:8080", true},
		// Broadcast, multicast and the identity services, in any form.
		{"dns", "255.255.255.255", true},
		{"dns", "224.0.0.251:5353", true},
		{"dns", "[ff02::fb]:5353", true},
		{"dns", "::ffff:224.0.0.251", true},
		{"dns", "169.254.169.254", true},
		{"dns", "[fd00:ec2::254]:53", true},
		{"dns", "64:ff9b::a9fe:a9fe", true}, // NAT64 of 169.254.169.254
		{"dns", "168.63.129.16", true},
		{"dns", "169.254.169.253", false}, // AWS's VPC resolver: metadata, no identity
		{"proxy", "http://169.254.169.254:80", true},
		{"proxy", "socks5://[::ffff:169.254.169.254]:1080", true},
		{"proxy", "http://255.255.255.255:3128", true},
		{"proxy", "http://[ff02::1]:3128", true},
	} {
		ann := "childflow.dev/" + tc.key
		p, name, err := annotations.Parse(map[string]string{ann: tc.value})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := Resolve(p, name); err != nil && !tc.refused {
			t.Errorf("%s=%q: Resolve: %v", ann, tc.value, err)
		}
		_, err = ResolveContainer(p, name)
		switch {
		case tc.refused && (err == nil || !strings.Contains(err.Error(), "annotation "+ann)):
			t.Errorf("%s=%q: got %v, want an error naming the annotation", ann, tc.value, err)
		case !tc.refused && err != nil:
			t.Errorf("%s=%q: %v", ann, tc.value, err)
		}
	}
}
