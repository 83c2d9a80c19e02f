package dns

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"slices"
	"time"

	mdns "github.com/miekg/dns"

	"github.com/childflow/childflow/engine/flowlog"
	"github.com/childflow/childflow/engine/upstream"
	"github.com/childflow/childflow/policy"
)

// Query describes one query the resolver handled, for the flow log.
type Query struct {
	Name     string
	Type     string
	Decision policy.Decision
	RCode    string
	Answers  []string // addresses and CNAME targets, in answer order
	Upstream string
	Err      error
}

// Resolver answers the sandbox's DNS queries.
type Resolver struct {
	Upstreams []netip.AddrPort
	Policy    *policy.Policy
	Cache     *Cache
	// Events, if non-nil, gets each query's dns_query when it is asked
	// (so one still waiting for the upstream resolvers is on record) and
	// its dns_answer when it is answered.
	Events *flowlog.Emitter
	// OnAnswer, if non-nil, sees each answered query before the sandbox
	// gets the answer; an error it sets is logged with the answer.
	OnAnswer func(*Query)
	// Timeout per upstream attempt; zero means 4 s.
	Timeout time.Duration
	// OnUpstream, if non-nil, is told of the socket of each exchange
	// with an upstream resolver, for the egress capture.
	OnUpstream upstream.Func
	// Dialer, if set, opens the upstream connections (--iface binds it).
	Dialer *net.Dialer
	// Take, if set, reserves what one query's exchanges with the
	// upstream resolvers hold (a port of the node's, for the node
	// daemon's flow budget) and returns its release; a query it refuses
	// gets SERVFAIL.
	Take func() (give func(), ok bool)
}

// exchange is one query to one upstream resolver.
func (r *Resolver) exchange(ctx context.Context, c *mdns.Client, req *mdns.Msg, up netip.AddrPort) (*mdns.Msg, error) {
	ctx, closed := upstream.Watch(ctx, r.OnUpstream)
	defer closed()
	conn, err := c.DialContext(ctx, up.String())
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	// The client only reads ctx's deadline: a query waiting when the
	// sandbox ends is cut here, not at its timeout.
	defer context.AfterFunc(ctx, func() { conn.Close() })()
	resp, _, err := c.ExchangeWithConnContext(ctx, req, conn)
	if ctx.Err() != nil {
		return nil, ctx.Err()
	}
	return resp, err
}

// Answer returns the response to one DNS message from the sandbox, or nil
// when the message cannot even be parsed far enough to refuse it.
func (r *Resolver) Answer(ctx context.Context, raw []byte, overTCP bool) []byte {
	req := new(mdns.Msg)
	if err := req.Unpack(raw); err != nil || req.Response || req.Opcode != mdns.OpcodeQuery || len(req.Question) != 1 {
		return refuse(raw)
	}
	q := req.Question[0]
	name := policy.NormalizeName(q.Name)
	info := Query{Name: name, Type: mdns.TypeToString[q.Qtype]}
	info.Decision = r.Policy.DecideName(name)
	r.logQuestion(info)
	var resp *mdns.Msg
	if !info.Decision.Allow {
		// Denied names get NODATA and are never sent upstream, so the
		// resolver cannot be used to leak data through query names.
		resp = nodata(req)
	} else {
		var err error
		resp, info.Upstream, err = r.forward(ctx, req, overTCP)
		if err != nil {
			info.Err = err
			resp = new(mdns.Msg)
			resp.SetRcode(req, mdns.RcodeServerFailure)
		} else if chain := cnameChain(name, resp); r.deniedAlias(chain, &info) {
			// The name is allowed but an alias on its chain is denied:
			// the address is withheld, as for the denied name itself.
			r.logViolation(info)
			resp = nodata(req)
		} else {
			info.Answers = r.record(chain, resp)
		}
	}
	if !overTCP {
		// Fit the sandbox's buffer: 512 bytes, or what its EDNS0 offers.
		// A truncated answer makes it retry over TCP.
		size := mdns.MinMsgSize
		if opt := req.IsEdns0(); opt != nil {
			size = max(size, int(opt.UDPSize()))
		}
		resp.Truncate(size)
	}
	info.RCode = mdns.RcodeToString[resp.Rcode]
	if r.OnAnswer != nil {
		r.OnAnswer(&info)
	}
	r.logAnswer(info)
	out, err := resp.Pack()
	if err != nil {
		return refuse(raw)
	}
	return out
}

