package netstack

import (
	"testing"

	"gvisor.dev/gvisor/pkg/buffer"
	"gvisor.dev/gvisor/pkg/tcpip/header"
	"gvisor.dev/gvisor/pkg/tcpip/stack"
)

func segment(flags header.TCPFlags, seq uint32) *stack.PacketBuffer {
	h := header.TCP(make([]byte, header.TCPMinimumSize+4)) // with an MSS option
	h.Encode(&header.TCPFields{SrcPort: 40000, DstPort: 80, SeqNum: seq, DataOffset: header.TCPMinimumSize + 4, Flags: flags})
	pkt := stack.NewPacketBuffer(stack.PacketBufferOptions{Payload: buffer.MakeWithData(h)})
	pkt.TransportHeader().Consume(len(h))
	return pkt
}

func TestSynTable(t *testing.T) {
	tab := synTable{max: 3}
	id := func(port uint16) stack.TransportEndpointID { return stack.TransportEndpointID{RemotePort: port} }
	tab.note(id(1), segment(header.TCPFlagSyn, 100), 64)
	tab.note(id(1), segment(header.TCPFlagSyn, 100), 63) // retransmitted
	tab.note(id(2), segment(header.TCPFlagSyn|header.TCPFlagAck, 200), 64)
	tab.note(id(3), segment(header.TCPFlagAck, 300), 64)
	if s, ok := tab.take(id(1)); !ok || s.seq != 100 || s.ttl != 63 || s.hdrLen != 24 {
		t.Fatalf("SYN of 1: %+v %v", s, ok)
	}
	if _, ok := tab.take(id(1)); ok {
		t.Fatal("taken twice")
	}
	for _, p := range []uint16{2, 3} {
		if s, ok := tab.take(id(p)); ok {
			t.Fatalf("not a SYN, noted: %+v", s)
		}
	}
	for p := uint16(10); p < 20; p++ {
		tab.note(id(p), segment(header.TCPFlagSyn, uint32(p)), 64)
	}
	if len(tab.syns) > tab.max {
		t.Fatalf("%d SYNs held, bound %d", len(tab.syns), tab.max)
	}
	if s, ok := tab.take(id(19)); !ok || s.seq != 19 {
		t.Fatalf("the last SYN: %+v %v", s, ok)
	}
}
