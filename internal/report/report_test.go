package report

import (
	"bytes"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite the golden files")

const testdata = "../../test/testdata/report"

// TestGolden renders a saved flow log (a real run's, with timestamps made
// fixed and a last line cut short as a crash leaves it) in every format.
func TestGolden(t *testing.T) {
	f, err := os.Open(filepath.Join(testdata, "flows.jsonl"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	r, err := Read(f)
	if err != nil {
		t.Fatal(err)
	}
	if r.DroppedLines != 1 {
		t.Fatalf("%d unreadable lines, want the 1 cut short", r.DroppedLines)
	}
	for _, format := range Formats {
		var b bytes.Buffer
		if err := r.Render(&b, format); err != nil {
			t.Fatal(err)
		}
		golden := filepath.Join(testdata, "report."+format)
		if *update {
			os.WriteFile(golden, b.Bytes(), 0o644)
			continue
		}
		want, err := os.ReadFile(golden)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(b.Bytes(), want) {
			t.Errorf("%s rendering differs from %s (go test ./internal/report -update to accept):\n%s", format, golden, b.String())
		}
	}
}

func TestCountsAndCorrelation(t *testing.T) {
	f, _ := os.Open(filepath.Join(testdata, "flows.jsonl"))
	defer f.Close()
	r, _ := Read(f)
	if r.Flows != 4 || r.Allowed != 3 || r.Denied != 1 || r.Events["policy_violation"] != 3 {
		t.Fatalf("totals %+v", r)
	}
	if r.Violations["deny_domains"] != 2 || r.Violations["deny_cidrs"] != 1 {
		t.Fatalf("violations by control %v", r.Violations)
	}
	var web *Name
	for i := range r.Names {
		if r.Names[i].Name == "web.test" {
			web = &r.Names[i]
		}
	}
	if web == nil || web.Connections != 3 || strings.Join(web.Addresses, ",") != "2001:db8::10,203.0.113.10" {
		t.Fatalf("DNS-to-connection correlation for web.test: %+v", web)
	}
	var html bytes.Buffer
	r.Render(&html, "html")
	for _, forbidden := range []string{"<script", "http://", "https://", "src="} {
		if strings.Contains(html.String(), forbidden) {
			t.Errorf("html report is not self-contained: contains %q", forbidden)
		}
	}
}

// A name the sandbox asked for cannot add columns to a markdown row nor
// put control characters on a terminal: "evil.test|1|203.0.113.99|0|no"
// made its row read as not denied, with an answer it never had.
func TestNamesCannotForgeCells(t *testing.T) {
	const name = `evil.test|1|203.0.113.99|0|no\u001b[2J\u009b2J\u202etset.live`
	log := `{"schema_version":1,"ts_ms":1,"event":"dns_query","proto":"dns","qname":"` + name + `","qtype":"A"}
{"schema_version":1,"ts_ms":2,"event":"policy_violation","proto":"dns","qname":"` + name + `","qtype":"A","verdict":"deny","reason_code":"deny_domain","control":"domain"}
`
	r, err := Read(strings.NewReader(log))
	if err != nil {
		t.Fatal(err)
	}
	for _, format := range []string{"markdown", "text"} {
		var b bytes.Buffer
		if err := r.Render(&b, format); err != nil {
			t.Fatal(err)
		}
		if strings.ContainsAny(b.String(), "\x1b\u009b\u202e") {
			t.Errorf("%s: a control character reached the output", format)
		}
		for _, line := range strings.Split(b.String(), "\n") {
			if !strings.Contains(line, "evil.test") {
				continue
			}
			if format == "markdown" {
				cells := strings.Split(strings.ReplaceAll(line, `\|`, ""), "|")
				if len(cells) != 7 || strings.TrimSpace(cells[5]) != "yes" {
					t.Errorf("markdown row %q: %d cells, want the 5 columns with denied yes", line, len(cells)-2)
				}
			}
		}
	}
}
