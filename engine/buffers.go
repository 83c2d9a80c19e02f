package engine

import (
	"sync"

	"github.com/childflow/childflow/engine/netstack"
)

// A TCP flow whose peer stops reading keeps every buffer on its way full:
// the stack's receive or send buffer (autotuned up to
// netstack.MaxBuffer) and the relay's copy buffer. A sandbox opening
// thousands of such flows would make the engine hold gigabytes, so the
// flows share a budget: each takes the largest buffers the budget still
// has room for, down to a floor that stays outside it, and gives them
// back when it ends. The engines sharing a budget then buffer at most
// the budget plus the floor's cost per flow (MaxFlows per engine).

// flowBuffers are one flow's buffer sizes.
type flowBuffers struct {
	window int        // the stack's receive and send buffers; 0: autotuned
	copy   int        // each direction's copy buffer
	pool   *sync.Pool // of copy buffers of that size
	cost   int64
}

func tier(window, copy int) flowBuffers {
	w := window
	if w == 0 {
		w = netstack.MaxBuffer
	}
	pool := &sync.Pool{New: func() any { b := make([]byte, copy); return &b }}
	return flowBuffers{window: window, copy: copy, pool: pool, cost: 2*int64(w) + 2*int64(copy)}
}

var bufferTiers = []flowBuffers{
	tier(0, 256<<10),
	tier(256<<10, 64<<10),
	// The floor: a window of one 64 KiB-MTU segment; 16 KiB stalled such
	// a link to 0.5 Mbit/s, 64 KiB still carries 2-3 Gbit/s.
	tier(64<<10, 16<<10),
}

// floor is the tier outside the budget: what each flow may buffer beyond it.
var floor = bufferTiers[len(bufferTiers)-1]

// DefaultBufferBudget is an engine's own budget when none is shared.
const DefaultBufferBudget = 128 << 20

// BufferBudget is what the TCP flows of the engines given it may buffer
// together, beyond the floor.
type BufferBudget struct {
	mu   sync.Mutex
	free int64
}

// NewBufferBudget returns a budget of bytes.
func NewBufferBudget(bytes int64) *BufferBudget { return &BufferBudget{free: bytes} }

// take reserves the largest tier that fits; the floor always does.
func (b *BufferBudget) take() flowBuffers {
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, t := range bufferTiers[:len(bufferTiers)-1] {
		if t.cost <= b.free {
			b.free -= t.cost
			return t
		}
	}
	return floor
}

func (b *BufferBudget) give(t flowBuffers) {
	if t == floor {
		return
	}
	b.mu.Lock()
	b.free += t.cost
	b.mu.Unlock()
}
