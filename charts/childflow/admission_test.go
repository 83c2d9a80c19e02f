package chart

import (
	"errors"
	"io"
	"strings"
	"testing"

	admissionv1 "k8s.io/api/admissionregistration/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	nodev1 "k8s.io/api/node/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apiserver/pkg/admission"
	"k8s.io/apiserver/pkg/admission/plugin/cel"
	"k8s.io/apiserver/pkg/admission/plugin/policy/generic"
	"k8s.io/apiserver/pkg/admission/plugin/policy/matching"
	"k8s.io/apiserver/pkg/admission/plugin/policy/validating"
	"k8s.io/apiserver/pkg/authorization/authorizer"
	"k8s.io/apiserver/pkg/cel/environment"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/klog/v2"
)

// admitter runs the chart's ValidatingAdmissionPolicy and binding, as
// rendered with set, through the API server's own admission plugin (its
// CEL environment, matching and binding), and returns what creates (old
// nil) and updates pods as a cluster would see them.
func admitter(t *testing.T, set ...string) func(old, new *corev1.Pod) error {
	t.Helper()
	klog.SetOutput(io.Discard) // the informers' chatter
	klog.LogToStderr(false)
	docs := render(t, set...)
	var policy admissionv1.ValidatingAdmissionPolicy
	var binding admissionv1.ValidatingAdmissionPolicyBinding
	strict(t, docs["ValidatingAdmissionPolicy"], &policy)
	strict(t, docs["ValidatingAdmissionPolicyBinding"], &binding)

	api, cancel, err := generic.NewPolicyTestContext(t,
		validating.NewValidatingAdmissionPolicyAccessor,
		validating.NewValidatingAdmissionPolicyBindingAccessor,
		compilePolicy,
		func(a authorizer.UnconditionalAuthorizer, m *matching.Matcher, _ kubernetes.Interface) generic.Dispatcher[validating.PolicyHook] {
			return validating.NewDispatcher(a, generic.NewPolicyMatcher(m))
		},
		[]runtime.Object{namespace("default"), namespace("kube-system")},
		[]meta.RESTMapping{
			{Resource: v1.WithResource("pods"), GroupVersionKind: v1.WithKind("Pod"), Scope: meta.RESTScopeNamespace},
			{Resource: v1.WithResource("namespaces"), GroupVersionKind: v1.WithKind("Namespace"), Scope: meta.RESTScopeRoot},
		})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cancel)
	if err := api.Start(); err != nil {
		t.Fatal(err)
	}
	// The test context serves them under kinds of its own, known by type.
	policy.TypeMeta, binding.TypeMeta = metav1.TypeMeta{}, metav1.TypeMeta{}
	if err := api.UpdateAndWait(&policy, &binding); err != nil {
		t.Fatal(err)
	}
	return func(old, new *corev1.Pod) error {
		op, prev := admission.Create, runtime.Object(nil)
		if old != nil {
			op, prev = admission.Update, old
		}
		// As the API server has it (the test context's Dispatch swaps
		// the pod's name and namespace).
		attrs := admission.NewAttributesRecord(new, prev, v1.WithKind("Pod"), new.Namespace, new.Name,
			v1.WithResource("pods"), "", op, nil, false, nil)
		return api.Plugin.Dispatch(api, attrs, admission.NewObjectInterfacesFromScheme(scheme.Scheme))
	}
}

// pod is a pod in the default namespace with ann as key, value pairs
// beside an annotation of the team's.
func pod(hostNetwork bool, ann ...string) *corev1.Pod {
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "agent", Namespace: "default", Annotations: map[string]string{"team": "ml"}},
		Spec:       corev1.PodSpec{HostNetwork: hostNetwork, Containers: []corev1.Container{{Name: "agent", Image: "agent:1"}}},
	}
	for i := 0; i+1 < len(ann); i += 2 {
		p.Annotations[ann[i]] = ann[i+1]
	}
	return p
}

