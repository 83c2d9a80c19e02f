package rootful

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/childflow/childflow/policy"
)

// watchFlows turns the table's logged verdicts into connect_attempt and
// policy_violation events. A flow whose first packets are retried before
// an answer (UDP, a SYN resent), or whose packets are all refused (a
// denied ping's echoes), is logged once, until 5 s pass without one.
func (sb *Sandbox) watchFlows(group uint16) error {
	l, err := openNFLOG(group)
	if err != nil {
		return err
	}
	// Closed after the reader is done: Close drains it first.
	sb.drain = l
	seen := map[flowKey]time.Time{} // the reader's alone
	var pruned time.Time
	var gaps gapMarks
	var draining time.Time // when the sandbox's end began the drain
	sb.spawn(func() {
		for {
			pkts, err := l.read()
			if sb.ctx.Err() != nil {
				// Verdicts a burst queued at the end are still read: the
				// drain goes on while they come, for at most drainFor. A
				// read past its deadline fails without looking, so a
				// reader kept from running until then looks again.
				if draining.IsZero() {
					draining = time.Now()
				}
				more := err == nil || errors.Is(err, os.ErrDeadlineExceeded) && l.pending()
				switch {
				case more && time.Since(draining) < drainFor:
					l.drain()
					if err != nil {
						continue
					}
				case more:
					sb.events.FailureOnce("drain", fmt.Sprintf("verdicts were still being read %s after the sandbox ended: the flow log may not list the last flows", drainFor))
				}
			}
			if errors.Is(err, unix.ENOBUFS) {
				if msg, ok := gaps.overflow(time.Now()); ok {
					sb.events.Failure(msg)
				}
				continue
			}
			if err != nil {
				if sb.ctx.Err() != nil { // drained
					if msg, ok := gaps.rest(); ok {
						sb.events.Failure(msg)
					}
					l.Close()
					return
				}
				continue
			}
			now := time.Now()
			if now.Sub(pruned) > time.Second { // not on every read: a flood makes seen large
				for k, t := range seen {
					if now.Sub(t) > 5*time.Second {
						delete(seen, k)
					}
				}
				pruned = now
			}
			for _, p := range pkts {
				if strings.HasPrefix(p.prefix, logLimit) {
					sb.limitFailure()
					continue
				}
				k, ok := parsePacket(p.payload)
				if !ok {
					continue
				}
				_, dup := seen[k]
				seen[k] = now // a denied flow's packets keep coming: one flow while they do
				if !dup {
					sb.flowDecided(k, p.prefix)
				}
			}
		}
	})
	return nil
}

// limitFailure logs, once, that the flow limit refused a flow: when its
// verdict is read, or at the end from the limit rule's counter.
func (sb *Sandbox) limitFailure() {
	sb.events.FailureOnce("flows", fmt.Sprintf("the sandbox holds %d flows beyond the host (TCP connections, UDP and other flows), the limit: new ones are refused until some end", maxFlows))
}

// gapMarks marks where the kernel dropped verdicts the reader was too
// slow for (ENOBUFS): at once, then at most once a second so that a
// flood does not flood the log too, and what is left at the end.
type gapMarks struct {
	lost   int // overflows not yet marked
	marked time.Time
}

func (g *gapMarks) overflow(now time.Time) (string, bool) {
	g.lost++
	if now.Sub(g.marked) < time.Second {
		return "", false
	}
	g.marked = now
	return g.rest()
}

func (g *gapMarks) rest() (string, bool) {
	n := g.lost
	g.lost = 0
	return fmt.Sprintf("the kernel dropped the verdicts of some flows here (log socket overflows: %d): the flow log does not list them", n), n > 0
}

func protoOf(n byte) policy.Proto {
	switch n {
	case unix.IPPROTO_TCP:
		return policy.TCP
	case unix.IPPROTO_UDP:
		return policy.UDP
	}
	return policy.ICMP
}

// flowDecided logs one flow the kernel decided. The kernel's verdict and
// reason stand; the matched rule is found by asking the policy again.
func (sb *Sandbox) flowDecided(k flowKey, prefix string) {
	allow := strings.HasPrefix(prefix, logAllow)
	reason := strings.TrimSpace(prefix[min(len(prefix), len(logAllow)):])
	proto := protoOf(k.proto)
	names := sb.cache.Names(k.dst.Addr())
	ev := sb.events.Flow(proto, k.src, k.dst, names)
	// Not once the sandbox is gone: its sockets are too.
	if sb.owners != nil && sb.ctx.Err() == nil {
		if o, ok := sb.owners.Find(string(proto), k.src, k.dst); ok {
			ev.PID, ev.Comm = o.PID, o.Comm
		}
	}
	d := policy.Decision{Allow: allow, Reason: reason, Control: policy.ControlOf(reason)}
	if !allow {
		// The kernel's verdict stands; asking the policy again finds the
		// rule that matched.
		again := sb.cfg.Policy.Decide(policy.Flow{Proto: proto, Dst: k.dst, Names: names})
		if again.Reason == reason || reason == policy.ReasonDenyDomain && again.Reason == policy.ReasonDenyDomainExact {
			d = again
		}
	}
	sb.events.Attempt(ev, d)
}
