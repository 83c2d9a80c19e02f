package engine

import (
	"io"
	"net"
	"testing"
	"time"
)

func TestBufferBudgetGivesTheLargestTierThatFits(t *testing.T) {
	full, small := bufferTiers[0], bufferTiers[1]
	if floor.cost != 2*(64<<10)+2*(16<<10) {
		t.Fatalf("the floor costs %d", floor.cost)
	}
	b := NewBufferBudget(full.cost + small.cost)
	for i, want := range []flowBuffers{full, small, floor, floor} {
		if got := b.take(); got != want {
			t.Fatalf("take %d: %+v, want %+v", i, got, want)
		}
	}
	b.give(floor)
	if b.free != 0 {
		t.Fatalf("the floor, outside the budget, gave back %d bytes", b.free)
	}
	b.give(full)
	if got := b.take(); got != full {
		t.Fatalf("after a full flow ended: %+v, want %+v", got, full)
	}
}

// Engines given one budget share it: the node daemon's sandboxes hold
// at most one budget between them, not one each.
func TestEnginesShareABudget(t *testing.T) {
	full := bufferTiers[0]
	shared := NewBufferBudget(full.cost)
	a := newSandboxWith(t, allowAll, func(c *Config) { c.Buffers = shared })
	b := newSandboxWith(t, allowAll, func(c *Config) { c.Buffers = shared })
	srv := remote(echoServer(t, "tcp", "127.0.0.1:0"))
	free := func() int64 {
		shared.mu.Lock()
		defer shared.mu.Unlock()
		return shared.free
	}
	echo := func(sb *sandbox) net.Conn {
		c, err := sb.dial(t, srv)
		if err != nil {
			t.Fatal(err)
		}
		c.Write([]byte("x"))
		c.SetReadDeadline(time.Now().Add(3 * time.Second))
		if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
			t.Fatal(err)
		}
		return c
	}
	ca := echo(a)
	if got := free(); got != 0 {
		t.Fatalf("a's flow left %d bytes of the budget, want 0", got)
	}
	cb := echo(b) // on the floor, outside the budget
	defer cb.Close()
	ca.Close()
	deadline := time.Now().Add(3 * time.Second)
	for free() != full.cost {
		if time.Now().After(deadline) {
			t.Fatalf("a's flow ended, the budget has %d bytes free, want %d", free(), full.cost)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