// refusedAs checks err against want, what a refusal says ("": admitted).
func refusedAs(t *testing.T, err error, want string) {
	t.Helper()
	switch {
	case want == "" && err != nil:
		t.Errorf("refused: %v", err)
	case want != "" && err == nil:
		t.Error("admitted")
	case want != "" && !strings.Contains(err.Error(), want):
		t.Errorf("refused for another reason: %v", err)
	}
}

// TestAdmissionPolicyRefusesPodsCNINeverSandboxes: pods in the node's
// network, and changes to a pod's childflow annotations.
func TestAdmissionPolicyRefusesPodsCNINeverSandboxes(t *testing.T) {
	docs := render(t)
	admit := admitter(t)
	var ds appsv1.DaemonSet
	strict(t, docs["DaemonSet"], &ds)
	daemon := &corev1.Pod{ObjectMeta: ds.Spec.Template.ObjectMeta, Spec: ds.Spec.Template.Spec}
	daemon.Name, daemon.Namespace = "childflow-x7k2p", "kube-system"

	bare := func(hostNetwork bool) *corev1.Pod { p := pod(hostNetwork); p.Annotations = nil; return p }
	const hostNetwork, changed = "cannot use hostNetwork", "cannot change once it is created"
	for _, tc := range []struct {
		name     string
		old, new *corev1.Pod
		refused  string // what the refusal says; "" for admitted
	}{
		{"annotated in the pod network", nil, pod(false, "childflow.dev/default-policy", "deny"), ""},
		{"annotated in the node's network", nil, pod(true, "childflow.dev/default-policy", "deny"), hostNetwork},
		{"enabled in the node's network", nil, pod(true, "childflow.dev/enabled", "true"), hostNetwork},
		{"a slip of the prefix in the node's network", nil, pod(true, "Childflow.dev/offline", "true"), hostNetwork},
		{"a malformed enabled in the node's network", nil, pod(true, "childflow.dev/enabled", "no"), hostNetwork},
		{"explicitly not sandboxed in the node's network", nil, pod(true, "childflow.dev/enabled", " false "), ""},
		{"unannotated in the node's network", nil, pod(true), ""},
		{"without annotations in the node's network", nil, bare(true), ""},
		{"annotations added to a pod without any", bare(false), pod(false, "childflow.dev/enabled", "true"), changed},
		{"the chart's own daemon", nil, daemon, ""},
		{"a policy changed", pod(false, "childflow.dev/default-policy", "deny"), pod(false, "childflow.dev/default-policy", "allow"), changed},
		{"a policy added", pod(false), pod(false, "childflow.dev/offline", "true"), changed},
		{"a sandbox turned off", pod(false, "childflow.dev/enabled", "true"), pod(false, "childflow.dev/enabled", "false"), changed},
		{"a policy removed", pod(false, "childflow.dev/allow-domains", "example.com", "childflow.dev/default-policy", "deny"),
			pod(false, "childflow.dev/default-policy", "deny"), changed},
		{"a policy's keys swapped with their values", pod(false, "childflow.dev/offline", "true", "childflow.dev/block-private", "false"),
			pod(false, "childflow.dev/offline", "false", "childflow.dev/block-private", "true"), changed},
		{"other annotations changed", pod(false, "childflow.dev/default-policy", "deny"),
			pod(false, "childflow.dev/default-policy", "deny", "team", "infra"), ""},
		{"an unannotated pod changed", pod(false), pod(false, "team", "infra"), ""},
	} {
		t.Run(tc.name, func(t *testing.T) { refusedAs(t, admit(tc.old, tc.new), tc.refused) })
	}

	if _, ok := render(t, "admissionPolicy.enabled=false")["ValidatingAdmissionPolicy"]; ok {
		t.Error("admissionPolicy.enabled=false rendered the policy")
	}
}

