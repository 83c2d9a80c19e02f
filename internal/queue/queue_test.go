package queue

import (
	"testing"
)

func TestDropsInsteadOfBlocking(t *testing.T) {
	release := make(chan struct{})
	var handled, drains int
	q := Start(2, func(int) { <-release; handled++ }, func() { drains++ })
	// One item is taken by the goroutine, two fill the queue, the rest drop.
	for i := 0; i < 10; i++ {
		q.Put(i)
	}
	if q.Dropped() < 7 {
		t.Fatalf("dropped %d of 10 with a queue of 2 and a blocked writer", q.Dropped())
	}
	close(release)
	q.Close()
	if handled+int(q.Dropped()) != 10 || drains == 0 {
		t.Fatalf("handled %d, dropped %d, drained %d times", handled, q.Dropped(), drains)
	}
}
