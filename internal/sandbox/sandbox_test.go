package sandbox

import (
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/childflow/childflow/internal/fdpass"
)

// TestSignalsRaceWaitSafely: childflow forwards signals until the
// command's end, while Wait closes the control socket. A SIGCONT sent
// to init over that socket must use it whole or not at all (run under
// the race detector, as `make race` does).
func TestSignalsRaceWaitSafely(t *testing.T) {
	// Each round is a chance for the race detector, which does not see
	// every unsynchronized pair.
	for range 10 {
		signalAsWaitCloses(t)
	}
}

func signalAsWaitCloses(t *testing.T) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	ctrl, initEnd := os.NewFile(uintptr(fds[0]), "ctrl"), os.NewFile(uintptr(fds[1]), "init")
	defer initEnd.Close()
	received := make(chan int)
	go func() { // init's end: counts the continue messages
		n := 0
		for buf := make([]byte, 16); ; n++ {
			if _, err := initEnd.Read(buf); err != nil {
				received <- n
				return
			}
		}
	}()
	pid, err := syscall.ForkExec("/bin/sleep", []string{"sleep", "0.05"}, &syscall.ProcAttr{Files: []uintptr{0, 1, 2}})
	if err != nil {
		t.Fatal(err)
	}
	sb := &Sandbox{initProc: &process{pid: pid}, ctrl: ctrl}

	var wg sync.WaitGroup
	stop := make(chan struct{})
	sent := 0
	wg.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
			}
			sb.resume.Store(true) // as after the command stopped
			if sb.Signal(syscall.SIGCONT) == nil {
				sent++
			}
		}
	})
	if code := sb.Wait(); code != 0 {
		t.Errorf("Wait = %d, want 0", code)
	}
	close(stop)
	wg.Wait()
	if got := <-received; sent == 0 || got != sent {
		t.Errorf("%d continues sent, %d received", sent, got)
	}
	sb.resume.Store(true)
	if err := sb.Signal(syscall.SIGCONT); err == nil {
		t.Error("a continue was sent after Wait closed the control socket")
	}
}

// An init that fails (another build's, say) sends why and exits with
// childflow's spec unread in its queue: the kernel then reports a reset
// on childflow's next read, before the message. Childflow still reads why.
func TestInitsLastWordOutlivesTheReset(t *testing.T) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
	if err != nil {
		t.Fatal(err)
	}
	sb := &Sandbox{ctrl: os.NewFile(uintptr(fds[0]), "ctrl")}
	defer sb.ctrl.Close()
	if err := fdpass.Send(fds[1], []byte("init is version other")); err != nil {
		t.Fatal(err)
	}
	if err := sb.send([]byte("e{}")); err != nil { // the spec, never read
		t.Fatal(err)
	}
	unix.Close(fds[1])
	msg, _, err := fdpass.RecvFile(sb.ctrl, 4096, 0)
	if err != nil || string(msg) != "init is version other" {
		t.Fatalf("got %q, %v", msg, err)
	}
}

// Init gone before it read its spec (another build's init, which says
// why and exits): Build says why, or that the handover failed, and init
// is killed and reaped.
func TestBuildWithInitGoneSaysWhy(t *testing.T) {
	for _, why := range []string{"init is version other", ""} {
		fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC|unix.SOCK_NONBLOCK, 0)
		if err != nil {
			t.Fatal(err)
		}
		if why != "" {
			if err := fdpass.Send(fds[1], []byte(why)); err != nil {
				t.Fatal(err)
			}
		}
		unix.Close(fds[1])
		p, err := startProcess("/bin/sleep", []string{"sleep", "10"}, &syscall.ProcAttr{Files: []uintptr{0, 1, 2}})
		if err != nil {
			t.Fatal(err)
		}
		sb := &Sandbox{ctrl: os.NewFile(uintptr(fds[0]), "ctrl"), initProc: p}
		err = sb.Build(Spec{Command: []string{"true"}})
		want := "handing sandbox init its spec"
		if why != "" {
			want = why
		}
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("init gone saying %q: Build = %v, want %q", why, err, want)
		}
		if ws, werr := p.wait(); werr != nil || !ws.Signaled() || ws.Signal() != syscall.SIGKILL {
			t.Errorf("init gone saying %q: it ended %v (%v), not killed", why, ws, werr)
		}
	}
}
