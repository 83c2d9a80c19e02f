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
	// OnQuery, if non-nil, is told about every query after it is answered.
	OnQuery func(Query)
	// Timeout per upstream attempt; zero means 4 s.
	Timeout time.Duration
	// OnUpstream, if non-nil, is told of the socket of each exchange
	// with an upstream resolver, for the egress capture.
	OnUpstream upstream.Func
	// Dialer, if set, opens the upstream connections (--iface binds it).
	Dialer *net.Dialer
}

// exchange is one query to one upstream resolver.
func (r *Resolver) exchange(ctx context.Context, c *mdns.Client, req *mdns.Msg, up netip.AddrPort) (*mdns.Msg, error) {
	ctx, closed := upstream.Watch(ctx, r.OnUpstream)
	defer closed()
	resp, _, err := c.ExchangeContext(ctx, req, up.String())
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
	if r.OnQuery != nil {
		r.OnQuery(info)
	}
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
	var lastErr error
	for _, up := range r.Upstreams {
		c := &mdns.Client{Net: network, Timeout: timeout, UDPSize: 4096, Dialer: dialer}
		resp, err := r.exchange(ctx, c, req, up)
		if err == nil && resp.Truncated && network == "udp" {
			// Answer over TCP ourselves so the sandbox gets a complete
			// answer and every address in it is recorded.
			c.Net = "tcp"
			resp, err = r.exchange(ctx, c, req, up)
		}
		if err == nil {
			return resp, up.String(), nil
		}
		lastErr = fmt.Errorf("querying %s: %w", up, err)
	}
	return nil, "", lastErr
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

// Log emits the query's dns_query and dns_answer, and its
// policy_violation when the name was denied.
func (q Query) Log(em *flowlog.Emitter) {
	ev := flowlog.Event{Event: flowlog.DNSQuery, QName: q.Name, QType: q.Type, Proto: "dns"}
	em.Emit(ev)
	if !q.Decision.Allow {
		v := ev
		v.MatchedDomain = q.Decision.MatchedDomain
		em.Violation(v, q.Decision)
	}
	ev.Event, ev.RCode, ev.Answers, ev.Upstream = flowlog.DNSAnswer, q.RCode, q.Answers, q.Upstream
	if q.Err != nil {
		ev.Error = q.Err.Error()
	}
	em.Emit(ev)
}
