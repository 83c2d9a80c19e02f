package daemon

import (
	"strings"
	"testing"

	"github.com/childflow/childflow/engine/api"
)

func TestMetricsExposition(t *testing.T) {
	list := []api.Status{
		{ID: "pod-1", Labels: map[string]string{"pod_namespace": "ci", "pod_name": "build-7"}, Allowed: 3, Denied: 1, BytesUp: 1000, BytesDown: 12345678901},
		{ID: `odd"id\x` + "\n", Denied: 2},
	}
	var b strings.Builder
	if err := writeMetrics(&b, list); err != nil {
		t.Fatal(err)
	}
	want := `# HELP childflow_sandboxes Sandboxes attached to this daemon.
# TYPE childflow_sandboxes gauge
childflow_sandboxes 2
# HELP childflow_flows_total Flows the sandbox opened, by verdict.
# TYPE childflow_flows_total counter
childflow_flows_total{namespace="ci",pod="build-7",sandbox="pod-1",verdict="allow"} 3
childflow_flows_total{namespace="ci",pod="build-7",sandbox="pod-1",verdict="deny"} 1
childflow_flows_total{namespace="",pod="",sandbox="odd\"id\\x\n",verdict="allow"} 0
childflow_flows_total{namespace="",pod="",sandbox="odd\"id\\x\n",verdict="deny"} 2
# HELP childflow_bytes_total Bytes of ended flows, by direction (up: sent by the sandbox).
# TYPE childflow_bytes_total counter
childflow_bytes_total{namespace="ci",pod="build-7",sandbox="pod-1",direction="up"} 1000
childflow_bytes_total{namespace="ci",pod="build-7",sandbox="pod-1",direction="down"} 12345678901
childflow_bytes_total{namespace="",pod="",sandbox="odd\"id\\x\n",direction="up"} 0
childflow_bytes_total{namespace="",pod="",sandbox="odd\"id\\x\n",direction="down"} 0
`
	if got := b.String(); got != want {
		t.Errorf("exposition:\n%s\nwant:\n%s", got, want)
	}
}
