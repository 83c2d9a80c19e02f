// Package hook is childflow-hook, the OCI hook that puts an annotated
// container's network namespace behind the node daemon. createRuntime
// (or prestart, for older runtimes) attaches; poststop detaches.
// Containers without childflow.dev/ annotations are left alone. With
// one, any failure fails the container start: never an open network. A
// container whose namespace is sandboxed already (a pod's, another
// container's) joins that sandbox if it asks for the same settings. A
// container's veths beside cf0 are guarded from the host, as childflow-cni
// guards a pod's; a container that keeps CAP_NET_RAW or CAP_NET_ADMIN
// beside an interface that cannot be guarded is refused.
package hook

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"github.com/spf13/pflag"
	"golang.org/x/sys/unix"

	"github.com/childflow/childflow/engine/api"
	"github.com/childflow/childflow/internal/attach"
	"github.com/childflow/childflow/internal/steer"
	"github.com/childflow/childflow/internal/tunns"
	"github.com/childflow/childflow/policy"
	"github.com/childflow/childflow/policy/annotations"
)

// Run is the whole hook; it returns the exit code (non-zero stops the
// container).
func Run(_ context.Context, args []string, stdin io.Reader, stderr io.Writer) int {
	fs := pflag.NewFlagSet("childflow-hook", pflag.ContinueOnError)
	fs.SetOutput(stderr)
	var node attach.Node
	fs.StringVar(&node.Socket, "socket", envOr("CHILDFLOW_SOCKET", api.DefaultSocket), "the node daemon's socket")
	fs.StringVar(&node.StateDir, "state-dir", envOr("CHILDFLOW_STATE_DIR", api.DefaultStateDir), "state directory of a daemon the hook starts")
	fs.StringVar(&node.Childflow, "childflow", os.Getenv("CHILDFLOW_BIN"), "childflow binary for a per-container daemon when none runs (default: next to the hook, then $PATH)")
	fs.Usage = func() {
		fmt.Fprintf(stderr, `Usage: childflow-hook [OPTIONS] createRuntime|prestart|poststop

An OCI hook (runc, crun, podman's and CRI-O's hooks.d): reads the
container's state on stdin and, for a container with childflow.dev/*
annotations, attaches its network namespace to childflow's node engine
(createRuntime, prestart) or detaches it (poststop).

Options:
%s`, fs.FlagUsages())
	}
	if err := fs.Parse(args[1:]); err != nil {
		if errors.Is(err, pflag.ErrHelp) {
			return 0
		}
		return fail(stderr, "", err)
	}
	if fs.NArg() != 1 {
		return fail(stderr, "", policy.Usagef("usage: childflow-hook [--socket PATH] createRuntime|prestart|poststop (container state on stdin)"))
	}
	stage := fs.Arg(0)
	switch stage {
	case "createRuntime", "prestart", "poststop", "createContainer", "startContainer", "poststart":
	default:
		// A slip in the hook's configuration shows on the first
		// container, annotated or not.
		return fail(stderr, "", policy.Usagef("unknown hook stage %q: want createRuntime, prestart or poststop", stage))
	}
	var state specs.State
	if err := json.NewDecoder(io.LimitReader(stdin, 16<<20)).Decode(&state); err != nil {
		return fail(stderr, "", fmt.Errorf("reading the container state on stdin: %w", err))
	}
	bundle := &bundleConfig{path: state.Bundle}
	ann := state.Annotations
	if len(ann) == 0 && state.Bundle != "" {
		if cfg, err := bundle.load(); err == nil {
			ann = cfg.Annotations
		}
	}
	if !annotations.Present(ann) {
		return 0
	}
	if node.Childflow == "" {
		node.Childflow = findChildflow()
	}
	switch stage {
	case "createRuntime", "prestart":
		return createRuntime(node, state, ann, bundle, stderr)
	case "poststop":
		if err := node.Detach(state.ID); err != nil {
			return fail(stderr, state.ID, err)
		}
		return 0
	}
	return 0 // createContainer, startContainer, poststart: nothing to do
}

