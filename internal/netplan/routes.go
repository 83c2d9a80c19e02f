package netplan

import (
	"net/netip"
	"syscall"
	"unsafe"
)

// Routes are the destinations routed in the calling thread's network
// namespace (every table), which a sandbox subnet must not shadow.
//
// One dump through the standard library: vishvananda/netlink's first
// route list cost ~0.3 ms of every childflow start (its code paged in,
// a 64 KiB receive buffer), against ~0.05 once warm.
func Routes() []netip.Prefix {
	routes, _ := dumpRoutes(func(*syscall.RtMsg) bool { return true })
	return routes
}

// LocalRoutes are the destinations the kernel delivers to the host itself
// (its local table's local, broadcast and anycast routes): its addresses,
// and whole ranges where a route makes them local (AnyIP, `ip route add
// local 10.50.0.0/16 dev lo`).
func LocalRoutes() ([]netip.Prefix, error) {
	return dumpRoutes(func(rtm *syscall.RtMsg) bool { return IsLocalRoute(rtm.Table, rtm.Type) })
}

// IsLocalRoute reports whether a route of table and type (an rtmsg's)
// delivers to the host itself.
func IsLocalRoute(table, typ uint8) bool {
	if table != syscall.RT_TABLE_LOCAL {
		return false
	}
	switch typ {
	case syscall.RTN_LOCAL, syscall.RTN_BROADCAST, syscall.RTN_ANYCAST:
		return true
	}
	return false
}

func dumpRoutes(keep func(*syscall.RtMsg) bool) ([]netip.Prefix, error) {
	rib, err := syscall.NetlinkRIB(syscall.RTM_GETROUTE, syscall.AF_UNSPEC)
	if err != nil {
		return nil, err
	}
	msgs, err := syscall.ParseNetlinkMessage(rib)
	if err != nil {
		return nil, err
	}
	var out []netip.Prefix
	for i := range msgs {
		m := &msgs[i]
		if m.Header.Type != syscall.RTM_NEWROUTE || len(m.Data) < syscall.SizeofRtMsg {
			continue
		}
		rtm := (*syscall.RtMsg)(unsafe.Pointer(&m.Data[0]))
		if !keep(rtm) {
			continue
		}
		attrs, err := syscall.ParseNetlinkRouteAttr(m)
		if err != nil {
			continue
		}
		for _, a := range attrs {
			// A route without a destination is a default route.
			if a.Attr.Type != syscall.RTA_DST {
				continue
			}
			if addr, ok := netip.AddrFromSlice(a.Value); ok {
				out = append(out, netip.PrefixFrom(addr.Unmap(), int(rtm.Dst_len)))
			}
		}
	}
	return out, nil
}
