package sandbox

import (
	"errors"
	"os"
	"runtime"
	"syscall"
	"testing"
	"time"
)

// TestProcessIsNotSignalledOnceReaped: after wait, the pid may name
// another process; signal must refuse rather than reach it.
func TestProcessIsNotSignalledOnceReaped(t *testing.T) {
	pid, err := syscall.ForkExec("/bin/sleep", []string{"sleep", "10"}, &syscall.ProcAttr{Files: []uintptr{0, 1, 2}})
	if err != nil {
		t.Fatal(err)
	}
	p := &process{pid: pid}
	if err := p.signal(syscall.SIGTERM); err != nil {
		t.Fatalf("signal while running: %v", err)
	}
	ws, err := p.wait()
	if err != nil || !ws.Signaled() || ws.Signal() != syscall.SIGTERM {
		t.Fatalf("wait: %v, %v", ws, err)
	}
	if err := p.signal(syscall.SIGTERM); !errors.Is(err, os.ErrProcessDone) {
		t.Fatalf("signal after wait: %v, want os.ErrProcessDone", err)
	}
	if ws2, err := p.wait(); err != nil || ws2 != ws {
		t.Fatalf("second wait: %v, %v", ws2, err)
	}
	if err := syscall.Kill(pid, 0); err != syscall.ESRCH {
		t.Fatalf("pid %d still exists after wait: %v", pid, err)
	}
}

// A goroutine that locks its thread and returns ends the thread, as
// asuser.Do's do; init, whose parent-death signal followed the thread
// that forked it, died with such a thread.
func TestAStartedProcessOutlivesEndedThreads(t *testing.T) {
	p, err := startProcess("/bin/sleep", []string{"sleep", "10"}, &syscall.ProcAttr{Files: []uintptr{0, 1, 2}, Sys: &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}})
	if err != nil {
		t.Fatal(err)
	}
	for range 64 {
		ended := make(chan struct{})
		go func() {
			defer close(ended)
			runtime.LockOSThread() // never unlocked: the thread ends with the goroutine
		}()
		<-ended
	}
	time.Sleep(50 * time.Millisecond) // the last threads' end, a signal's delivery
	p.signal(syscall.SIGTERM)
	if ws, err := p.wait(); err != nil || !ws.Signaled() || ws.Signal() != syscall.SIGTERM {
		t.Fatalf("the process ended %v (%v), not by the test's SIGTERM", ws, err)
	}
}
