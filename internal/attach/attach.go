// Package attach is what the OCI hook and the CNI plugin share: put a
// TUN into a sandbox's network namespace and hand it to the node daemon,
// starting a per-sandbox daemon where none runs. It must not import
// gVisor: the hook and the plugin are short-lived and start fast.
package attach

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"

	"github.com/childflow/childflow/engine/api"
	"github.com/childflow/childflow/internal/netplan"
	"github.com/childflow/childflow/internal/procnet"
	"github.com/childflow/childflow/internal/steer"
	"github.com/childflow/childflow/internal/tunns"
	"github.com/childflow/childflow/policy/profile"
)

// Node says how to reach the daemon.
type Node struct {
	Socket   string // the daemon's socket, e.g. api.DefaultSocket
	StateDir string // where a daemon started here keeps its state
	// Childflow is the childflow binary to start a per-sandbox daemon
	// with when no daemon answers. Empty: none is started.
	Childflow string
}

// Sandbox is one network namespace to attach.
type Sandbox struct {
	ID       string
	Netns    string // host path of the namespace
	PID      int    // a process in it, 0 if none yet
	Settings *profile.Profile
	Source   string
	// Keep are destinations that stay on the namespace's other interface
	// (a cluster's own ranges); empty: everything goes through cf0.
	Keep []netip.Prefix
	// Labels name the sandbox in flow logs and metrics (pod namespace,
	// name and uid).
	Labels map[string]string
	// Hosts is the sandbox's hosts file, whose names count as answers.
	Hosts string
}

// Attached describes a sandbox the daemon relays.
type Attached struct {
	Plan netplan.Plan
	// Shared: the namespace has another interface besides the TUN.
	Shared bool
	// Joined: the namespace was sandboxed already, with the same
	// settings; the container shares that sandbox, which Guarded says
	// is guarded from the host.
	Joined  bool
	Guarded bool
}

// Attach creates the TUN in sb's namespace and returns once the daemon
// relays it. On error nothing of it is left in the namespace.
func (n Node) Attach(sb Sandbox) (_ Attached, err error) {
	ino, err := ownNetns(sb.Netns)
	if err != nil {
		return Attached{}, err
	}
	routes, err := routesIn(sb.Netns)
	if err != nil {
		return Attached{}, err
	}
	plan, err := netplan.Choose(append(netplan.Routes(), routes...), 0)
	if err != nil {
		return Attached{}, err
	}
	link, shared, err := tunns.CreateIn(sb.Netns, plan, sb.Keep)
	if errors.Is(err, tunns.ErrExists) {
		return n.join(sb, ino)
	}
	if err != nil {
		return Attached{}, fmt.Errorf("creating %s in %s: %w", plan.Interface, sb.Netns, err)
	}
	defer link.Close() // the daemon has its own copy
	defer func() {
		if err != nil {
			tunns.DeleteIn(sb.Netns, plan.Interface)
		}
	}()
	a := &api.Attachment{ID: sb.ID, Netns: sb.Netns, NetnsInode: ino, PID: sb.PID, Plan: plan, Settings: sb.Settings, Source: sb.Source, Labels: sb.Labels, Hosts: sb.Hosts, Keep: sb.Keep}
	client := api.Client{Socket: n.Socket}
	err = client.Attach(a, link)
	if errors.Is(err, api.ErrUnavailable) && n.Childflow != "" {
		if err = n.startDaemon(); err == nil {
			err = client.Attach(a, link)
		}
	}
	if err != nil {
		return Attached{}, fmt.Errorf("attaching to the childflow daemon: %w", err)
	}
	return Attached{Plan: plan, Shared: shared}, nil
}

// OwnNetns fails for a namespace that is the caller's (the host's), or
// that cannot be read.
func OwnNetns(netns string) error {
	_, err := ownNetns(netns)
	return err
}

