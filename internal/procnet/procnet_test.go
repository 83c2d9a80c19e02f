package procnet

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"testing"
	"time"

	"golang.org/x/sys/unix"
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
	f := &Finder{InitPID: os.Getppid()}
	o, ok := f.Find("tcp", local, netip.AddrPort{})
	if !ok || o.PID == 0 || o.Comm == "" {
		t.Fatalf("owner of %s: %+v %v", local, o, ok)
	}
	if _, ok := f.Find("tcp", netip.MustParseAddrPort("127.0.0.1:1"), netip.AddrPort{}); ok {
		t.Fatal("found an owner for a port nobody holds")
	}
}

// TestFinderThroughSockDiag looks up this test's own TCP and UDP sockets
// (IPv4 and IPv6) by their 4-tuples through a sock_diag socket.
func TestFinderThroughSockDiag(t *testing.T) {
	diag, err := OpenDiag()
	if err != nil {
		t.Fatal(err)
	}
	defer diag.Close()
	f := &Finder{InitPID: os.Getppid(), Diag: diag}
	for _, tc := range []struct{ network, addr string }{
		{"tcp", "127.0.0.1:0"}, {"tcp", "[::1]:0"}, {"udp", "127.0.0.1:0"}, {"udp", "[::1]:0"},
	} {
		var c net.Conn
		if tc.network == "tcp" {
			ln, err := net.Listen(tc.network, tc.addr)
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			if c, err = net.Dial(tc.network, ln.Addr().String()); err != nil {
				t.Fatal(err)
			}
		} else {
			pc, err := net.ListenPacket(tc.network, tc.addr)
			if err != nil {
				t.Fatal(err)
			}
			defer pc.Close()
			if c, err = net.Dial(tc.network, pc.LocalAddr().String()); err != nil {
				t.Fatal(err)
			}
		}
		defer c.Close()
		local := netip.MustParseAddrPort(c.LocalAddr().String())
		remote := netip.MustParseAddrPort(c.RemoteAddr().String())
		o, ok := f.Find(tc.network, local, remote)
		if !ok || o.PID != os.Getpid() || o.Comm == "" {
			t.Errorf("%s %s -> %s: %+v %v, want pid %d", tc.network, local, remote, o, ok, os.Getpid())
		}
		if _, ok := f.Find(tc.network, netip.AddrPortFrom(local.Addr(), 1), remote); ok {
			t.Errorf("%s: found an owner for a port nobody holds", tc.network)
		}
	}
}

// TestFindsRawSocketPing looks up the owner of an echo sent through a raw
// ICMP socket, as ping with CAP_NET_RAW sends it: the one holder, or among
// several the one whose pid is the echo identifier. The test stands for
// the sandbox's init; children holding its raw sockets, for the sandbox.
func TestFindsRawSocketPing(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("raw sockets need root")
	}
	f := &Finder{InitPID: os.Getpid()}
	for _, tc := range []struct {
		family, proto int
		local         string
	}{{unix.AF_INET, unix.IPPROTO_ICMP, "127.0.0.1"}, {unix.AF_INET6, unix.IPPROTO_ICMPV6, "::1"}} {
		fd, err := unix.Socket(tc.family, unix.SOCK_RAW|unix.SOCK_CLOEXEC, tc.proto)
		if err != nil {
			t.Fatal(err)
		}
		sock := os.NewFile(uintptr(fd), "raw")
		defer sock.Close()
		echo := func(id uint16) netip.AddrPort { return netip.AddrPortFrom(netip.MustParseAddr(tc.local), id) }
		var pids []int
		for range 2 {
			pids = append(pids, holder(t, sock))
			if len(pids) == 1 {
				if o, ok := f.Find("icmp", echo(4242), netip.AddrPort{}); !ok || o.PID != pids[0] {
					t.Errorf("%s, one holder: %+v %v, want pid %d", tc.local, o, ok, pids[0])
				}
			}
		}
		for _, want := range pids {
			id := uint16(want)
			if o, ok := f.Find("icmp", echo(id), netip.AddrPort{}); !ok || o.PID != want {
				t.Errorf("%s, identifier %d: %+v %v, want pid %d", tc.local, id, o, ok, want)
			}
			// busybox sends its pid in host byte order.
			if o, ok := f.Find("icmp", echo(id>>8|id<<8), netip.AddrPort{}); !ok || o.PID != want {
				t.Errorf("%s, identifier %d swapped: %+v %v, want pid %d", tc.local, id, o, ok, want)
			}
		}
		if o, ok := f.Find("icmp", echo(0), netip.AddrPort{}); ok {
			t.Errorf("%s: two holders, neither the identifier's, yet found %+v", tc.local, o)
		}
	}
}

