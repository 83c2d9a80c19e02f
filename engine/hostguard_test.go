package engine

import (
	"encoding/binary"
	"testing"

	"golang.org/x/sys/unix"
)

// A node's pods come and go with routes in the main table: no reason to
// read the host's local routes again. Address notices and the local
// table's routes are.
func TestHostChange(t *testing.T) {
	notice := func(typ uint16, table, rtype uint8) []byte {
		b := make([]byte, unix.SizeofNlMsghdr+unix.SizeofRtMsg)
		binary.NativeEndian.PutUint32(b[0:4], uint32(len(b)))
		binary.NativeEndian.PutUint16(b[4:6], typ)
		b[unix.SizeofNlMsghdr+4] = table
		b[unix.SizeofNlMsghdr+7] = rtype
		return b
	}
	for _, tc := range []struct {
		name   string
		notice []byte
		want   bool
	}{
		{"a pod's route", notice(unix.RTM_NEWROUTE, unix.RT_TABLE_MAIN, unix.RTN_UNICAST), false},
		{"a pod's route gone", notice(unix.RTM_DELROUTE, unix.RT_TABLE_MAIN, unix.RTN_UNICAST), false},
		{"a local route", notice(unix.RTM_NEWROUTE, unix.RT_TABLE_LOCAL, unix.RTN_LOCAL), true},
		{"a broadcast route gone", notice(unix.RTM_DELROUTE, unix.RT_TABLE_LOCAL, unix.RTN_BROADCAST), true},
		{"an address", notice(unix.RTM_NEWADDR, 0, 0), true},
		{"a truncated notice", []byte{1, 2, 3}, true},
	} {
		if got := hostChange(tc.notice); got != tc.want {
			t.Errorf("%s: %v, want %v", tc.name, got, tc.want)
		}
	}
}

// A container's proxy may be named by a host name, resolved at the dial:
// the dial itself refuses what the name may lead to on the node.
func TestContainerDialsRefuseTheNodesOwnServices(t *testing.T) {
	for addr, want := range map[string]error{
		"127.0.0.1:3128":          errHostLoopback,
		"[::ffff:127.0.0.1]:3128": errHostLoopback,
		"0.0.0.0:3128":            errHostLoopback,
		"169.254.169.254:80":      errHostIdentity,
		"[64:ff9b::a9fe:a9fe]:80": errHostIdentity,
		"[fd00:ec2::254]:80":      errHostIdentity,
		"168.63.129.16:80":        errHostIdentity,
		"203.0.113.30:3128":       nil,
	} {
		if err := refuseHostLoopback("tcp", addr, nil); err != want {
			t.Errorf("%s: %v, want %v", addr, err, want)
		}
	}
}