// refuse answers REFUSED to a message whose header at least is readable.
func refuse(raw []byte) []byte {
	if len(raw) < 12 || raw[2]&0x80 != 0 {
		return nil
	}
	out := make([]byte, 12)
	copy(out, raw[:2])
	out[2] = 0x80 | raw[2]&0x79 // QR, keep opcode and RD
	out[3] = 0x80 | mdns.RcodeRefused
	return out
}

func (r *Resolver) forward(ctx context.Context, req *mdns.Msg, overTCP bool) (*mdns.Msg, string, error) {
	if len(r.Upstreams) == 0 {
		return nil, "", errors.New("no upstream resolver")
	}
	if r.Take != nil {
		give, ok := r.Take()
		if !ok {
			return nil, "", errors.New("the node's flow limit is reached")
		}
		defer give()
	}
	timeout := r.Timeout
	if timeout == 0 {
		timeout = 4 * time.Second
	}
	network := "udp"
	if overTCP {
		network = "tcp"
	}
	dialer := upstream.Dialer(r.Dialer)
	if dialer.Timeout == 0 {
		dialer.Timeout = timeout
	}
	// The upstream resolvers get an ID of ours, a new one per exchange.
	// The sandbox chose the one it sent: with that, a spoofed answer
	// would have only the source port to guess, and one that took would
	// name any address as an allowed name's.
	asked := upstreamQuery(req)
	var lastErr error
	for _, up := range r.Upstreams {
		c := &mdns.Client{Net: network, Timeout: timeout, UDPSize: 4096, Dialer: dialer}
		asked.Id = mdns.Id()
		resp, err := r.exchange(ctx, c, asked, up)
		if err == nil && resp.Truncated && network == "udp" {
			// Answer over TCP ourselves so the sandbox gets a complete
			// answer and every address in it is recorded.
			c.Net = "tcp"
			asked.Id = mdns.Id()
			resp, err = r.exchange(ctx, c, asked, up)
		}
		if err == nil {
			resp.Id, resp.RecursionDesired = req.Id, req.RecursionDesired
			return resp, up.String(), nil
		}
		lastErr = fmt.Errorf("querying %s: %w", up, err)
	}
	return nil, "", lastErr
}

// upstreamQuery is what the upstream resolvers are asked for the
// sandbox's query req: its question and DNSSEC flags (DO, CD, AD) and
// nothing else the policy does not read. Recursion is always desired: a
// query without it (dig +norec) would tell the command which names the
// resolver has cached for the host's other users. No EDNS0 option
// (client subnet, cookie, padding, anything) and no record the sandbox
// added go on.
func upstreamQuery(req *mdns.Msg) *mdns.Msg {
	q := new(mdns.Msg)
	q.Question = []mdns.Question{req.Question[0]}
	q.RecursionDesired = true
	q.CheckingDisabled, q.AuthenticatedData = req.CheckingDisabled, req.AuthenticatedData
	if opt := req.IsEdns0(); opt != nil {
		q.SetEdns0(1232, opt.Do()) // the size that needs no fragments (DNS flag day 2020)
	}
	return q
}

func nodata(req *mdns.Msg) *mdns.Msg {
	m := new(mdns.Msg)
	m.SetReply(req)
	m.RecursionAvailable = true
	return m
}

// cnameChain follows the CNAME records of resp from name; records whose
// owner is not on the chain are ignored.
func cnameChain(name string, resp *mdns.Msg) []string {
	chain := []string{name}
	for hops := 0; hops < 16; hops++ {
		cur, next := chain[len(chain)-1], ""
		for _, rr := range resp.Answer {
			if c, ok := rr.(*mdns.CNAME); ok && policy.NormalizeName(c.Hdr.Name) == cur {
				next = policy.NormalizeName(c.Target)
				break
			}
		}
		if next == "" || slices.Contains(chain, next) {
			break
		}
		chain = append(chain, next)
	}
	return chain
}

// deniedAlias reports whether an alias on the chain is denied by an
// explicit deny rule, and records that decision in info. (Under a default
// deny, aliases such as CDN names are fine: the queried name decides.)
func (r *Resolver) deniedAlias(chain []string, info *Query) bool {
	for _, n := range chain[1:] {
		d := r.Policy.DecideName(n)
		if !d.Allow && (d.Reason == policy.ReasonDenyDomain || d.Reason == policy.ReasonDenyDomainExact) {
			d.MatchedDomain = n
			info.Decision = d
			return true
		}
	}
	return false
}

