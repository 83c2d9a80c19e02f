package daemon

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

var (
	descSandboxes = prometheus.NewDesc("childflow_sandboxes", "Sandboxes attached to this daemon.", nil, nil)
	// namespace and pod are set for pods (CNI), empty for containers.
	descFlows = prometheus.NewDesc("childflow_flows_total", "Flows the sandbox opened, by verdict.", []string{"sandbox", "namespace", "pod", "verdict"}, nil)
	descBytes = prometheus.NewDesc("childflow_bytes_total", "Bytes of ended flows, by direction (up: sent by the sandbox).", []string{"sandbox", "namespace", "pod", "direction"}, nil)
)

// collector reads the sandboxes' counters at scrape time, so a detached
// sandbox's series disappear with it.
type collector struct{ d *Daemon }

func (c collector) Describe(ch chan<- *prometheus.Desc) {
	ch <- descSandboxes
	ch <- descFlows
	ch <- descBytes
}

func (c collector) Collect(ch chan<- prometheus.Metric) {
	list := c.d.list("")
	ch <- prometheus.MustNewConstMetric(descSandboxes, prometheus.GaugeValue, float64(len(list)))
	for _, s := range list {
		ns, pod := s.Labels["pod_namespace"], s.Labels["pod_name"]
		ch <- prometheus.MustNewConstMetric(descFlows, prometheus.CounterValue, float64(s.Allowed), s.ID, ns, pod, "allow")
		ch <- prometheus.MustNewConstMetric(descFlows, prometheus.CounterValue, float64(s.Denied), s.ID, ns, pod, "deny")
		ch <- prometheus.MustNewConstMetric(descBytes, prometheus.CounterValue, float64(s.BytesUp), s.ID, ns, pod, "up")
		ch <- prometheus.MustNewConstMetric(descBytes, prometheus.CounterValue, float64(s.BytesDown), s.ID, ns, pod, "down")
	}
}

// serveMetrics serves /metrics on addr until the returned stop is called.
func (d *Daemon) serveMetrics(addr string) (stop func(), err error) {
	reg := prometheus.NewRegistry()
	reg.MustRegister(collector{d})
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
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
