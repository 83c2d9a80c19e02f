package netplan

import (
	"fmt"
	"net/netip"
	"testing"
)

func TestChooseAvoidsHostRoutes(t *testing.T) {
	routes := []netip.Prefix{
		netip.MustParsePrefix("0.0.0.0/0"), // default routes never collide
		netip.MustParsePrefix("10.0.0.0/8"),
		netip.MustParsePrefix("172.29.87.128/25"),
		netip.MustParsePrefix("fd00:cf::/48"),
	}
	p, err := Choose(routes, 0)
	if err != nil {
		t.Fatal(err)
	}
	if p.Prefix4.String() != "192.168.187.0/24" || p.Gateway4.String() != "192.168.187.1" || p.Sandbox4.String() != "192.168.187.2" {
		t.Fatalf("IPv4 plan %v %v %v", p.Prefix4, p.Gateway4, p.Sandbox4)
	}
	if p.Prefix6.String() != "fd87:cf::/64" || p.MTU != DefaultMTU {
		t.Fatalf("IPv6 plan %v mtu %d", p.Prefix6, p.MTU)
	}
	if !p.IsGateway(netip.MustParseAddr("::ffff:192.168.187.1")) || p.IsGateway(p.Sandbox4) {
		t.Fatal("IsGateway")
	}
	back, err := Decode(p.Encode())
	if err != nil || back != p {
		t.Fatalf("round trip %v %v", back, err)
	}
	all := []netip.Prefix{netip.MustParsePrefix("0.0.0.0/1"), netip.MustParsePrefix("128.0.0.0/1")}
	if _, err := Choose(all, 0); err == nil {
		t.Fatal("no error when every candidate collides")
	}
}

func TestChooseRootSkipsTakenSubnets(t *testing.T) {
	routes := []netip.Prefix{
		netip.MustParsePrefix("10.88.0.0/30"), // a live rootful sandbox
		netip.MustParsePrefix("10.88.0.4/30"),
		netip.MustParsePrefix("fd87:cf88::/64"),
	}
	p, err := ChooseRoot(routes, 1500)
	if err != nil {
		t.Fatal(err)
	}
	if p.Prefix4.String() != "10.88.0.8/30" || p.Gateway4.String() != "10.88.0.9" || p.Sandbox4.String() != "10.88.0.10" {
		t.Fatalf("IPv4 plan %v %v %v", p.Prefix4, p.Gateway4, p.Sandbox4)
	}
	if p.Prefix6.String() != "fd87:cf88:0:1::/64" || p.Sandbox6.String() != "fd87:cf88:0:1::2" {
		t.Fatalf("IPv6 plan %v %v", p.Prefix6, p.Sandbox6)
	}
	// A host route over a whole pool moves to the next pool.
	p, err = ChooseRoot([]netip.Prefix{netip.MustParsePrefix("10.0.0.0/8")}, 1500)
	if err != nil || p.Prefix4.String() != "172.30.0.0/30" {
		t.Fatalf("next pool: %v %v", p.Prefix4, err)
	}
}

// A kernel without IPv6 gets none of the plan's IPv6 addresses.
func TestWithoutIPv6TheKernelGetsIPv4Only(t *testing.T) {
	p, err := Choose(nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	if got := fmt.Sprint(p.Gateways(), p.GatewayPrefixes(), p.SandboxPrefixes()); got != "[10.87.0.1 fd00:cf::1] [10.87.0.1/24 fd00:cf::1/64] [10.87.0.2/24 fd00:cf::2/64]" {
		t.Errorf("with IPv6: %s", got)
	}
	p.NoIPv6 = true
	if got := fmt.Sprint(p.Gateways(), p.GatewayPrefixes(), p.SandboxPrefixes()); got != "[10.87.0.1] [10.87.0.1/24] [10.87.0.2/24]" {
		t.Errorf("without IPv6: %s", got)
	}
	q, err := Decode(p.Encode())
	if err != nil || !q.NoIPv6 {
		t.Errorf("decoded %+v, %v: NoIPv6 lost", q, err)
	}
}
