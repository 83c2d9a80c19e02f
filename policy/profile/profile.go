// Package profile reads childflow profiles: TOML files (upstream's
// format) or YAML/JSON documents with the same keys, with `extends`
// chains. A profile sits between the defaults and the command line.
package profile

import (
	"bytes"
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"reflect"
	"strings"

	toml "github.com/pelletier/go-toml/v2"
	"sigs.k8s.io/yaml"

	"github.com/childflow/childflow/policy"
)

// Profile holds every key of upstream childflow's profile schema. A nil
// field is unset; lists replace, never append.
type Profile struct {
	Extends           *string     `json:"extends,omitempty" toml:"extends,omitempty"`
	Capture           *string     `json:"capture,omitempty" toml:"capture,omitempty"`
	CapturePoint      *string     `json:"capture_point,omitempty" toml:"capture_point,omitempty"`
	Backend           *string     `json:"backend,omitempty" toml:"backend,omitempty"`
	DNS               *StringList `json:"dns,omitempty" toml:"dns,omitempty"`
	HostsFile         *string     `json:"hosts_file,omitempty" toml:"hosts_file,omitempty"`
	Proxy             *string     `json:"proxy,omitempty" toml:"proxy,omitempty"`
	ProxyUser         *string     `json:"proxy_user,omitempty" toml:"proxy_user,omitempty"`
	ProxyPassword     *string     `json:"proxy_password,omitempty" toml:"proxy_password,omitempty"`
	ProxyInsecure     *bool       `json:"proxy_insecure,omitempty" toml:"proxy_insecure,omitempty"`
	Summary           *bool       `json:"summary,omitempty" toml:"summary,omitempty"`
	SummaryFormat     *string     `json:"summary_format,omitempty" toml:"summary_format,omitempty"`
	FlowLog           *string     `json:"flow_log,omitempty" toml:"flow_log,omitempty"`
	Offline           *bool       `json:"offline,omitempty" toml:"offline,omitempty"`
	BlockPrivate      *bool       `json:"block_private,omitempty" toml:"block_private,omitempty"`
	BlockMetadata     *bool       `json:"block_metadata,omitempty" toml:"block_metadata,omitempty"`
	DefaultPolicy     *string     `json:"default_policy,omitempty" toml:"default_policy,omitempty"`
	AllowCIDRs        *StringList `json:"allow_cidrs,omitempty" toml:"allow_cidrs,omitempty"`
	DenyCIDRs         *StringList `json:"deny_cidrs,omitempty" toml:"deny_cidrs,omitempty"`
	AllowDomains      *StringList `json:"allow_domains,omitempty" toml:"allow_domains,omitempty"`
	AllowDomainsExact *StringList `json:"allow_domains_exact,omitempty" toml:"allow_domains_exact,omitempty"`
	DenyDomains       *StringList `json:"deny_domains,omitempty" toml:"deny_domains,omitempty"`
	DenyDomainsExact  *StringList `json:"deny_domains_exact,omitempty" toml:"deny_domains_exact,omitempty"`
	ProxyOnly         *bool       `json:"proxy_only,omitempty" toml:"proxy_only,omitempty"`
	FailOnLeak        *bool       `json:"fail_on_leak,omitempty" toml:"fail_on_leak,omitempty"`
	Iface             *string     `json:"iface,omitempty" toml:"iface,omitempty"`
	Command           *StringList `json:"command,omitempty" toml:"command,omitempty"`

	// Load's: the file read, and the file each key came from, so that a
	// mistake is named where it was made along an extends chain.
	file string
	from map[string]string
}

// StringList accepts a single string or a list of strings.
type StringList []string

func (l *StringList) UnmarshalJSON(b []byte) error {
	var one string
	if err := json.Unmarshal(b, &one); err == nil {
		*l = StringList{one}
		return nil
	}
	var many []string
	if err := json.Unmarshal(b, &many); err != nil {
		return fmt.Errorf("want a string or a list of strings")
	}
	*l = many
	return nil
}