func createRuntime(node attach.Node, state specs.State, ann map[string]string, bundle *bundleConfig, stderr io.Writer) int {
	settings, name, err := annotations.Parse(ann)
	if err == nil {
		// Validate here, so the error names the annotation.
		_, err = api.ResolveContainer(settings, name)
	}
	if err == nil {
		err = api.CheckID(state.ID)
	}
	if err != nil {
		return fail(stderr, state.ID, err)
	}
	if state.Pid <= 0 {
		return fail(stderr, state.ID, fmt.Errorf("the runtime gave no container pid (stage must be createRuntime or prestart)"))
	}
	netns := "/proc/" + strconv.Itoa(state.Pid) + "/ns/net"
	cfg, err := bundle.load()
	if err != nil {
		return fail(stderr, state.ID, err)
	}
	if err := attach.OwnNetns(netns); err != nil {
		return fail(stderr, state.ID, err)
	}
	// Its interfaces, not its routes, which a sandbox's steering moved;
	// before anything is set up.
	links, err := tunns.LinksIn(netns)
	if err != nil {
		return fail(stderr, state.ID, err)
	}
	joining := slices.Contains(links, "cf0") // the pod's, or another container's
	others := slices.DeleteFunc(links, func(l string) bool { return l == "cf0" })
	bypass := bypassCap(cfg.Process.Capabilities)
	if len(others) == 0 {
		bypass = "" // alone on cf0: nothing to get around
	}
	// Each veth is guarded from the host, where nothing in the namespace
	// reaches, as the CNI plugin guards a pod's: every one or none, and
	// whatever this container keeps, since a container run later in its
	// network without the hook (docker's default runtime, a sidecar
	// without annotations) may keep NET_RAW or NET_ADMIN.
	var guards []steer.HostGuard
	if !joining {
		for i, link := range others {
			g, gerr := tunns.HostGuardOf(netns, link, state.ID, nil)
			if gerr != nil {
				if bypass != "" {
					return fail(stderr, state.ID, fmt.Errorf("%w; %v", bypassError(bypass), gerr))
				}
				guards = nil
				break
			}
			if i > 0 {
				g.Port = link
			}
			guards = append(guards, g)
		}
	}
	att, err := node.Attach(attach.Sandbox{
		ID:       state.ID,
		Netns:    netns,
		PID:      state.Pid,
		Settings: settings,
		Source:   api.SourceHook,
		Hosts:    cfg.hosts(),
	})
	switch {
	case err != nil:
	case att.Joined:
		if bypass != "" && !att.Guarded {
			// Joined a sandbox nothing guards from the host (a join
			// records nothing to undo).
			err = bypassError(bypass)
		}
	case joining && bypass != "":
		// The sandbox that was there went meanwhile; nothing was
		// looked at to guard.
		err = bypassError(bypass)
		node.Detach(state.ID)
	case len(guards) > 0:
		hostGuards := steer.Guards{Dir: node.StateDir}
		for _, g := range guards {
			if err = hostGuards.Install(g); err != nil {
				hostGuards.Remove(state.ID)
				node.Detach(state.ID)
				break
			}
		}
	}
	if err != nil {
		return fail(stderr, state.ID, err)
	}
	return 0
}

func fail(stderr io.Writer, id string, err error) int {
	if id != "" {
		fmt.Fprintf(stderr, "childflow-hook: container %s: %v\n", id, err)
	} else {
		fmt.Fprintf(stderr, "childflow-hook: %v\n", err)
	}
	var u *policy.UsageError
	if errors.As(err, &u) {
		return 2
	}
	return 1
}

// bundleConfig is the part of the bundle's config.json the hook reads,
// loaded once: annotations for runtimes whose state does not carry them,
// capabilities for bypassCap.
type bundleConfig struct {
	path        string
	loaded      bool
	err         error
	Annotations map[string]string `json:"annotations"`
	Process     struct {
		Capabilities map[string][]string `json:"capabilities"`
	} `json:"process"`
	Root   specs.Root    `json:"root"`
	Mounts []specs.Mount `json:"mounts"`
}

