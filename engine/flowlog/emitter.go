package flowlog

import (
	"net/netip"
	"sync"
	"sync/atomic"

	"github.com/childflow/childflow/policy"
)

// Emitter stamps and delivers the events of one sandbox, numbers its
// flows and counts its policy violations (--fail-on-leak). The rootless
// engine and the rootful backend share it, so their events match.
type Emitter struct {
	Sandbox string
	// OnEvent receives the events; nil when nobody records them (the
	// violations are still counted).
	OnEvent    func(Event)
	nextFlow   atomic.Uint64
	violations atomic.Uint64
	failed     sync.Map // the kinds of FailureOnce logged
}

// NextFlow returns a new flow id.
func (e *Emitter) NextFlow() uint64 { return e.nextFlow.Add(1) }

// Flows is the number of flow ids handed out so far.
func (e *Emitter) Flows() uint64 { return e.nextFlow.Load() }

// Violations is the number of policy violations so far.
func (e *Emitter) Violations() uint64 { return e.violations.Load() }

// Emit stamps and delivers ev.
func (e *Emitter) Emit(ev Event) {
	if ev.Event == PolicyViolation {
		e.violations.Add(1)
	}
	if e.OnEvent == nil {
		return
	}
	ev.SchemaVersion = SchemaVersion
	ev.TsMs = Now()
	ev.Sandbox = e.Sandbox
	e.OnEvent(ev)
}

// Violation emits ev as the policy_violation of decision d.
func (e *Emitter) Violation(ev Event, d policy.Decision) {
	ev.Event = PolicyViolation
	ev.Verdict = "deny"
	ev.ReasonCode, ev.Control = d.Reason, d.Control
	if d.MatchedCIDR.IsValid() {
		ev.MatchedCIDR = d.MatchedCIDR.String()
	}
	ev.MatchedDomain = d.MatchedDomain
	e.Emit(ev)
}

// Attempt emits the connect_attempt of a new flow decided by d, and its
// policy_violation when d denies it; the returned event starts the
// flow's later events.
func (e *Emitter) Attempt(ev Event, d policy.Decision) Event {
	ev.Event, ev.Verdict, ev.ReasonCode = ConnectAttempt, "deny", d.Reason
	if d.Allow {
		ev.Verdict = "allow"
	}
	e.Emit(ev)
	if !d.Allow {
		e.Violation(ev, d)
	}
	return ev
}

// Result emits res as the flow's connect_result: ok, or the error.
func (e *Emitter) Result(res Event, err error) {
	res.Event, res.OK = ConnectResult, Bool(err == nil)
	if err != nil {
		res.Error = err.Error()
	}
	e.Emit(res)
}

// End emits the flow_end of a flow whose connect_result was res.
func (e *Emitter) End(res Event, up, down, durationMs int64) {
	res.Event, res.OK = FlowEnd, nil
	res.BytesUp, res.BytesDown, res.DurationMs = up, down, durationMs
	e.Emit(res)
}

// Failure emits a runtime_failure: the engine could not do what it
// needed to.
func (e *Emitter) Failure(msg string) {
	e.Emit(Event{Event: RuntimeFailure, Error: msg})
}

// FailureOnce emits msg as a runtime_failure the first time one of its
// kind comes: a sandbox that keeps hitting a limit makes one line, not
// one per flow.
func (e *Emitter) FailureOnce(kind, msg string) {
	if _, seen := e.failed.LoadOrStore(kind, true); !seen {
		e.Failure(msg)
	}
}

// Flow starts an event about one flow with a new id.
func (e *Emitter) Flow(proto policy.Proto, src, dst netip.AddrPort, names []string) Event {
	if proto == policy.ICMP {
		// src's port is the echo identifier: it finds the process, but is
		// no port of the flow's.
		src = netip.AddrPortFrom(src.Addr(), 0)
	}
	return Event{FlowID: e.NextFlow(), Proto: string(proto), Src: src.String(), Dst: dst.String(),
		DstIP: dst.Addr().String(), DstPort: dst.Port(), Names: names}
}
