package dns

import (
	"context"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	mdns "github.com/miekg/dns"

	"github.com/childflow/childflow/engine/flowlog"
	"github.com/childflow/childflow/policy"
)

// events records what an Emitter emits.
type events struct {
	mu  sync.Mutex
	all []flowlog.Event
}

func (e *events) add(ev flowlog.Event) { e.mu.Lock(); e.all = append(e.all, ev); e.mu.Unlock() }

func (e *events) count(kind string) (n int) {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, ev := range e.all {
		if ev.Event == kind {
			n++
		}
	}
	return n
}

// A resolver that never answers: 4 of 20 queries wait for it, each on
// record as soon as asked; the rest are dropped and said to be. Ending
// the context ends the waiting ones at once, long before their timeout.
func TestServeUDPBoundsTheQueriesWaiting(t *testing.T) {
	silent, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer silent.Close()
	var got events
	r := &Resolver{
		Upstreams: []netip.AddrPort{netip.MustParseAddrPort(silent.LocalAddr().String())},
		Policy:    &policy.Policy{},
		Events:    &flowlog.Emitter{OnEvent: got.add},
		Timeout:   time.Minute,
	}
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	spawn := func(f func()) { wg.Add(1); go func() { defer wg.Done(); f() }() }
	var dropped sync.WaitGroup
	dropped.Add(16)
	served := make(chan struct{})
	go func() {
		ServeUDP(ctx, r, pc, make(chan struct{}, 4), spawn, dropped.Done)
		close(served)
	}()

	client, err := net.Dial("udp4", pc.LocalAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer client.Close()
	for i := range 20 {
		m := new(mdns.Msg)
		m.SetQuestion("q.test.", mdns.TypeA)
		m.Id = uint16(i)
		b, _ := m.Pack()
		if _, err := client.Write(b); err != nil {
			t.Fatal(err)
		}
		if i == 3 {
			// The first four hold the slots before the rest arrive.
			for deadline := time.Now().Add(5 * time.Second); got.count(flowlog.DNSQuery) < 4; time.Sleep(time.Millisecond) {
				if time.Now().After(deadline) {
					t.Fatalf("%d queries asked, want 4", got.count(flowlog.DNSQuery))
				}
			}
		}
	}
	dropped.Wait()
	if n, a := got.count(flowlog.DNSQuery), got.count(flowlog.DNSAnswer); n != 4 || a != 0 {
		t.Fatalf("%d queries and %d answers logged, want 4 waiting queries", n, a)
	}

	start := time.Now()
	cancel()
	pc.Close()
	<-served
	wg.Wait()
	if took := time.Since(start); took > 10*time.Second {
		t.Errorf("the waiting queries took %v to end", took)
	}
	got.mu.Lock()
	defer got.mu.Unlock()
	answers := 0
	for _, ev := range got.all {
		if ev.Event == flowlog.DNSAnswer {
			answers++
			if ev.RCode != "SERVFAIL" || ev.Error == "" {
				t.Errorf("answer %+v, want a SERVFAIL with the error", ev)
			}
		}
	}
	if answers != 4 {
		t.Errorf("%d answers logged, want 4", answers)
	}
}

// The upstream resolver never sees the ID the sandbox chose: each
// exchange has one of the resolver's (UDP, and TCP after a truncated
// answer), and the sandbox gets its answers under its own ID.
func TestUpstreamExchangesHaveTheirOwnIDs(t *testing.T) {
	var mu sync.Mutex
	seen := map[string][]uint16{} // by network
	answer := func(network string) mdns.HandlerFunc {
		return func(w mdns.ResponseWriter, q *mdns.Msg) {
			mu.Lock()
			seen[network] = append(seen[network], q.Id)
			mu.Unlock()
			m := new(mdns.Msg)
			m.SetReply(q)
			if network == "udp" && q.Question[0].Name == "big.test." {
				m.Truncated = true
			} else {
				m.Answer = append(m.Answer, &mdns.A{Hdr: mdns.RR_Header{Name: q.Question[0].Name, Rrtype: mdns.TypeA, Class: mdns.ClassINET, Ttl: 60}, A: net.ParseIP("203.0.113.10")})
			}
			w.WriteMsg(m)
		}
	}
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp4", pc.LocalAddr().String())
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range []*mdns.Server{{PacketConn: pc, Handler: answer("udp")}, {Listener: ln, Handler: answer("tcp")}} {
		go s.ActivateAndServe()
		defer s.Shutdown()
	}
	r := &Resolver{
		Upstreams: []netip.AddrPort{netip.MustParseAddrPort(pc.LocalAddr().String())},
		Policy:    &policy.Policy{},
		Cache:     &Cache{},
	}
	const sandboxID = 0x1234
	for i := range 20 {
		name := "q.test."
		if i%2 == 1 {
			name = "big.test."
		}
		m := new(mdns.Msg)
		m.SetQuestion(name, mdns.TypeA)
		m.Id = sandboxID
		b, _ := m.Pack()
		resp := new(mdns.Msg)
		if err := resp.Unpack(r.Answer(context.Background(), b, false)); err != nil {
			t.Fatal(err)
		}
		if resp.Id != sandboxID || len(resp.Answer) != 1 {
			t.Fatalf("answer %d: ID %#x, %d records; want %#x and one", i, resp.Id, len(resp.Answer), sandboxID)
		}
	}
	mu.Lock()
	defer mu.Unlock()
	for network, want := range map[string]int{"udp": 20, "tcp": 10} {
		ids := map[uint16]bool{}
		for _, id := range seen[network] {
			ids[id] = true
		}
		if len(seen[network]) != want || ids[sandboxID] && len(ids) == 1 || len(ids) < want/2 {
			t.Errorf("over %s the upstream saw IDs %v, want %d exchanges under IDs of the resolver's, not the sandbox's %#x", network, seen[network], want, sandboxID)
		}
	}
}

// The upstream resolver is asked the question and the DNSSEC flags, with
// recursion desired, and nothing else of the sandbox's message: no
// EDNS0 option and no record of its own, which could carry data out
// through the resolver's own upstreams, and no query without recursion,
// which would read the resolver's cache.
func TestUpstreamQueriesCarryOnlyTheQuestion(t *testing.T) {
	got := make(chan *mdns.Msg, 1)
	pc, err := net.ListenPacket("udp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &mdns.Server{PacketConn: pc, Handler: mdns.HandlerFunc(func(w mdns.ResponseWriter, q *mdns.Msg) {
		got <- q
		m := new(mdns.Msg)
		m.SetReply(q)
		w.WriteMsg(m)
	})}
	go s.ActivateAndServe()
	defer s.Shutdown()
	r := &Resolver{Upstreams: []netip.AddrPort{netip.MustParseAddrPort(pc.LocalAddr().String())}, Policy: &policy.Policy{}, Cache: &Cache{}}

	m := new(mdns.Msg)
	m.SetQuestion("allowed.test.", mdns.TypeA)
	m.RecursionDesired, m.CheckingDisabled = false, true
	m.SetEdns0(4096, true)
	opt := m.IsEdns0()
	opt.Option = append(opt.Option,
		&mdns.EDNS0_SUBNET{Code: mdns.EDNS0SUBNET, Family: 1, SourceNetmask: 24, Address: net.ParseIP("198.51.100.0").To4()},
		&mdns.EDNS0_COOKIE{Code: mdns.EDNS0COOKIE, Cookie: "0102030405060708"},
		&mdns.EDNS0_LOCAL{Code: 65001, Data: []byte("secret-4714")})
	m.Extra = append(m.Extra, &mdns.TXT{Hdr: mdns.RR_Header{Name: "x.test.", Rrtype: mdns.TypeTXT, Class: mdns.ClassINET}, Txt: []string{"secret-4715"}})
	m.Ns = append(m.Ns, &mdns.TXT{Hdr: mdns.RR_Header{Name: "y.test.", Rrtype: mdns.TypeTXT, Class: mdns.ClassINET}, Txt: []string{"secret-4716"}})
	b, err := m.Pack()
	if err != nil {
		t.Fatal(err)
	}
	resp := new(mdns.Msg)
	if err := resp.Unpack(r.Answer(context.Background(), b, false)); err != nil {
		t.Fatal(err)
	}
	if resp.Id != m.Id || resp.RecursionDesired || resp.Rcode != mdns.RcodeSuccess {
		t.Errorf("the sandbox's answer: ID %#x, RD %v, %s; want %#x, its own RD (false), NOERROR", resp.Id, resp.RecursionDesired, mdns.RcodeToString[resp.Rcode], m.Id)
	}
	q := <-got
	if len(q.Question) != 1 || q.Question[0] != m.Question[0] || !q.RecursionDesired || !q.CheckingDisabled {
		t.Errorf("upstream question %v, RD %v, CD %v; want the sandbox's, RD and its CD", q.Question, q.RecursionDesired, q.CheckingDisabled)
	}
	o := q.IsEdns0()
	if o == nil || !o.Do() || len(o.Option) != 0 {
		t.Errorf("upstream EDNS0 %v; want DO and no option", o)
	}
	if len(q.Extra) != 1 || len(q.Ns) != 0 || len(q.Answer) != 0 {
		t.Errorf("upstream records: answer %v, authority %v, additional %v; want only the OPT", q.Answer, q.Ns, q.Extra)
	}
}
