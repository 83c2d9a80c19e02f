// Package queue feeds one writer goroutine from a bounded queue that never
// blocks its producers: what does not fit is dropped and counted, because
// the relay's data path must not wait for a disk.
package queue

import (
	"sync"
	"sync/atomic"
)

// Queue hands items to one goroutine.
type Queue[T any] struct {
	ch      chan T
	done    chan struct{}
	dropped atomic.Uint64
	once    sync.Once
}

// Start runs handle for each item on its own goroutine. drained is called
// whenever the queue runs empty (flush there: after a crash the output
// ends on a complete record) and once more after Close.
func Start[T any](size int, handle func(T), drained func()) *Queue[T] {
	q := &Queue[T]{ch: make(chan T, size), done: make(chan struct{})}
	go func() {
		defer close(q.done)
		for v := range q.ch {
			handle(v)
			if len(q.ch) == 0 {
				drained()
			}
		}
		drained()
	}()
	return q
}

// Put queues v, or drops it when the queue is full and reports false.
func (q *Queue[T]) Put(v T) bool {
	if !q.Offer(v) {
		q.dropped.Add(1)
		return false
	}
	return true
}

// Offer queues v if there is room, and reports whether there was; a v
// that did not fit is not counted as dropped.
func (q *Queue[T]) Offer(v T) bool {
	select {
	case q.ch <- v:
		return true
	default:
		return false
	}
}

// Drop counts an item the producer chose not to queue.
func (q *Queue[T]) Drop() { q.dropped.Add(1) }

// Dropped is how many items were dropped.
func (q *Queue[T]) Dropped() uint64 { return q.dropped.Load() }

// Close waits until everything queued was handled. Put must not be called
// after Close.
func (q *Queue[T]) Close() {
	q.once.Do(func() { close(q.ch) })
	<-q.done
}