// holder starts a child process that holds sock open and returns its pid.
func holder(t *testing.T, sock *os.File) int {
	t.Helper()
	child := exec.Command("sleep", "30")
	child.ExtraFiles = []*os.File{sock}
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { child.Process.Kill(); child.Wait() })
	return child.Process.Pid
}

// TestBurstFromManyProcessesIsOneWalk: sockets of many processes, looked
// up at once as a burst of connections is, are found by their holders
// with one walk of the process tree between them, not one walk each.
func TestBurstFromManyProcessesIsOneWalk(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	const n = 24
	type held struct {
		local, remote netip.AddrPort
		pid           int
	}
	var sockets []held
	for range n {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		f, _ := c.(*net.TCPConn).File()
		cmd := exec.Command("sleep", "30")
		cmd.ExtraFiles = []*os.File{f} // the child holds the socket, as its fd 3
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		sockets = append(sockets, held{netip.MustParseAddrPort(c.LocalAddr().String()), netip.MustParseAddrPort(c.RemoteAddr().String()), cmd.Process.Pid})
		f.Close()
		c.Close()
	}
	diag, err := OpenDiag()
	if err != nil {
		t.Fatal(err)
	}
	defer diag.Close()
	f := &Finder{InitPID: os.Getpid(), Diag: diag}
	done := make(chan string, n)
	for _, s := range sockets {
		go func() {
			o, ok := f.Find("tcp", s.local, s.remote)
			if !ok || o.Comm != "sleep" {
				done <- "no owner found"
				return
			}
			if o.PID != s.pid { // the test's PID namespace: the same pid
				done <- "another owner"
				return
			}
			done <- ""
		}()
	}
	for range n {
		if msg := <-done; msg != "" {
			t.Error(msg)
		}
	}
	if f.index.started > 2 {
		t.Errorf("%d walks of the process tree for %d sockets, want at most 2", f.index.started, n)
	}
}

// TestFindsByNetworkNamespace: with the namespace's inode, the owner is
// any process in it (a runtime's exec, another container of a pod), not
// only a descendant of the process the sandbox was started with.
func TestFindsByNetworkNamespace(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	local := netip.MustParseAddrPort(ln.Addr().String())
	// The "container's init": a process the test is no descendant of.
	init := exec.Command("sleep", "30")
	if err := init.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { init.Process.Kill(); init.Wait() }()
	if o, ok := (&Finder{InitPID: init.Process.Pid}).Find("tcp", local, netip.AddrPort{}); ok {
		t.Fatalf("found %+v among the descendants of a process with none", o)
	}
	f := &Finder{Netns: netnsOf(os.Getpid())}
	o, ok := f.Find("tcp", local, netip.AddrPort{})
	if !ok || o.PID != os.Getpid() {
		t.Fatalf("owner of %s in the namespace: %+v %v, want pid %d", local, o, ok, os.Getpid())
	}

	// A child of a process found there is found without reading all
	// of /proc again.
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	file, _ := c.(*net.TCPConn).File()
	child := exec.Command("sleep", "30")
	child.ExtraFiles = []*os.File{file}
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { child.Process.Kill(); child.Wait() }()
	file.Close()
	c.Close()
	o, ok = f.Find("tcp", netip.MustParseAddrPort(c.LocalAddr().String()), netip.AddrPort{})
	if !ok || o.PID != child.Process.Pid {
		t.Fatalf("owner of the child's socket: %+v %v, want pid %d", o, ok, child.Process.Pid)
	}
	if f.fullScans != 1 {
		t.Errorf("%d scans of all of /proc, want 1", f.fullScans)
	}
}

