// Package netplan chooses the sandbox's addresses: a small IPv4 and IPv6
// subnet on cf0 whose gateway is the engine. The subnet is picked so that
// it does not collide with any route of the host, so every real
// destination stays reachable through the engine.
package netplan

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"sync"
	"syscall"
)

// Plan is the addressing of one sandbox.
type Plan struct {
	Interface string       `json:"interface"`
	MTU       int          `json:"mtu"`
	Prefix4   netip.Prefix `json:"prefix4"`
	Gateway4  netip.Addr   `json:"gateway4"`
	Sandbox4  netip.Addr   `json:"sandbox4"`
	Prefix6   netip.Prefix `json:"prefix6"`
	Gateway6  netip.Addr   `json:"gateway6"`
	Sandbox6  netip.Addr   `json:"sandbox6"`
	// NoIPv6 keeps the IPv6 addresses out of the kernel, which refuses
	// them all where it was booted without IPv6 (ipv6.disable=1). The
	// engine's own stack keeps them: nothing reaches them.
	NoIPv6 bool `json:"no_ipv6,omitempty"`
}

// KernelHasIPv6 says whether the kernel runs IPv6: booted with
// ipv6.disable=1 it has no /proc/sys/net/ipv6, and refuses every IPv6
// address, route, rule and socket.
// It cannot change while the kernel runs: asked once.
var KernelHasIPv6 = sync.OnceValue(func() bool {
	_, err := os.Stat("/proc/sys/net/ipv6")
	return err == nil
})

// Families are the address families the kernel runs (syscall.AF_INET,
// and AF_INET6 where it has IPv6), for its routes and rules.
func Families() []int {
	if !KernelHasIPv6() {
		return []int{syscall.AF_INET}
	}
	return []int{syscall.AF_INET, syscall.AF_INET6}
}

// Gateways are the engine's addresses the kernel knows, one per family.
func (p Plan) Gateways() []netip.Addr { return p.inKernel(p.Gateway4, p.Gateway6) }

// GatewayPrefixes are the gateways with their subnets' lengths.
func (p Plan) GatewayPrefixes() []netip.Prefix {
	return p.withBits(p.Gateways())
}

// SandboxPrefixes are the sandbox's addresses with their subnets' lengths.
func (p Plan) SandboxPrefixes() []netip.Prefix {
	return p.withBits(p.inKernel(p.Sandbox4, p.Sandbox6))
}

// inKernel is the pair's half the kernel gets: both, or v4 alone.
func (p Plan) inKernel(v4, v6 netip.Addr) []netip.Addr {
	if p.NoIPv6 {
		return []netip.Addr{v4}
	}
	return []netip.Addr{v4, v6}
}

func (p Plan) withBits(addrs []netip.Addr) []netip.Prefix {
	out := make([]netip.Prefix, len(addrs))
	for i, a := range addrs {
		bits := p.Prefix4.Bits()
		if a.Is6() {
			bits = p.Prefix6.Bits()
		}
		out[i] = netip.PrefixFrom(a, bits)
	}
	return out
}

// DefaultMTU is large so that one TUN read carries as much as a GSO super
// packet would: the relay's cost is per packet, not per byte.
const DefaultMTU = 65520

// candidates are tried in order; the first that overlaps no host route wins.
var candidates4 = []string{"10.87.0.0/24", "172.29.87.0/24", "192.168.187.0/24", "10.254.87.0/24", "100.87.0.0/24"}
var candidates6 = []string{"fd00:cf::/64", "fd87:cf::/64", "fdcf:87::/64"}

// Choose returns a plan whose subnets overlap none of hostRoutes (the
// destinations of the host's routes, default routes excluded).
func Choose(hostRoutes []netip.Prefix, mtu int) (Plan, error) {
	if mtu == 0 {
		mtu = DefaultMTU
	}
	p := Plan{Interface: "cf0", MTU: mtu, NoIPv6: !KernelHasIPv6()}
	var ok bool
	if p.Prefix4, ok = pick(candidates4, hostRoutes); !ok {
		return p, fmt.Errorf("no free IPv4 subnet for the sandbox: all of %v collide with host routes", candidates4)
	}
	if p.Prefix6, ok = pick(candidates6, hostRoutes); !ok {
		return p, fmt.Errorf("no free IPv6 subnet for the sandbox: all of %v collide with host routes", candidates6)
	}
	p.Gateway4 = p.Prefix4.Addr().Next()
	p.Sandbox4 = p.Gateway4.Next()
	p.Gateway6 = p.Prefix6.Addr().Next()
	p.Sandbox6 = p.Gateway6.Next()
	return p, nil
}