// Parse reads one document (no extends resolution). name is used in
// errors; format is "toml", "yaml" or "json" ("" guesses from name).
func Parse(name string, data []byte, format string) (*Profile, error) {
	if format == "" {
		switch strings.ToLower(filepath.Ext(name)) {
		case ".yaml", ".yml":
			format = "yaml"
		case ".json":
			format = "json"
		default:
			format = "toml"
		}
	}
	var generic map[string]any
	switch format {
	case "toml":
		if err := toml.Unmarshal(data, &generic); err != nil {
			return nil, policy.Usagef("profile %s: %v", name, err)
		}
	case "yaml", "json":
		js, err := yaml.YAMLToJSON(data)
		if err != nil {
			return nil, policy.Usagef("profile %s: %v", name, err)
		}
		if err := json.Unmarshal(js, &generic); err != nil {
			return nil, policy.Usagef("profile %s: not a mapping of keys: %v", name, err)
		}
	default:
		return nil, policy.Usagef("profile %s: unknown format %q", name, format)
	}
	known := keys()
	for k, v := range generic {
		if !known[k] {
			return nil, policy.Usagef("profile %s: unknown key %q", name, k)
		}
		// Each key on its own, so the error names it.
		b, _ := json.Marshal(map[string]any{k: v})
		var one Profile
		dec := json.NewDecoder(bytes.NewReader(b))
		if err := dec.Decode(&one); err != nil {
			return nil, policy.Usagef("profile %s: key %q: invalid value %v", name, k, jsonValue(v))
		}
	}
	b, _ := json.Marshal(generic)
	var p Profile
	if err := json.Unmarshal(b, &p); err != nil {
		return nil, policy.Usagef("profile %s: %v", name, err)
	}
	return &p, nil
}

func jsonValue(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}

func keys() map[string]bool {
	out := map[string]bool{}
	for k := range Fields(&Profile{}) {
		out[k] = true
	}
	return out
}

// Fields maps each key (allow_cidrs) to its field in p, a pointer that is
// nil when the key is unset.
func Fields(p *Profile) map[string]reflect.Value {
	out := map[string]reflect.Value{}
	v := reflect.ValueOf(p).Elem()
	for i := 0; i < v.NumField(); i++ {
		if !v.Type().Field(i).IsExported() {
			continue
		}
		out[strings.Split(v.Type().Field(i).Tag.Get("json"), ",")[0]] = v.Field(i)
	}
	return out
}

// Load reads path and the chain of profiles it extends, each relative to
// the file that names it, and returns them merged (the extending file
// wins). Paths in a profile are made absolute against its own directory.
func Load(path string) (*Profile, error) {
	return load(path, nil)
}

func load(path string, chain []string) (*Profile, error) {
	abs, err := filepath.Abs(path)
	if err != nil {
		return nil, policy.Usagef("profile %s: %v", path, err)
	}
	for i, seen := range chain {
		if seen == abs {
			return nil, policy.Usagef("profile extends cycle: %s", strings.Join(append(chain[i:], abs), " -> "))
		}
	}
	data, err := os.ReadFile(abs)
	if err != nil {
		if len(chain) > 0 {
			return nil, policy.Usagef("profile %s: invalid extends %q: %v", chain[len(chain)-1], path, err)
		}
		return nil, policy.Usagef("invalid --profile %q: %v", path, err)
	}
	chain = append(chain, abs)
	p, err := Parse(abs, data, "")
	if err != nil {
		return nil, err
	}
	p.resolvePaths(filepath.Dir(abs))
	p.file, p.from = abs, map[string]string{}
	for k, f := range Fields(p) {
		if !f.IsNil() {
			p.from[k] = abs
		}
	}
	if p.Extends == nil {
		return p, nil
	}
	base, err := load(*p.Extends, chain)
	if err != nil {
		return nil, err
	}
	return Merge(base, p), nil
}

func (p *Profile) resolvePaths(dir string) {
	for _, f := range []*string{p.Extends, p.HostsFile, p.Capture, p.FlowLog} {
		if f != nil && *f != "" && !filepath.IsAbs(*f) {
			*f = filepath.Join(dir, *f)
		}
	}
}

// Merge returns base overridden by every field set in over.
func Merge(base, over *Profile) *Profile {
	out := *base
	out.file, out.from = over.file, maps.Clone(base.from)
	outFields := Fields(&out)
	for k, f := range Fields(over) {
		if !f.IsNil() {
			outFields[k].Set(f)
			if out.from != nil {
				out.from[k] = over.from[k]
			}
		}
	}
	out.Extends = nil
	return &out
}

// ExtendedFrom is the file of the extends chain that set key in a profile
// Load read, or "" where the profile itself set it.
func (p *Profile) ExtendedFrom(key string) string {
	if from := p.from[key]; from != p.file {
		return from
	}
	return ""
}

// Redacted is the value that stands for secrets in dumps.
const Redacted = "<redacted>"

// TOML renders p with the proxy password redacted.
func (p *Profile) TOML() (string, error) {
	cp := *p
	cp.Extends = nil
	if cp.ProxyPassword != nil && *cp.ProxyPassword != "" {
		r := Redacted
		cp.ProxyPassword = &r
	}
	b, err := toml.Marshal(cp)
	return string(b), err
}
