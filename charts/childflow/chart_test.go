// Package chart tests the Helm chart: helm lint, and every rendered
// manifest decoded strictly into the Kubernetes API's own types, so a
// misspelt or misplaced field fails here rather than on a cluster.
package chart

import (
	"bytes"
	"os"
	"os/exec"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	nodev1 "k8s.io/api/node/v1"
	"sigs.k8s.io/yaml"
)

func helm(t *testing.T, args ...string) string {
	t.Helper()
	if _, err := exec.LookPath("helm"); err != nil {
		// hack/install-deps.sh, run as root, builds helm: as root (CI)
		// a missing helm is a failure; a normal user may not have run it.
		if os.Geteuid() != 0 {
			t.Skip("needs root's hack/install-deps.sh for helm")
		}
		t.Fatal("helm is not installed (hack/install-deps.sh builds it)")
	}
	var out, errb bytes.Buffer
	cmd := exec.Command("helm", args...)
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		t.Fatalf("helm %v: %v\n%s%s", args, err, out.String(), errb.String())
	}
	return out.String()
}

func TestLint(t *testing.T) {
	helm(t, "lint", "--strict", ".")
}

// render returns the manifests by kind.
func render(t *testing.T, set ...string) map[string][]byte {
	t.Helper()
	args := []string{"template", "cf", ".", "--namespace", "kube-system"}
	for _, s := range set {
		args = append(args, "--set", s)
	}
	out := map[string][]byte{}
	for _, doc := range strings.Split(helm(t, args...), "\n---") {
		var meta struct{ Kind string }
		if err := yaml.Unmarshal([]byte(doc), &meta); err != nil {
			t.Fatalf("rendered YAML: %v\n%s", err, doc)
		}
		if meta.Kind != "" {
			out[meta.Kind] = []byte(doc)
		}
	}
	return out
}

func strict(t *testing.T, doc []byte, into any) {
	t.Helper()
	if err := yaml.UnmarshalStrict(doc, into); err != nil {
		t.Fatalf("%v\n%s", err, doc)
	}
}

func TestRenderedManifestsAreValid(t *testing.T) {
	for _, tc := range []struct {
		name string
		set  []string
		want func(t *testing.T, ds *appsv1.DaemonSet, docs map[string][]byte)
	}{
		{"defaults", nil, func(t *testing.T, ds *appsv1.DaemonSet, docs map[string][]byte) {
			spec := ds.Spec.Template.Spec
			if !spec.HostNetwork || !spec.HostPID || len(spec.InitContainers) != 1 {
				t.Errorf("pod spec: hostNetwork %v hostPID %v init %d", spec.HostNetwork, spec.HostPID, len(spec.InitContainers))
			}
			if args := strings.Join(spec.InitContainers[0].Command, " "); !strings.Contains(args, "--cluster-cidrs=10.244.0.0/16,10.96.0.0/12") {
				t.Errorf("install-cni: %s", args)
			}
			if spec.Containers[0].Lifecycle != nil {
				t.Error("the plugin is unchained on stop by default (fail open)")
			}
			if _, ok := docs["RuntimeClass"]; ok {
				t.Error("RuntimeClass rendered by default")
			}
		}},
		{"everything on", []string{"metrics.enabled=true", "daemon.flowLogStdout=true", "runtimeClass.enabled=true",
			"cni.allThroughEngine=true", "cni.uninstallOnStop=true", "daemon.dns={10.96.0.10}"},
			func(t *testing.T, ds *appsv1.DaemonSet, docs map[string][]byte) {
				c := ds.Spec.Template.Spec.Containers[0]
				args := strings.Join(c.Command, " ")
				for _, want := range []string{"--metrics-addr=:9187", "--flow-log-stdout", "--dns=10.96.0.10"} {
					if !strings.Contains(args, want) {
						t.Errorf("daemon args lack %s: %s", want, args)
					}
				}
				if c.Lifecycle == nil || c.Lifecycle.PreStop == nil || len(c.Ports) != 1 {
					t.Error("preStop or metrics port missing")
				}
				var rc nodev1.RuntimeClass
				strict(t, docs["RuntimeClass"], &rc)
				if rc.Handler != "childflow" {
					t.Errorf("RuntimeClass handler %q", rc.Handler)
				}
			}},
		{"no cni", []string{"cni.enabled=false"}, func(t *testing.T, ds *appsv1.DaemonSet, docs map[string][]byte) {
			if len(ds.Spec.Template.Spec.InitContainers) != 0 {
				t.Error("install-cni rendered with cni.enabled=false")
			}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			docs := render(t, tc.set...)
			var ds appsv1.DaemonSet
			strict(t, docs["DaemonSet"], &ds)
			var sa corev1.ServiceAccount
			strict(t, docs["ServiceAccount"], &sa)
			if ds.Spec.Template.Spec.ServiceAccountName != sa.Name || ds.Namespace != "kube-system" {
				t.Errorf("service account %q vs %q, namespace %q", ds.Spec.Template.Spec.ServiceAccountName, sa.Name, ds.Namespace)
			}
			sel := ds.Spec.Selector.MatchLabels
			for k, v := range sel {
				if ds.Spec.Template.Labels[k] != v {
					t.Errorf("selector %s=%s does not match the pod template", k, v)
				}
			}
			tc.want(t, &ds, docs)
		})
	}
}

func TestPlainManifestsMatchTheChart(t *testing.T) {
	want := helm(t, "template", "childflow", ".", "--namespace", "kube-system")
	got, err := os.ReadFile("../../deploy/kubernetes/childflow.yaml")
	if err != nil || string(got) != want {
		t.Fatalf("deploy/kubernetes/childflow.yaml is not the chart's rendering (run make manifests): %v", err)
	}
}
