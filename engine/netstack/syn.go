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
	seen   bool
	seq    uint32
	ttl    uint8
	hdrLen int
}

// synTable holds the last SYN of each connection being opened, from the
// packet's delivery until the forwarder's handler takes it.
type synTable struct {
	mu   sync.Mutex
	syns map[stack.TransportEndpointID]syn
	// max bounds the SYNs the forwarder dropped (over its limit of
	// half-open connections), which no handler ever takes.
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
	t.syns[id] = syn{seen: true, seq: h.SequenceNumber(), ttl: ttl, hdrLen: len(h)}
}

func (t *synTable) take(id stack.TransportEndpointID) syn {
	t.mu.Lock()
	defer t.mu.Unlock()
	s := t.syns[id]
	delete(t.syns, id)
	return s
}
