package hook

import (
	"bytes"
	"context"
	"strings"
	"testing"
)

func TestHook(t *testing.T) {
	for _, tc := range []struct {
		name, stage, state string
		code               int
		stderr             string
	}{
		{"unannotated is untouched", "createRuntime", `{"ociVersion":"1.0.2","id":"c1","status":"creating","pid":1,"bundle":"/nonexistent"}`, 0, ""},
		{"other annotations only", "createRuntime", `{"id":"c1","pid":1,"annotations":{"io.kubernetes.cri.sandbox-id":"x"}}`, 0, ""},
		{"enabled false", "poststop", `{"id":"c1","annotations":{"childflow.dev/enabled":"false"}}`, 0, ""},
		{"bad annotation fails closed", "createRuntime", `{"id":"c1","pid":1,"annotations":{"childflow.dev/deny-cidrs":"nope"}}`, 2, `container c1: invalid annotation childflow.dev/deny-cidrs "nope"`},
		{"bad id", "createRuntime", `{"id":"../../etc","pid":1,"annotations":{"childflow.dev/offline":"true"}}`, 2, "invalid sandbox id"},
		{"no state", "createRuntime", `garbage`, 1, "reading the container state"},
		{"unknown stage", "prestop", `{"id":"c1","annotations":{"childflow.dev/offline":"true"}}`, 2, `unknown hook stage "prestop"`},
		{"unknown stage, unannotated", "createruntime", `{"id":"c1","pid":1}`, 2, `unknown hook stage "createruntime"`},
		{"a stage with nothing to do", "poststart", `{"id":"c1","annotations":{"childflow.dev/offline":"true"}}`, 0, ""},
	} {
		var stderr bytes.Buffer
		code := Run(context.Background(), []string{"childflow-hook", "--socket", "/nonexistent.sock", tc.stage}, strings.NewReader(tc.state), &stderr)
		if code != tc.code || !strings.Contains(stderr.String(), tc.stderr) {
			t.Errorf("%s: exit %d, stderr %q; want %d and %q", tc.name, code, stderr.String(), tc.code, tc.stderr)
		}
	}
}
