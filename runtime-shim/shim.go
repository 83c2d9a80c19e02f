// Package shim is childflow-runtime: an OCI runtime that is runc (or
// crun) with childflow's hook added to every container it creates, for
// `docker --runtime`, `nerdctl --runtime` and containerd runtime
// handlers. It edits the bundle's config.json on create and run, then
// execs the real runtime with the arguments it was given; every other
// command passes through untouched.
package shim

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/childflow/childflow/engine/api"
	"github.com/childflow/childflow/policy/annotations"
)

// Options are childflow-runtime's own flags (--childflow-runtime,
// --childflow-hook, --childflow-socket, --childflow-state-dir,
// --childflow-policy) or environment (CHILDFLOW_RUNTIME, CHILDFLOW_SOCKET,
// CHILDFLOW_STATE_DIR, CHILDFLOW_POLICY). The flags come first (docker's
// "runtimeArgs") and are removed before the real runtime sees them.
type Options struct {
	Runtime  string // the real runtime: runc by default
	Hook     string // childflow-hook: next to this binary by default
	Socket   string // passed to the hook
	StateDir string // passed to the hook
	// Policy, if set, is a YAML/JSON policy document given to containers
	// that carry no childflow.dev/ annotation: with it, every container
	// of this runtime is sandboxed.
	Policy string
}

const prefix = "--childflow-"

// Run parses args, prepares the bundle when a container is created and
// execs the real runtime. It returns only on error.
func Run(args []string, stderr io.Writer) int {
	opts, rest, err := parseOptions(args[1:])
	if err != nil {
		fmt.Fprintf(stderr, "childflow-runtime: %v\n", err)
		return 2
	}
	runtime, err := exec.LookPath(opts.Runtime)
	if err != nil {
		fmt.Fprintf(stderr, "childflow-runtime: --childflow-runtime %q: %v\n", opts.Runtime, err)
		return 2
	}
	cmd, bundle, err := command(rest)
	if err != nil {
		fmt.Fprintf(stderr, "childflow-runtime: %v\n", err)
		return 2
	}
	config := filepath.Join(bundle, "config.json")
	switch cmd {
	case "create", "run":
		err = Prepare(config, opts)
	case "restore":
		err = refuseRestore(config, opts)
	}
	if err != nil {
		fmt.Fprintf(stderr, "childflow-runtime: %v\n", err)
		return 1
	}
	err = syscall.Exec(runtime, append([]string{runtime}, rest...), os.Environ())
	fmt.Fprintf(stderr, "childflow-runtime: exec %s: %v\n", runtime, err)
	return 1
}

func parseOptions(args []string) (Options, []string, error) {
	// Environment first, flags override: containerd hands its environment
	// to the shim and the runtime, but has no place for runtime flags.
	opts := Options{Runtime: envOr("CHILDFLOW_RUNTIME", "runc"), Socket: os.Getenv("CHILDFLOW_SOCKET"),
		StateDir: os.Getenv("CHILDFLOW_STATE_DIR"), Policy: os.Getenv("CHILDFLOW_POLICY")}
	if self, err := os.Executable(); err == nil {
		opts.Hook = filepath.Join(filepath.Dir(self), "childflow-hook")
	}
	fields := map[string]*string{"runtime": &opts.Runtime, "hook": &opts.Hook, "socket": &opts.Socket, "state-dir": &opts.StateDir, "policy": &opts.Policy}
	var rest []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		if !strings.HasPrefix(a, prefix) {
			rest = append(rest, a)
			continue
		}
		name, value, hasValue := strings.Cut(strings.TrimPrefix(a, prefix), "=")
		f, ok := fields[name]
		if !ok {
			return opts, nil, fmt.Errorf("unknown flag %s%s", prefix, name)
		}
		if !hasValue {
			if i+1 >= len(args) {
				return opts, nil, fmt.Errorf("flag %s%s needs a value", prefix, name)
			}
			i++
			value = args[i]
		}
		*f = value
	}
	if opts.Policy != "" {
		b, err := os.ReadFile(opts.Policy)
		if err != nil {
			return opts, nil, fmt.Errorf("invalid --childflow-policy (CHILDFLOW_POLICY) %q: %v", opts.Policy, err)
		}
		// It becomes the containers' childflow.dev/policy annotation: the
		// rules of annotations hold (no host files, not the node's loopback).
		settings, name, err := annotations.Parse(map[string]string{annotations.Policy: string(b)})
		if err == nil {
			_, err = api.ResolveContainer(settings, name)
		}
		if err != nil {
			return opts, nil, fmt.Errorf("invalid --childflow-policy %s: %v", opts.Policy, err)
		}
		opts.Policy = string(b)
	}
	return opts, rest, nil
}

// runtimeCommands are runc's and crun's commands. The first argument that
// is not a flag must be one: anything else is a global flag's value read
// as the command, and a create behind it would start without the hook.
var runtimeCommands = map[string]bool{
	"checkpoint": true, "create": true, "delete": true, "events": true, "exec": true, "features": true,
	"help": true, "h": true, "kill": true, "list": true, "mounts": true, "pause": true, "ps": true,
	"restore": true, "resume": true, "run": true, "spec": true, "start": true, "state": true, "update": true,
}

