package rootful

import (
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/childflow/childflow/engine/flowlog"
	"github.com/childflow/childflow/policy"
)

// controls names the policy control behind each reason code, as the
// rootless engine reports it.
var controls = map[string]string{
	policy.ReasonOffline: "offline", policy.ReasonMetadata: "block_metadata", policy.ReasonPrivate: "block_private",
	policy.ReasonDenyCIDR: "deny_cidrs", policy.ReasonDenyDomain: "deny_domains", policy.ReasonDenyDomainExact: "deny_domains_exact",
	policy.ReasonAllowCIDR: "allow_cidrs", policy.ReasonAllowDomain: "allow_domains", policy.ReasonAllowDomExact: "allow_domains_exact",
	policy.ReasonHost: "host", policy.ReasonDefaultAllow: "default_policy", policy.ReasonDefaultDeny: "default_policy",
	policy.ReasonProxyOnly: "proxy_only", "dns_bypass": "dns",
}

// watchFlows turns the table's logged verdicts into connect_attempt and
// policy_violation events. A flow whose first packets are retried before
// an answer (UDP, a SYN resent) is logged once.
func (sb *Sandbox) watchFlows(group uint16) error {
	l, err := openNFLOG(group)
	if err != nil {
		return err
	}
	// Closed after the reader is done: Close drains it first.
	sb.drain = l
	seen := map[flowKey]time.Time{}
	var mu sync.Mutex
	sb.spawn(func() {
		for {
			pkts, err := l.read()
			if err != nil {
				if sb.ctx.Err() != nil {
					l.Close()
					return
				}
				continue // ENOBUFS: events were lost, go on
			}
			now := time.Now()
			mu.Lock()
			for k, t := range seen {
				if now.Sub(t) > 5*time.Second {
					delete(seen, k)
				}
			}
			for _, p := range pkts {
				k, ok := parsePacket(p.payload)
				if !ok {
					continue
				}
				if _, dup := seen[k]; dup {
					continue
				}
				seen[k] = now
				sb.flowDecided(k, p.prefix)
			}
			mu.Unlock()
		}
	})
	return nil
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
	dst := k.dst
	names := sb.cache.Names(dst.Addr())
	ev := flowlog.Event{Event: flowlog.ConnectAttempt, FlowID: sb.nextFlow.Add(1), Proto: string(proto),
		Src: k.src.String(), Dst: dst.String(), DstIP: dst.Addr().String(), DstPort: dst.Port(), Names: names}
	ev.Verdict, ev.ReasonCode = "deny", reason
	if allow {
		ev.Verdict = "allow"
	}
	sb.emit(ev)
	if allow {
		return
	}
	d := sb.cfg.Policy.Decide(policy.Flow{Proto: proto, Dst: dst, Names: names})
	if d.Reason != reason && !(reason == policy.ReasonDenyDomain && d.Reason == policy.ReasonDenyDomainExact) {
		d = policy.Decision{Reason: reason, Control: controls[reason]}
	}
	sb.violation(ev, d)
}
