//go:build e2e

package e2e

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestHTMLReportInChromium renders --report-format html of a saved flow
// log in headless Chromium: a screenshot, the DOM, and no console errors
// (the page's Content-Security-Policy forbids every fetch and script, and
// a violation would be logged there).
func TestHTMLReportInChromium(t *testing.T) {
	requireRoot(t)
	dir := logDir(t)
	page := filepath.Join(dir, "report.html")
	flows, _ := filepath.Abs("../testdata/report/flows.jsonl")
	r := run(t, root, "--report", flows, "--report-format", "html")
	if r.code != 0 {
		t.Fatal(r)
	}
	os.WriteFile(page, []byte(r.stdout), 0o644)

	chromium := func(args ...string) (stdout, log string) {
		ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
		defer cancel()
		base := []string{"--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
			"--disable-background-networking", "--disable-component-update", "--disable-sync",
			"--user-data-dir=" + t.TempDir(), "--enable-logging=stderr", "--v=0", "--window-size=1200,900"}
		cmd := exec.CommandContext(ctx, "chromium", append(base, append(args, "file://"+page)...)...)
		var out, errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errb
		if err := cmd.Run(); err != nil {
			t.Fatalf("chromium %v: %v\n%s", args, err, errb.String())
		}
		return out.String(), errb.String()
	}
	shot := filepath.Join(dir, "report.png")
	_, log := chromium("--screenshot=" + shot)
	dom, log2 := chromium("--dump-dom")
	for _, l := range strings.Split(log+log2, "\n") {
		if strings.Contains(l, ":CONSOLE") || strings.Contains(l, "Refused to") {
			t.Errorf("page console: %s", l)
		}
	}
	png, err := os.ReadFile(shot)
	if err != nil || len(png) < 10000 || !bytes.HasPrefix(png, []byte("\x89PNG")) {
		t.Fatalf("screenshot: %v, %d bytes", err, len(png))
	}
	for _, want := range []string{`id="timeline"`, `id="destinations"`, "203.0.113.20:80", "deny_cidrs", "web.test"} {
		if !strings.Contains(dom, want) {
			t.Errorf("rendered DOM lacks %q", want)
		}
	}
	t.Logf("screenshot %s (%d bytes)", shot, len(png))
}
