// Package annotations reads a container's or pod's childflow.dev/*
// annotations into a profile: one annotation per setting
// (childflow.dev/default-policy: deny) and childflow.dev/policy for a
// whole YAML or JSON document with the profile's keys. The per-setting
// annotations override the document.
//
// Only network settings may come from annotations: whoever creates a
// container must not be able to name files on the host (flow_log,
// capture, hosts_file) or change how the node runs (backend, iface).
package annotations

import (
	"reflect"
	"slices"
	"sort"
	"strconv"
	"strings"

	"github.com/childflow/childflow/policy"
	"github.com/childflow/childflow/policy/profile"
)

const (
	// Prefix marks childflow's annotations; any of them turns the sandbox on.
	Prefix = "childflow.dev/"
	// Policy holds a whole policy document.
	Policy = Prefix + "policy"
	// Enabled turns the sandbox on with the default policy ("true") or
	// says explicitly that there is none ("false").
	Enabled = Prefix + "enabled"
)

// Keys are the profile keys annotations may set.
var Keys = []string{
	"default_policy", "offline", "block_private", "block_metadata",
	"allow_cidrs", "deny_cidrs", "allow_domains", "allow_domains_exact", "deny_domains", "deny_domains_exact",
	"dns", "proxy", "proxy_user", "proxy_password", "proxy_insecure", "proxy_only",
}

// Name is the annotation that sets a profile key.
func Name(key string) string { return Prefix + strings.ReplaceAll(key, "_", "-") }

// Present reports whether ann asks for a sandbox: any childflow.dev/
// annotation (or slip of the prefix) but a lone childflow.dev/enabled:
// "false". A malformed enabled value or a slip counts as present, so
// Parse rejects it.
func Present(ann map[string]string) bool {
	keys := childflowKeys(ann)
	if len(keys) == 1 && keys[0] == Enabled {
		on, err := strconv.ParseBool(strings.TrimSpace(ann[Enabled]))
		return on || err != nil
	}
	return len(keys) > 0
}

// childflowKeys lists ann's keys meant for childflow: its prefix, and
// what looks like a slip of it (Childflow.dev/, childflow.io/,
// childflow/), which Parse then refuses by name rather than leave a
// container unsandboxed over a typo.
func childflowKeys(ann map[string]string) []string {
	var out []string
	for k := range ann {
		l := strings.ToLower(k)
		if strings.HasPrefix(l, "childflow.") || strings.HasPrefix(l, "childflow/") {
			out = append(out, k)
		}
	}
	sort.Strings(out)
	return out
}

// Parse returns the profile ann describes and the Namer that says where
// each key came from. It fails on any unknown childflow.dev/ annotation
// or bad value: a typo must not leave a container with an open network.
func Parse(ann map[string]string) (*profile.Profile, profile.Namer, error) {
	doc := &profile.Profile{}
	if s, ok := ann[Policy]; ok {
		var err error
		if doc, err = profile.Parse(Policy, []byte(s), "yaml"); err != nil {
			return nil, nil, err
		}
		if bad := disallowed(doc); bad != "" {
			return nil, nil, policy.Usagef("annotation %s: key %q cannot be set by an annotation", Policy, bad)
		}
	}
	over := &profile.Profile{}
	fromKey := map[string]bool{}
	fields := fieldsByKey(over)
	for _, k := range childflowKeys(ann) {
		if k == Policy {
			continue
		}
		if k == Enabled {
			on, err := strconv.ParseBool(strings.TrimSpace(ann[k]))
			if err != nil {
				return nil, nil, policy.Usagef("invalid annotation %s %q: must be true or false", k, ann[k])
			}
			if !on && len(childflowKeys(ann)) > 1 {
				return nil, nil, policy.Usagef("annotation %s is \"false\" but other %s annotations are set", k, Prefix)
			}
			continue
		}
		key := strings.ReplaceAll(strings.TrimPrefix(k, Prefix), "-", "_")
		f, ok := fields[key]
		if !ok {
			return nil, nil, policy.Usagef("unknown annotation %s (known: %s, %s and %s<setting> for %s)", k, Enabled, Policy, Prefix, strings.Join(Keys, ", "))
		}
		if err := set(f, k, ann[k]); err != nil {
			return nil, nil, err
		}
		fromKey[key] = true
	}
	inDoc := fieldsByKey(doc)
	name := func(key string) string {
		if f, ok := inDoc[key]; ok && !fromKey[key] && !f.IsNil() {
			return "annotation " + Policy + " key " + key
		}
		return "annotation " + Name(key)
	}
	return profile.Merge(doc, over), name, nil
}

// fieldsByKey maps each key annotations may set to its field in p.
func fieldsByKey(p *profile.Profile) map[string]reflect.Value {
	all := profile.Fields(p)
	out := map[string]reflect.Value{}
	for _, k := range Keys {
		out[k] = all[k]
	}
	return out
}

// disallowed names a key set in p that annotations may not set.
func disallowed(p *profile.Profile) string {
	fields := profile.Fields(p)
	names := make([]string, 0, len(fields))
	for k := range fields {
		names = append(names, k)
	}
	sort.Strings(names)
	for _, k := range names {
		if !fields[k].IsNil() && !slices.Contains(Keys, k) {
			return k
		}
	}
	return ""
}

// set parses one annotation value into a profile field: strings as they
// are, booleans strictly, lists comma- or space-separated.
func set(f reflect.Value, ann, value string) error {
	value = strings.TrimSpace(value)
	switch f.Type().Elem().Kind() {
	case reflect.String:
		f.Set(reflect.ValueOf(&value))
	case reflect.Bool:
		b, err := strconv.ParseBool(value)
		if err != nil {
			return policy.Usagef("invalid annotation %s %q: must be true or false", ann, value)
		}
		f.Set(reflect.ValueOf(&b))
	default:
		l := profile.StringList(strings.FieldsFunc(value, func(r rune) bool { return r == ',' || r == ' ' || r == '\n' || r == '\t' }))
		f.Set(reflect.ValueOf(&l))
	}
	return nil
}