// record remembers every address in resp owned by the chain's last name
// under every name of the chain, for the shortest TTL along it.
func (r *Resolver) record(chain []string, resp *mdns.Msg) []string {
	ttl := uint32(1<<31 - 1)
	var answers []string
	for _, rr := range resp.Answer {
		if c, ok := rr.(*mdns.CNAME); ok && slices.Contains(chain, policy.NormalizeName(c.Hdr.Name)) {
			ttl = min(ttl, c.Hdr.Ttl)
			answers = append(answers, "CNAME "+policy.NormalizeName(c.Target))
		}
	}
	last := chain[len(chain)-1]
	for _, rr := range resp.Answer {
		var ip []byte
		switch a := rr.(type) {
		case *mdns.A:
			ip = a.A
		case *mdns.AAAA:
			ip = a.AAAA
		default:
			continue
		}
		if policy.NormalizeName(rr.Header().Name) != last {
			continue
		}
		addr, ok := netip.AddrFromSlice(ip)
		if !ok {
			continue
		}
		addr = addr.Unmap()
		answers = append(answers, addr.String())
		t := time.Duration(min(ttl, rr.Header().Ttl)) * time.Second
		if r.Cache != nil {
			for _, n := range chain {
				r.Cache.Record(addr, n, t)
			}
			r.Cache.RecordQuery(addr, chain[0])
		}
	}
	return answers
}

// ReadTCPMessage and WriteTCPMessage frame DNS over TCP (RFC 1035 4.2.2).
func ReadTCPMessage(rd io.Reader) ([]byte, error) {
	var l [2]byte
	if _, err := io.ReadFull(rd, l[:]); err != nil {
		return nil, err
	}
	msg := make([]byte, binary.BigEndian.Uint16(l[:]))
	if _, err := io.ReadFull(rd, msg); err != nil {
		return nil, err
	}
	return msg, nil
}

func WriteTCPMessage(w io.Writer, msg []byte) error {
	b := make([]byte, 2+len(msg))
	binary.BigEndian.PutUint16(b, uint16(len(msg)))
	copy(b[2:], msg)
	_, err := w.Write(b)
	return err
}

// DefaultMaxInFlight is how many queries on a gateway's UDP socket may
// wait for the upstream resolvers at once.
const DefaultMaxInFlight = 128

// ServeUDP answers DNS on an unconnected UDP socket until it is closed.
// A query waiting for the upstream resolvers holds a goroutine and a
// socket: at most cap(slots) wait at once, and a sandbox flooding its
// resolver loses queries (clients retry; full is told of each) rather
// than the server running out of descriptors. spawn runs each answer,
// so that the caller can wait for them.
func ServeUDP(ctx context.Context, r *Resolver, pc net.PacketConn, slots chan struct{}, spawn func(func()), full func()) {
	buf := make([]byte, 65535)
	for {
		n, from, err := pc.ReadFrom(buf)
		if err != nil {
			return
		}
		select {
		case slots <- struct{}{}:
		default:
			full()
			continue
		}
		msg := append([]byte(nil), buf[:n]...)
		spawn(func() {
			defer func() { <-slots }()
			if resp := r.Answer(ctx, msg, false); resp != nil {
				pc.WriteTo(resp, from)
			}
		})
	}
}

// ServeTCP answers DNS over TCP on one connection until it is idle for
// 30 s or closed, and closes it.
func ServeTCP(ctx context.Context, r *Resolver, c net.Conn) {
	defer c.Close()
	for {
		c.SetReadDeadline(time.Now().Add(30 * time.Second))
		msg, err := ReadTCPMessage(c)
		if err != nil {
			return
		}
		resp := r.Answer(ctx, msg, true)
		if resp == nil || WriteTCPMessage(c, resp) != nil {
			return
		}
	}
}

func (q Query) event(kind string) flowlog.Event {
	return flowlog.Event{Event: kind, QName: q.Name, QType: q.Type, Proto: "dns"}
}

// logQuestion emits the query's dns_query, and its policy_violation when
// the name is denied.
func (r *Resolver) logQuestion(q Query) {
	if r.Events == nil {
		return
	}
	r.Events.Emit(q.event(flowlog.DNSQuery))
	if !q.Decision.Allow {
		r.logViolation(q)
	}
}

// logViolation emits the policy_violation of a denied name or alias.
func (r *Resolver) logViolation(q Query) {
	if r.Events == nil {
		return
	}
	ev := q.event(flowlog.DNSQuery)
	ev.MatchedDomain = q.Decision.MatchedDomain
	r.Events.Violation(ev, q.Decision)
}

func (r *Resolver) logAnswer(q Query) {
	if r.Events == nil {
		return
	}
	ev := q.event(flowlog.DNSAnswer)
	ev.RCode, ev.Answers, ev.Upstream = q.RCode, q.Answers, q.Upstream
	if q.Err != nil {
		ev.Error = q.Err.Error()
	}
	r.Events.Emit(ev)
}
