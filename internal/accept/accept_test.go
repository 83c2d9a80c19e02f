package accept

import (
	"context"
	"errors"
	"net"
	"os"
	"syscall"
	"testing"
	"time"
)

// A connection that comes while the process has no descriptor left is
// accepted once one is free, and Next does not give up on the listener.
func TestNextOutlivesRunningOutOfDescriptors(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	client, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()

	// Take every descriptor the soft limit leaves, so that the accept
	// fails with EMFILE, and give them back a little later.
	var old syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &old); err != nil {
		t.Fatal(err)
	}
	low := old
	low.Cur = 256
	if err := syscall.Setrlimit(syscall.RLIMIT_NOFILE, &low); err != nil {
		t.Fatal(err)
	}
	defer syscall.Setrlimit(syscall.RLIMIT_NOFILE, &old)
	var filler []*os.File
	for {
		f, err := os.Open(os.DevNull)
		if err != nil {
			if !errors.Is(err, syscall.EMFILE) {
				t.Fatal(err)
			}
			break
		}
		filler = append(filler, f)
	}
	if len(filler) == 0 {
		t.Fatal("the process already had 256 descriptors open")
	}
	time.AfterFunc(100*time.Millisecond, func() {
		for _, f := range filler {
			f.Close()
		}
	})

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	start := time.Now()
	c, err := Next(ctx, ln)
	if err != nil {
		t.Fatalf("Next: %v", err)
	}
	c.Close()
	if waited := time.Since(start); waited < 50*time.Millisecond {
		t.Fatalf("accepted after %v, before any descriptor was free: the accept never failed, the test shows nothing", waited)
	}
}

func TestNextEndsWithTheListener(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln.Close()
	if _, err := Next(context.Background(), ln); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Next on a closed listener: %v", err)
	}
}
