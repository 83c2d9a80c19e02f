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
