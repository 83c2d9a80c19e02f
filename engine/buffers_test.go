package engine

import "testing"

func TestBufferBudgetGivesTheLargestTierThatFits(t *testing.T) {
	full, small := bufferTiers[0], bufferTiers[1]
	b := bufferBudget{free: full.cost + small.cost}
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