func ownNetns(netns string) (uint64, error) {
	ino, err := tunns.NetnsInode(netns)
	if err != nil {
		return 0, err
	}
	if self, err := tunns.NetnsInode("/proc/self/ns/net"); err == nil && self == ino {
		return 0, fmt.Errorf("the sandbox shares the host's network namespace; childflow needs one of its own")
	}
	return ino, nil
}

// join admits sb into the sandbox that already holds its namespace.
func (n Node) join(sb Sandbox, ino uint64) (Attached, error) {
	a := &api.Attachment{ID: sb.ID, Netns: sb.Netns, NetnsInode: ino, Settings: sb.Settings}
	st, err := api.Client{Socket: n.Socket}.Join(a)
	if errors.Is(err, api.ErrUnavailable) {
		err = fmt.Errorf("%s has childflow's interface, but no childflow daemon answers on %s", sb.Netns, n.Socket)
	}
	if err != nil {
		return Attached{}, fmt.Errorf("joining the sandbox of its network namespace: %w", err)
	}
	return Attached{Plan: st.Plan, Joined: true, Guarded: st.Guarded}, nil
}

// Detach asks the daemon to end sandbox id: to stop relaying it and
// remove its TUN and host guards, or, while processes are left in its
// namespace, to keep serving them until they are gone. A daemon that is
// not running has nothing to stop (its next start drops records of
// namespaces that are gone, and adopts those processes are left in): the
// guards are removed here, unless processes are left for it.
func (n Node) Detach(id string) error {
	err := api.Client{Socket: n.Socket}.Detach(id)
	if !errors.Is(err, api.ErrUnavailable) {
		return err
	}
	if a, err := api.ReadRecord(n.StateDir, id); err == nil && a.Source != api.SourceCNI && procnet.Occupied(a.NetnsInode) {
		return nil
	}
	if guards := (steer.Guards{Dir: n.StateDir}); guards.RecordedAny(id) {
		return guards.Remove(id)
	}
	return nil
}

// startDaemon runs `childflow daemon --exit-when-idle` detached from the
// caller: a new session, no inherited stdio (runc waits for a hook's
// stdout and stderr to close), and returns once its socket is up.
func (n Node) startDaemon() error {
	if err := os.MkdirAll(n.StateDir, 0o700); err != nil {
		return err
	}
	logFile, err := os.OpenFile(filepath.Join(n.StateDir, "daemon.log"), os.O_WRONLY|os.O_CREATE|os.O_APPEND|unix.O_NOFOLLOW, 0o600)
	if err != nil {
		return fmt.Errorf("opening daemon log: %w", err)
	}
	defer logFile.Close()
	r, w, err := os.Pipe()
	if err != nil {
		return err
	}
	defer r.Close()
	cmd := exec.Command(n.Childflow, "daemon", "--exit-when-idle", "--socket", n.Socket, "--state-dir", n.StateDir, "--ready-fd", "3")
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.ExtraFiles = []*os.File{w}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	cmd.Dir = "/"
	err = cmd.Start()
	w.Close()
	if err != nil {
		return fmt.Errorf("starting %s daemon: %w", n.Childflow, err)
	}
	go cmd.Wait()
	cmd.Process.Release()
	r.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := r.Read(make([]byte, 1)); err == nil {
		return nil
	}
	// Lost a race with another hook's daemon? Then its socket answers.
	for deadline := time.Now().Add(5 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		if c, err := net.Dial("unix", n.Socket); err == nil {
			c.Close()
			return nil
		}
	}
	return fmt.Errorf("the daemon started from %s did not come up (see %s)", n.Childflow, logFile.Name())
}

// routesIn are the destinations routed in the namespace: the sandbox
// subnet must not shadow them.
func routesIn(netnsPath string) (out []netip.Prefix, err error) {
	err = ns.WithNetNSPath(netnsPath, func(ns.NetNS) error {
		out = netplan.Routes()
		return nil
	})
	return out, err
}
