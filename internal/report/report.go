// Package report aggregates flow-log events into what --summary prints
// after a run and what --report renders from a saved flow log.
package report

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"sort"
	"sync"

	"github.com/childflow/childflow/engine/flowlog"
)

// maxFlows bounds the per-flow rows kept for the timeline.
const maxFlows = 2000

// Report is the aggregate. Add is safe for concurrent use.
type Report struct {
	mu sync.Mutex

	Events       map[string]int  `json:"events"`
	Flows        int             `json:"flows"`
	Allowed      int             `json:"allowed"`
	Denied       int             `json:"denied"`
	BytesUp      int64           `json:"bytes_up"`
	BytesDown    int64           `json:"bytes_down"`
	Destinations []Destination   `json:"destinations"`
	Names        []Name          `json:"names"`
	Violations   map[string]int  `json:"violations_by_control"`
	Denials      []flowlog.Event `json:"violations"`
	ProxyFlows   map[string]int  `json:"proxy_flows"`
	Errors       map[string]int  `json:"errors"`
	Timeline     []Flow          `json:"timeline"`
	FirstMs      int64           `json:"first_ts_ms"`
	LastMs       int64           `json:"last_ts_ms"`
	dests        map[string]*Destination
	names        map[string]*Name
	flows        map[uint64]int // flow id -> index in Timeline
	addrNames    map[string]map[string]bool
	DroppedLines int `json:"unparsable_lines,omitempty"`
}

// Destination is one address:port and what happened there.
type Destination struct {
	Dst       string   `json:"dst"`
	Proto     string   `json:"proto"`
	Names     []string `json:"names,omitempty"`
	Flows     int      `json:"flows"`
	Denied    int      `json:"denied"`
	BytesUp   int64    `json:"bytes_up"`
	BytesDown int64    `json:"bytes_down"`
}

// Name is one queried name: the DNS-to-connection correlation.
type Name struct {
	Name        string   `json:"name"`
	Queries     int      `json:"queries"`
	Denied      bool     `json:"denied,omitempty"`
	Addresses   []string `json:"addresses,omitempty"`
	Connections int      `json:"connections"`
}

// Flow is one row of the timeline.
type Flow struct {
	ID         uint64 `json:"flow_id"`
	Proto      string `json:"proto"`
	Dst        string `json:"dst"`
	Name       string `json:"name,omitempty"`
	StartMs    int64  `json:"start_ms"`
	DurationMs int64  `json:"duration_ms"`
	Verdict    string `json:"verdict"`
	Reason     string `json:"reason,omitempty"`
	BytesUp    int64  `json:"bytes_up"`
	BytesDown  int64  `json:"bytes_down"`
	Error      string `json:"error,omitempty"`
}

// New returns an empty report.
func New() *Report {
	return &Report{Events: map[string]int{}, Violations: map[string]int{}, ProxyFlows: map[string]int{}, Errors: map[string]int{},
		dests: map[string]*Destination{}, names: map[string]*Name{}, flows: map[uint64]int{}, addrNames: map[string]map[string]bool{}}
}

