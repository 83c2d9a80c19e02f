package procnet

import (
	"net"
	"net/netip"
	"os"
	"testing"
)

func TestParseAddr(t *testing.T) {
	for in, want := range map[string]string{
		"0100007F:0050":                         "127.0.0.1:80",
		"0200570A:D2A2":                         "10.87.0.2:53922",
		"00000000000000000000000001000000:0035": "[::1]:53",
		"0000CFFD000000000000000002000000:01BB": "[fdcf::2]:443",
	} {
		got, ok := ParseAddr(in)
		if !ok || got.String() != want {
			t.Errorf("ParseAddr(%s) = %v %v, want %s", in, got, ok, want)
		}
	}
	if _, ok := ParseAddr("zz:1"); ok {
		t.Error("garbage parsed")
	}
}

// TestFindsThisProcess looks up a socket of the test itself, treating the
// test's parent as the "init" whose descendants are searched.
func TestFindsThisProcess(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	local := netip.MustParseAddrPort(ln.Addr().String())
	o, ok := Find(os.Getppid(), "tcp", local)
	if !ok || o.PID == 0 || o.Comm == "" {
		t.Fatalf("owner of %s: %+v %v", local, o, ok)
	}
	if _, ok := Find(os.Getppid(), "tcp", netip.MustParseAddrPort("127.0.0.1:1")); ok {
		t.Fatal("found an owner for a port nobody holds")
	}
}
