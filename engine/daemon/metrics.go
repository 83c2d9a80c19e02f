package daemon

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strings"
	"time"

	"github.com/childflow/childflow/engine/api"
)

// The Prometheus text format (version 0.0.4), written here rather than
// with the client library: the daemon shares its binary with `childflow
// exec`, and that library's package initialisation alone added ~1 ms to
// the start of every sandboxed command (docs/benchmarks.md). Three
// families, read from the sandboxes' counters at scrape time, so a
// detached sandbox's series disappear with it.
const metricsContentType = "text/plain; version=0.0.4; charset=utf-8"

// writeMetrics writes the families for the sandboxes in list: per
// sandbox, namespace, pod and sandbox, then the family's own label.
func writeMetrics(w io.Writer, list []api.Status) error {
	b := bufio.NewWriter(w)
	family(b, "childflow_sandboxes", "gauge", "Sandboxes attached to this daemon.")
	fmt.Fprintf(b, "childflow_sandboxes %d\n", len(list))
	// namespace and pod are set for pods (CNI), empty for containers.
	family(b, "childflow_flows_total", "counter", "Flows the sandbox opened, by verdict.")
	for _, s := range list {
		sample(b, "childflow_flows_total", s, "verdict", "allow", s.Allowed)
		sample(b, "childflow_flows_total", s, "verdict", "deny", s.Denied)
	}
	family(b, "childflow_bytes_total", "counter", "Bytes of ended flows, by direction (up: sent by the sandbox).")
	for _, s := range list {
		sample(b, "childflow_bytes_total", s, "direction", "up", s.BytesUp)
		sample(b, "childflow_bytes_total", s, "direction", "down", s.BytesDown)
	}
	return b.Flush()
}

func family(b *bufio.Writer, name, kind, help string) {
	fmt.Fprintf(b, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, kind)
}

func sample(b *bufio.Writer, name string, s api.Status, key, value string, n uint64) {
	fmt.Fprintf(b, "%s{namespace=%s,pod=%s,sandbox=%s,%s=%s} %d\n", name,
		labelValue(s.Labels["pod_namespace"]), labelValue(s.Labels["pod_name"]), labelValue(s.ID), key, labelValue(value), n)
}

var labelEscaper = strings.NewReplacer(`\`, `\\`, `"`, `\"`, "\n", `\n`)

func labelValue(v string) string { return `"` + labelEscaper.Replace(v) + `"` }

// serveMetrics serves /metrics on addr until the returned stop is called.
func (d *Daemon) serveMetrics(addr string) (stop func(), err error) {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /metrics", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", metricsContentType)
		if err := writeMetrics(w, d.list("")); err != nil {
			d.cfg.Logf("metrics: %v", err)
		}
	})
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("metrics listen on %s: %w", addr, err)
	}
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			d.cfg.Logf("metrics: %v", err)
		}
	}()
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
	}, nil
}