// Add folds one event in.
func (r *Report) Add(ev flowlog.Event) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.Events[ev.Event]++
	if r.FirstMs == 0 || ev.TsMs < r.FirstMs {
		r.FirstMs = ev.TsMs
	}
	r.LastMs = max(r.LastMs, ev.TsMs)
	switch ev.Event {
	case flowlog.DNSQuery:
		r.name(ev.QName).Queries++
	case flowlog.DNSAnswer:
		n := r.name(ev.QName)
		for _, a := range ev.Answers {
			if !slices.Contains(n.Addresses, a) {
				n.Addresses = append(n.Addresses, a)
			}
			if r.addrNames[a] == nil {
				r.addrNames[a] = map[string]bool{}
			}
			r.addrNames[a][ev.QName] = true
		}
		if ev.Error != "" {
			r.Errors["dns: "+ev.Error]++
		}
	case flowlog.ConnectAttempt:
		r.Flows++
		d := r.dest(ev)
		d.Flows++
		for n := range r.addrNames[ev.DstIP] {
			r.name(n).Connections++
		}
		if ev.Verdict == "allow" {
			r.Allowed++
		} else {
			r.Denied++
			d.Denied++
		}
		if len(r.Timeline) < maxFlows && ev.FlowID != 0 {
			name := ""
			if len(ev.Names) > 0 {
				name = ev.Names[0]
			}
			r.flows[ev.FlowID] = len(r.Timeline)
			r.Timeline = append(r.Timeline, Flow{ID: ev.FlowID, Proto: ev.Proto, Dst: ev.Dst, Name: name, StartMs: ev.TsMs, Verdict: ev.Verdict, Reason: ev.ReasonCode})
		}
	case flowlog.ConnectResult:
		if ev.Proxy != "" {
			r.ProxyFlows[ev.Proxy]++
		}
		if ev.OK != nil && !*ev.OK {
			r.Errors[ev.Error]++
			if i, ok := r.flows[ev.FlowID]; ok {
				r.Timeline[i].Error = ev.Error
				r.Timeline[i].DurationMs = ev.TsMs - r.Timeline[i].StartMs
			}
		}
	case flowlog.FlowEnd:
		r.BytesUp += ev.BytesUp
		r.BytesDown += ev.BytesDown
		d := r.dest(ev)
		d.BytesUp += ev.BytesUp
		d.BytesDown += ev.BytesDown
		if i, ok := r.flows[ev.FlowID]; ok {
			f := &r.Timeline[i]
			f.DurationMs, f.BytesUp, f.BytesDown = ev.DurationMs, ev.BytesUp, ev.BytesDown
		}
	case flowlog.PolicyViolation:
		r.Violations[ev.Control]++
		if len(r.Denials) < 100 {
			r.Denials = append(r.Denials, ev)
		}
		if ev.QName != "" {
			r.name(ev.QName).Denied = true
		}
	case flowlog.RuntimeFailure:
		r.Errors[ev.Error]++
	}
}

func (r *Report) name(n string) *Name {
	if r.names[n] == nil {
		r.names[n] = &Name{Name: n}
	}
	return r.names[n]
}

func (r *Report) dest(ev flowlog.Event) *Destination {
	key := ev.Proto + " " + ev.Dst
	d := r.dests[key]
	if d == nil {
		d = &Destination{Dst: ev.Dst, Proto: ev.Proto}
		r.dests[key] = d
	}
	for _, n := range ev.Names {
		if !slices.Contains(d.Names, n) {
			d.Names = append(d.Names, n)
		}
	}
	return d
}

// Finish sorts the tables; call it before rendering.
func (r *Report) Finish() *Report {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.Destinations = r.Destinations[:0]
	for _, d := range r.dests {
		r.Destinations = append(r.Destinations, *d)
	}
	sort.Slice(r.Destinations, func(i, j int) bool {
		a, b := r.Destinations[i], r.Destinations[j]
		if a.Flows != b.Flows {
			return a.Flows > b.Flows
		}
		return a.Proto+a.Dst < b.Proto+b.Dst
	})
	r.Names = r.Names[:0]
	for _, n := range r.names {
		sort.Strings(n.Addresses)
		r.Names = append(r.Names, *n)
	}
	sort.Slice(r.Names, func(i, j int) bool {
		a, b := r.Names[i], r.Names[j]
		if a.Queries != b.Queries {
			return a.Queries > b.Queries
		}
		return a.Name < b.Name
	})
	return r
}

// Read folds a saved JSON Lines flow log into a new report. A line that
// does not parse (a crash mid-write) is counted, not fatal.
func Read(rd io.Reader) (*Report, error) {
	r := New()
	sc := bufio.NewScanner(rd)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	for sc.Scan() {
		if len(sc.Bytes()) == 0 {
			continue
		}
		var ev flowlog.Event
		if err := json.Unmarshal(sc.Bytes(), &ev); err != nil || ev.Event == "" {
			r.DroppedLines++
			continue
		}
		r.Add(ev)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("reading flow log: %w", err)
	}
	return r.Finish(), nil
}
