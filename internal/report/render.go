package report

import (
	"encoding/json"
	"fmt"
	"html/template"
	"io"
	"sort"
	"strings"
	"sync"
	"text/tabwriter"
	"unicode"
)

// Formats lists the renderings; summary accepts text and json.
var Formats = []string{"text", "markdown", "json", "html"}

// Render writes r in format.
func (r *Report) Render(w io.Writer, format string) error {
	switch format {
	case "json":
		enc := json.NewEncoder(w)
		enc.SetIndent("", "  ")
		return enc.Encode(r)
	case "markdown":
		return r.table(w, true)
	case "text":
		return r.table(w, false)
	case "html":
		return htmlPage().Execute(w, r)
	}
	return fmt.Errorf("unknown format %q", format)
}

func sortedKeys(m map[string]int) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool {
		if m[keys[i]] != m[keys[j]] {
			return m[keys[i]] > m[keys[j]]
		}
		return keys[i] < keys[j]
	})
	return keys
}

// table renders text or markdown: the same sections, different markup.
func (r *Report) table(w io.Writer, md bool) error {
	var b strings.Builder
	head := func(s string) {
		if md {
			fmt.Fprintf(&b, "\n## %s\n\n", s)
		} else {
			fmt.Fprintf(&b, "\n%s\n", s)
		}
	}
	row := func(cells ...any) {
		s := make([]string, len(cells))
		for i, c := range cells {
			s[i] = cell(fmt.Sprint(c), md)
		}
		if md {
			fmt.Fprintf(&b, "| %s |\n", strings.Join(s, " | "))
		} else {
			fmt.Fprintf(&b, "  %s\n", strings.Join(s, "\t"))
		}
	}
	cols := func(cells ...any) {
		row(cells...)
		if md {
			rule := make([]any, len(cells))
			for i := range rule {
				rule[i] = "---"
			}
			row(rule...)
		}
	}
	if md {
		b.WriteString("# childflow report\n")
	} else {
		b.WriteString("childflow report\n")
	}
	head("Totals")
	cols("flows", "allowed", "denied", "bytes up", "bytes down")
	row(r.Flows, r.Allowed, r.Denied, r.BytesUp, r.BytesDown)
	head("Events")
	cols("event", "count")
	for _, k := range sortedKeys(r.Events) {
		row(k, r.Events[k])
	}
	if len(r.Destinations) > 0 {
		head("Top destinations")
		cols("proto", "destination", "names", "flows", "denied", "bytes up", "bytes down")
		for i, d := range r.Destinations {
			if i == 20 {
				break
			}
			row(d.Proto, d.Dst, orDash(strings.Join(d.Names, ",")), d.Flows, d.Denied, d.BytesUp, d.BytesDown)
		}
	}
	if len(r.Names) > 0 {
		head("DNS names and the connections made to their addresses")
		cols("name", "queries", "answers", "connections", "denied")
		for i, n := range r.Names {
			if i == 20 {
				break
			}
			row(n.Name, n.Queries, orDash(strings.Join(n.Addresses, ",")), n.Connections, yes(n.Denied))
		}
	}
	if len(r.Violations) > 0 {
		head("Policy violations by control")
		cols("control", "count")
		for _, k := range sortedKeys(r.Violations) {
			row(k, r.Violations[k])
		}
	}
	if len(r.ProxyFlows) > 0 {
		head("Proxy use")
		cols("proxy", "flows")
		for _, k := range sortedKeys(r.ProxyFlows) {
			row(k, r.ProxyFlows[k])
		}
	}
	if len(r.Errors) > 0 {
		head("Errors")
		cols("error", "count")
		for _, k := range sortedKeys(r.Errors) {
			row(k, r.Errors[k])
		}
	}
	if r.DroppedLines > 0 {
		fmt.Fprintf(&b, "\n%d line(s) of the flow log could not be read\n", r.DroppedLines)
	}
	if md {
		_, err := io.WriteString(w, b.String())
		return err
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	io.WriteString(tw, b.String())
	return tw.Flush()
}

// cell makes a value safe in a table: the sandbox chooses what it asks
// the resolver, and a name such as "evil.test|1|203.0.113.99|0|no" made
// its markdown row show other columns' values (that row's name not
// denied, say). Markdown's table, code and HTML characters are escaped,
// and control characters, which no field should hold, are shown as \xNN
// in text and markdown alike rather than sent to a terminal: C1's too
// (U+009B is a terminal's CSI), and the bidirectional overrides, which
// make a name read backwards.
func cell(s string, md bool) string {
	var b strings.Builder
	for _, r := range s {
		switch {
		case r < 0x100 && unicode.IsControl(r):
			fmt.Fprintf(&b, "\\x%02x", r)
		case unicode.Is(unicode.Bidi_Control, r):
			fmt.Fprintf(&b, "\\u%04x", r)
		case md && strings.ContainsRune("\\|<>`", r):
			b.WriteByte('\\')
			b.WriteRune(r)
		default:
			b.WriteRune(r)
		}
	}
	return b.String()
}

func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}