// maxHosts bounds the hosts file the hook reads and hands on.
const maxHosts = 256 << 10

// hosts is the container's /etc/hosts as its runtime set it up, for the
// domain rules (engine.Config.Hosts): the file bind-mounted there
// (docker, podman and nerdctl write one per container), else the
// image's. The hook is root and the container's creator chose both
// paths: it reads only a regular file (opened as a path first, so that
// no device sees an open), a bounded part of it, and the image's file
// within the rootfs. None, or an error: no names.
func (c *bundleConfig) hosts() string {
	path, err := c.pathOfHosts()
	if err != nil {
		return ""
	}
	defer path.Close()
	if st, err := path.Stat(); err != nil || !st.Mode().IsRegular() {
		return ""
	}
	f, err := os.Open(fmt.Sprintf("/proc/self/fd/%d", path.Fd()))
	if err != nil {
		return ""
	}
	defer f.Close()
	b, _ := io.ReadAll(io.LimitReader(f, maxHosts))
	return string(b)
}

// pathOfHosts opens, O_PATH, what the container will find at /etc/hosts:
// the last bind mount there, or the rootfs's file, its symlinks resolved
// inside the rootfs.
func (c *bundleConfig) pathOfHosts() (*os.File, error) {
	abs := func(p string) string {
		if filepath.IsAbs(p) {
			return p
		}
		return filepath.Join(c.path, p)
	}
	for _, m := range slices.Backward(c.Mounts) {
		if filepath.Clean(m.Destination) != "/etc/hosts" {
			continue
		}
		if m.Type != "bind" && !slices.Contains(m.Options, "bind") && !slices.Contains(m.Options, "rbind") {
			return nil, errors.New("not a file")
		}
		return os.OpenFile(abs(m.Source), unix.O_PATH|unix.O_CLOEXEC, 0)
	}
	root, err := os.OpenFile(abs(c.Root.Path), unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	defer root.Close()
	fd, err := unix.Openat2(int(root.Fd()), "etc/hosts", &unix.OpenHow{
		Flags: unix.O_PATH | unix.O_CLOEXEC, Resolve: unix.RESOLVE_IN_ROOT | unix.RESOLVE_NO_MAGICLINKS})
	if err != nil {
		return nil, err
	}
	return os.NewFile(uintptr(fd), "etc/hosts"), nil
}

func (c *bundleConfig) load() (*bundleConfig, error) {
	if !c.loaded {
		c.loaded = true
		b, err := os.ReadFile(filepath.Join(c.path, "config.json"))
		if err == nil {
			err = json.Unmarshal(b, c)
		}
		if err != nil {
			c.err = fmt.Errorf("reading the bundle's config.json: %w", err)
		}
	}
	return c, c.err
}

func findChildflow() string {
	if self, err := os.Executable(); err == nil {
		p := filepath.Join(filepath.Dir(self), "childflow")
		if _, err := os.Stat(p); err == nil {
			return p
		}
	}
	p, _ := exec.LookPath("childflow")
	return p
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

// bypassCaps let a process get around the routes and nftables rules that
// steer a shared namespace: raw packet sockets write frames straight to
// the other interface, and NET_ADMIN can change the rules.
var bypassCaps = []string{"CAP_NET_RAW", "CAP_NET_ADMIN"}

// bypassCap names a capability of the container that gets around the
// sharing of a namespace with another interface (docker's bridge), ""
// if it keeps none. Alone on cf0 there is nothing to get around.
func bypassCap(caps map[string][]string) string {
	for _, set := range []string{"bounding", "effective", "permitted", "ambient"} {
		for _, c := range caps[set] {
			if slices.Contains(bypassCaps, c) {
				return c
			}
		}
	}
	return ""
}

// bypassError refuses a container with capability c in a namespace with
// another interface.
func bypassError(c string) error {
	return fmt.Errorf("the container has %s and another network interface besides cf0: %s could send around the sandbox; drop it (docker run --cap-drop %s, a pod's securityContext) or give the container no other network (--network none)",
		c, c, strings.TrimPrefix(c, "CAP_"))
}