// TestWalksReadBoundedDescriptors: a process holding more descriptors
// than a walk reads (dup is cheap; each read is a system call of the
// engine's, or of the node daemon's for a container) costs the walk no
// more reads than its budget, and a socket past them goes unattributed.
func TestWalksReadBoundedDescriptors(t *testing.T) {
	null, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer null.Close()
	const budget = 512
	for range budget {
		fd, err := unix.Dup(int(null.Fd()))
		if err != nil {
			t.Fatal(err)
		}
		defer unix.Close(fd)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0") // numbered past the dups
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	f, _ := ln.(*net.TCPListener).File()
	defer f.Close()
	var st unix.Stat_t
	unix.Fstat(int(f.Fd()), &st)
	if read := eachLink(os.Getpid(), budget, func(string) bool { return true }); read != budget {
		t.Errorf("read %d descriptors, want %d", read, budget)
	}
	if pid, ok := socketsOf([]int{os.Getpid()}, budget)[st.Ino]; ok {
		t.Errorf("found the listener (pid %d) past the budget", pid)
	}
	if pid := socketsOf([]int{os.Getpid()}, walkBudget)[st.Ino]; pid != os.Getpid() {
		t.Errorf("listener's holder %d within the walk's budget, want %d", pid, os.Getpid())
	}
	// Another process's socket is read first, the hog's descriptors
	// (this test's) after: a budget they would use up still finds it.
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	cf, _ := c.(*net.TCPConn).File()
	child := exec.Command("sleep", "30")
	child.ExtraFiles = []*os.File{cf}
	if err := child.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { child.Process.Kill(); child.Wait() }()
	cf.Close()
	c.Close()
	var cst unix.Stat_t
	fds, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", child.Process.Pid))
	for _, fd := range fds {
		var x unix.Stat_t
		if unix.Stat(fmt.Sprintf("/proc/%d/fd/%s", child.Process.Pid, fd.Name()), &x) == nil && x.Mode&unix.S_IFMT == unix.S_IFSOCK {
			cst = x
		}
	}
	if pid := socketsOf([]int{os.Getpid(), child.Process.Pid}, budget)[cst.Ino]; cst.Ino == 0 || pid != child.Process.Pid {
		t.Errorf("the child's socket (inode %d): holder %d, want %d", cst.Ino, pid, child.Process.Pid)
	}
}

// A process alone in a namespace of its own is found by the namespace's
// inode, one namespace at a time or all at once, and not once it exited.
func TestAProcessInANamespace(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: makes a network namespace")
	}
	p := exec.Command("unshare", "--net", "sleep", "30")
	if err := p.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { p.Process.Kill(); p.Wait() }()
	var ino uint64
	for i := 0; i < 100 && (ino == 0 || ino == netnsOf(os.Getpid())); i++ {
		time.Sleep(10 * time.Millisecond) // until unshare has run
		ino = netnsOf(p.Process.Pid)
	}
	if pid, ok := AProcessIn(ino); pid != p.Process.Pid || !ok {
		t.Errorf("AProcessIn: %d %v, want %d", pid, ok, p.Process.Pid)
	}
	if each := AProcessInEach(); each[ino] != p.Process.Pid || each[netnsOf(os.Getpid())] == 0 {
		t.Errorf("AProcessInEach: %d in the new namespace, %d in this one; want %d and one", each[ino], each[netnsOf(os.Getpid())], p.Process.Pid)
	}
	p.Process.Kill()
	p.Wait()
	if pid, ok := AProcessIn(ino); ok || Occupied(ino) || AProcessInEach()[ino] != 0 {
		t.Errorf("once the process exited: AProcessIn %d %v", pid, ok)
	}
}