// TestAdmissionPolicyCanRequireTheRuntimeClass: with
// admissionPolicy.requireRuntimeClass, an annotated pod is created under
// childflow's RuntimeClass or not at all; pods made before keep their
// updates.
func TestAdmissionPolicyCanRequireTheRuntimeClass(t *testing.T) {
	admit := admitter(t, "admissionPolicy.requireRuntimeClass=true", "runtimeClass.name=sandboxed")
	under := func(class string, p *corev1.Pod) *corev1.Pod {
		if class != "" {
			p.Spec.RuntimeClassName = &class
		}
		return p
	}
	const required = "must set runtimeClassName: sandboxed"
	for _, tc := range []struct {
		name     string
		old, new *corev1.Pod
		refused  string
	}{
		{"annotated under the RuntimeClass", nil, under("sandboxed", pod(false, "childflow.dev/default-policy", "deny")), ""},
		{"annotated without a RuntimeClass", nil, pod(false, "childflow.dev/default-policy", "deny"), required},
		{"annotated under another RuntimeClass", nil, under("gvisor", pod(false, "childflow.dev/offline", "true")), required},
		{"a slip of the prefix without it", nil, pod(false, "childflow.io/offline", "true"), required},
		{"explicitly not sandboxed", nil, pod(false, "childflow.dev/enabled", "false"), ""},
		{"unannotated", nil, pod(false), ""},
		{"annotated and hostNetwork under it", nil, under("sandboxed", pod(true, "childflow.dev/offline", "true")), "cannot use hostNetwork"},
		{"an annotated pod from before updated", pod(false, "childflow.dev/offline", "true"),
			pod(false, "childflow.dev/offline", "true", "team", "infra"), ""},
	} {
		t.Run(tc.name, func(t *testing.T) { refusedAs(t, admit(tc.old, tc.new), tc.refused) })
	}

	var rc nodev1.RuntimeClass
	strict(t, render(t, "runtimeClass.enabled=true", "runtimeClass.nodeSelector.childflow\\.dev/handler=true")["RuntimeClass"], &rc)
	if rc.Scheduling == nil || rc.Scheduling.NodeSelector["childflow.dev/handler"] != "true" {
		t.Errorf("the RuntimeClass's scheduling: %+v", rc.Scheduling)
	}
	if _, ok := render(t, "runtimeClass.enabled=true")["RuntimeClass"]; !ok {
		t.Error("runtimeClass.enabled=true rendered no RuntimeClass")
	}
}

var v1 = corev1.SchemeGroupVersion

func namespace(name string) *corev1.Namespace {
	return &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}
}

// compilePolicy compiles a policy as the plugin does (validating's own
// compilePolicy, which is not exported): the base environment of this
// API server version. Match conditions are not compiled: the chart has none.
func compilePolicy(p *validating.Policy) validating.Validator {
	if len(p.Spec.MatchConditions) > 0 {
		return validating.NewValidator(nil, nil, nil, nil, p.Spec.FailurePolicy, errors.New("match conditions: compilePolicy does not compile them"))
	}
	vars := cel.OptionalVariableDeclarations{HasAuthorizer: true}
	compiler, err := cel.NewCompositedCompiler(environment.MustBaseEnvSet(environment.DefaultCompatibilityVersion()))
	if err != nil {
		return validating.NewValidator(nil, nil, nil, nil, p.Spec.FailurePolicy, err)
	}
	named := make([]cel.NamedExpressionAccessor, len(p.Spec.Variables))
	for i, v := range p.Spec.Variables {
		named[i] = &validating.Variable{Name: v.Name, Expression: v.Expression}
	}
	compiler.CompileAndStoreVariables(named, vars, environment.StoredExpressions)
	checks := make([]cel.ExpressionAccessor, len(p.Spec.Validations))
	messages := make([]cel.ExpressionAccessor, len(p.Spec.Validations))
	for i, v := range p.Spec.Validations {
		checks[i] = &validating.ValidationCondition{Expression: v.Expression, Message: v.Message, Reason: v.Reason}
		if v.MessageExpression != "" {
			messages[i] = &validating.MessageExpressionCondition{MessageExpression: v.MessageExpression}
		}
	}
	return validating.NewValidator(
		compiler.CompileCondition(checks, vars, environment.StoredExpressions),
		nil,
		compiler.CompileCondition(nil, vars, environment.StoredExpressions),
		compiler.CompileCondition(messages, cel.OptionalVariableDeclarations{}, environment.StoredExpressions),
		p.Spec.FailurePolicy, nil)
}