// globalWithValue are runc's and crun's global flags that take a value,
// the next argument unless written --flag=value. runc reads -flag as
// --flag (Go's flag package).
var globalWithValue = map[string]bool{"root": true, "log": true, "log-format": true, "log-level": true, "criu": true, "rootless": true, "cgroup-manager": true}

// command finds the runtime subcommand and, for create, run and restore,
// the bundle directory (-b/--bundle, default the working directory).
func command(args []string) (cmd, bundle string, err error) {
	i := 0
	for ; i < len(args) && strings.HasPrefix(args[i], "-"); i++ {
		name, _, hasValue := strings.Cut(strings.TrimLeft(args[i], "-"), "=")
		if globalWithValue[name] && !hasValue {
			i++
		}
	}
	if i >= len(args) {
		return "", "", nil
	}
	cmd = args[i]
	if !runtimeCommands[cmd] {
		return "", "", fmt.Errorf("runtime arguments %q: %q is no runc or crun command (a global flag taking a value that childflow-runtime does not know?): a container would start without its sandbox", strings.Join(args, " "), cmd)
	}
	bundle = "."
	for j := i + 1; j < len(args); j++ {
		a := args[j]
		if a == "--" {
			break
		}
		name, value, hasValue := strings.Cut(strings.TrimLeft(a, "-"), "=")
		switch {
		case !strings.HasPrefix(a, "-"):
		case name == "bundle" || name == "b":
			if !hasValue && j+1 < len(args) {
				j++
				value = args[j]
			}
			bundle = value
		case strings.HasPrefix(a, "-b") && !strings.HasPrefix(a, "--"):
			bundle = a[2:] // crun's -bDIR
		}
	}
	return cmd, bundle, nil
}

// refuseRestore stops a sandboxed container from coming back from a
// checkpoint. CRIU puts its sockets back into whatever network namespace
// the manager made, a path childflow's hook has never been run on (CRIU
// does not work on the machines it is tested on): refused, rather than
// hoped to be sandboxed.
func refuseRestore(configPath string, opts Options) error {
	_, ann, err := readConfig(configPath)
	if err != nil {
		return err
	}
	if opts.Policy != "" || annotations.Present(stringMap(ann)) {
		return errors.New("restoring a sandboxed container from a checkpoint is not supported: it would run outside its sandbox")
	}
	return nil
}

// Prepare adds the hook to config.json's createRuntime and poststop
// stages (once, however often it runs) and the default policy to a
// container without childflow annotations. Unknown fields are kept.
func Prepare(configPath string, opts Options) error {
	st, err := os.Stat(configPath)
	if err != nil {
		return fmt.Errorf("reading bundle config: %w", err)
	}
	spec, ann, err := readConfig(configPath)
	if err != nil {
		return err
	}
	if opts.Policy != "" && !annotations.Present(stringMap(ann)) {
		ann[annotations.Policy] = opts.Policy
	}
	if len(ann) > 0 {
		spec["annotations"] = ann
	}
	hooks, _ := spec["hooks"].(map[string]any)
	if hooks == nil {
		hooks = map[string]any{}
	}
	for _, stage := range []string{"createRuntime", "poststop"} {
		hooks[stage] = addHook(hooks[stage], opts, stage)
	}
	spec["hooks"] = hooks
	out, err := json.Marshal(spec)
	if err != nil {
		return err
	}
	tmp := configPath + ".childflow.tmp"
	if err := os.WriteFile(tmp, out, st.Mode().Perm()); err != nil {
		return fmt.Errorf("writing bundle config: %w", err)
	}
	if err := os.Rename(tmp, configPath); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("writing bundle config: %w", err)
	}
	return nil
}

// readConfig reads a bundle's config.json, unknown fields kept, and its
// annotations (an empty map where it has none).
func readConfig(path string) (spec, ann map[string]any, err error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, nil, fmt.Errorf("reading bundle config: %w", err)
	}
	if err := json.Unmarshal(b, &spec); err != nil {
		return nil, nil, fmt.Errorf("parsing %s: %w", path, err)
	}
	ann, _ = spec["annotations"].(map[string]any)
	if ann == nil {
		ann = map[string]any{}
	}
	return spec, ann, nil
}

func addHook(list any, opts Options, stage string) []any {
	hooks, _ := list.([]any)
	for _, h := range hooks {
		if m, ok := h.(map[string]any); ok && m["path"] == opts.Hook {
			return hooks
		}
	}
	args := []any{"childflow-hook"}
	if opts.Socket != "" {
		args = append(args, "--socket", opts.Socket)
	}
	if opts.StateDir != "" {
		args = append(args, "--state-dir", opts.StateDir)
	}
	args = append(args, stage)
	return append(hooks, map[string]any{"path": opts.Hook, "args": args, "timeout": 30})
}

func stringMap(m map[string]any) map[string]string {
	out := map[string]string{}
	for k, v := range m {
		if s, ok := v.(string); ok {
			out[k] = s
		}
	}
	return out
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}