func yes(b bool) string {
	if b {
		return "yes"
	}
	return "-"
}

// The page is self-contained: no scripts, fonts or images from anywhere.
// Parsed on first use, not at every childflow start.
var htmlPage = sync.OnceValue(func() *template.Template {
	return template.Must(template.New("report").Funcs(template.FuncMap{
		"pct": func(r *Report, ms int64) float64 {
			span := r.LastMs - r.FirstMs
			if span <= 0 {
				return 0
			}
			return float64(ms) * 100 / float64(span)
		},
		"width": func(r *Report, f Flow) float64 {
			span := r.LastMs - r.FirstMs
			if span <= 0 {
				return 100
			}
			return max(0.3, float64(f.DurationMs)*100/float64(span))
		},
		"sub": func(a, b int64) int64 { return a - b },
	}).Parse(`<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>childflow report</title>
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<style>
body{font:14px system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:0 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f3f3f3}.deny{color:#b00020}.allow{color:#1b5e20}
.tl{display:flex;height:18px;border-bottom:1px solid #eee;align-items:center}
.tl label{flex:0 0 22em;font-size:11px;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
.tl .track{position:relative;flex:1;height:100%}.tl span.bar{position:absolute;height:12px;top:3px;min-width:2px}
.tl .allow{background:#4caf50}.tl .deny{background:#e53935}
.cards div{display:inline-block;margin:0 1.5em 1em 0}.cards b{font-size:1.6em;display:block}
</style></head><body>
<h1>childflow report</h1>
<div class="cards">
<div><b>{{.Flows}}</b>flows</div><div><b class="allow">{{.Allowed}}</b>allowed</div><div><b class="deny">{{.Denied}}</b>denied</div>
<div><b>{{.BytesUp}}</b>bytes up</div><div><b>{{.BytesDown}}</b>bytes down</div>
</div>
<h2>Timeline</h2>
<div id="timeline">{{$r := .}}{{range .Timeline}}
<div class="tl" title="flow {{.ID}} {{.Proto}} {{.Dst}} {{.Name}} {{.Verdict}} {{.Reason}} {{.DurationMs}} ms {{.Error}}"><label>{{.Proto}} {{.Dst}} {{.Name}}</label><div class="track"><span class="bar {{.Verdict}}" style="left:{{pct $r (sub .StartMs $r.FirstMs)}}%;width:{{width $r .}}%"></span></div></div>{{end}}
</div>
<h2>Destinations</h2>
<table id="destinations"><tr><th>proto</th><th>destination</th><th>names</th><th>flows</th><th>denied</th><th>bytes up</th><th>bytes down</th></tr>
{{range .Destinations}}<tr><td>{{.Proto}}</td><td>{{.Dst}}</td><td>{{range .Names}}{{.}} {{end}}</td><td>{{.Flows}}</td><td class="{{if .Denied}}deny{{end}}">{{.Denied}}</td><td>{{.BytesUp}}</td><td>{{.BytesDown}}</td></tr>
{{end}}</table>
<h2>DNS names</h2>
<table id="names"><tr><th>name</th><th>queries</th><th>answers</th><th>connections</th><th>denied</th></tr>
{{range .Names}}<tr><td>{{.Name}}</td><td>{{.Queries}}</td><td>{{range .Addresses}}{{.}} {{end}}</td><td>{{.Connections}}</td><td class="{{if .Denied}}deny{{end}}">{{if .Denied}}yes{{end}}</td></tr>
{{end}}</table>
<h2>Policy violations</h2>
<table id="violations"><tr><th>time (ms)</th><th>proto</th><th>destination / name</th><th>reason</th><th>control</th><th>matched</th></tr>
{{range .Denials}}<tr class="deny"><td>{{sub .TsMs $r.FirstMs}}</td><td>{{.Proto}}</td><td>{{.Dst}}{{.QName}}</td><td>{{.ReasonCode}}</td><td>{{.Control}}</td><td>{{.MatchedCIDR}}{{.MatchedDomain}}</td></tr>
{{end}}</table>
{{if .ProxyFlows}}<h2>Proxy use</h2><table><tr><th>proxy</th><th>flows</th></tr>{{range $k, $v := .ProxyFlows}}<tr><td>{{$k}}</td><td>{{$v}}</td></tr>{{end}}</table>{{end}}
{{if .Errors}}<h2>Errors</h2><table><tr><th>error</th><th>count</th></tr>{{range $k, $v := .Errors}}<tr><td>{{$k}}</td><td>{{$v}}</td></tr>{{end}}</table>{{end}}
</body></html>
`))
})
