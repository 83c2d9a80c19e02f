package netstack

import (
	"sync"

	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

// syn is what an ICMP error about a SYN must quote for the sandbox's
// kernel to take it: Linux drops an error whose sequence number is not
// the one its connecting socket sent. gVisor's forwarder keeps the SYN to
// itself, so synTable notes it on the way in.
type syn struct {
	seq    uint32
	ttl    uint8
	hdrLen int
}

// synTable holds the last SYN of each connection being opened, from the
// packet's delivery until its request is completed. Taken before the
// request completes, an entry cannot belong to the next request of the
// same 4-tuple; a SYN retransmitted meanwhile may leave one behind.
type synTable struct {
	mu   sync.Mutex
	syns map[stack.TransportEndpointID]syn
	// max bounds what is never taken: SYNs the forwarder dropped (over
	// its limit of half-open connections) or retransmitted late.
	max int
}

// note records pkt if it is a SYN; ttl is the one of its IP header.
func (t *synTable) note(id stack.TransportEndpointID, pkt *stack.PacketBuffer, ttl uint8) {
	h := header.TCP(pkt.TransportHeader().Slice())
	if len(h) < header.TCPMinimumSize || !h.Flags().Contains(header.TCPFlagSyn) || h.Flags().Contains(header.TCPFlagAck) {
		return
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.syns == nil {
		t.syns = make(map[stack.TransportEndpointID]syn)
	}
	if len(t.syns) >= t.max {
		clear(t.syns)
	}
	t.syns[id] = syn{seq: h.SequenceNumber(), ttl: ttl, hdrLen: len(h)}
}

func (t *synTable) take(id stack.TransportEndpointID) (syn, bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	s, ok := t.syns[id]
	delete(t.syns, id)
	return s, ok
}