func pick(cands []string, routes []netip.Prefix) (netip.Prefix, bool) {
	for _, c := range cands {
		pfx := netip.MustParsePrefix(c)
		free := true
		for _, r := range routes {
			if r.Bits() > 0 && r.Overlaps(pfx) {
				free = false
				break
			}
		}
		if free {
			return pfx, true
		}
	}
	return netip.Prefix{}, false
}

// IsGateway reports whether a is one of the engine's own addresses.
func (p Plan) IsGateway(a netip.Addr) bool {
	a = a.Unmap()
	return a == p.Gateway4 || a == p.Gateway6
}

// Encode and Decode carry the plan to the sandbox init through the environment.
func (p Plan) Encode() string {
	b, _ := json.Marshal(p)
	return string(b)
}

func Decode(s string) (Plan, error) {
	var p Plan
	if err := json.Unmarshal([]byte(s), &p); err != nil {
		return p, fmt.Errorf("decoding network plan: %w", err)
	}
	return p, nil
}

// Rootful sandboxes route through a veth of their own, so each needs a
// subnet of its own: a /30 and a /64 from these pools, the first that
// overlaps no host route (a live rootful sandbox's veth route included).
var rootPools4 = []string{"10.88.0.0/16", "172.30.0.0/16", "100.88.0.0/16"}
var rootPools6 = []string{"fd87:cf88::/48", "fd87:cf89::/48"}

// Pools are every range a sandbox's subnet, and so its gateway, is taken
// from, rootless and rootful.
var Pools = func() []netip.Prefix {
	var out []netip.Prefix
	for _, list := range [][]string{candidates4, candidates6, rootPools4, rootPools6} {
		for _, s := range list {
			out = append(out, netip.MustParsePrefix(s))
		}
	}
	return out
}()

// ChooseRoot returns the addressing of a rootful sandbox: the host end of
// its veth is the gateway.
func ChooseRoot(hostRoutes []netip.Prefix, mtu int) (Plan, error) {
	p := Plan{Interface: "cf0", MTU: mtu, NoIPv6: !KernelHasIPv6()}
	var ok bool
	if p.Prefix4, ok = pickIn(rootPools4, 30, hostRoutes); !ok {
		return p, fmt.Errorf("no free IPv4 /30 for the sandbox in %v", rootPools4)
	}
	if p.Prefix6, ok = pickIn(rootPools6, 64, hostRoutes); !ok {
		return p, fmt.Errorf("no free IPv6 /64 for the sandbox in %v", rootPools6)
	}
	p.Gateway4 = p.Prefix4.Addr().Next()
	p.Sandbox4 = p.Gateway4.Next()
	p.Gateway6 = p.Prefix6.Addr().Next()
	p.Sandbox6 = p.Gateway6.Next()
	return p, nil
}

// pickIn walks each pool in subnets of bits and returns the first free one.
func pickIn(pools []string, bits int, routes []netip.Prefix) (netip.Prefix, bool) {
	for _, pool := range pools {
		pp := netip.MustParsePrefix(pool)
		n := 1 << min(bits-pp.Bits(), 20)
		cur := pp.Addr()
		for i := 0; i < n; i++ {
			sub := netip.PrefixFrom(cur, bits)
			if _, ok := pick([]string{sub.String()}, routes); ok {
				return sub, true
			}
			cur = nextSubnet(cur, bits)
		}
	}
	return netip.Prefix{}, false
}

// nextSubnet returns the first address of the subnet of size bits after a's.
func nextSubnet(a netip.Addr, bits int) netip.Addr {
	b := a.AsSlice()
	// Add 1 at bit position bits-1 (big endian), carrying.
	i, bit := (bits-1)/8, 7-(bits-1)%8
	carry := 1 << bit
	for ; i >= 0 && carry != 0; i-- {
		v := int(b[i]) + carry
		b[i], carry = byte(v), v>>8
	}
	out, _ := netip.AddrFromSlice(b)
	return out
}
