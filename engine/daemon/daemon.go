// Package daemon is the node engine: one process that relays many
// sandboxes (one Engine each, with its own limits) for the OCI hook and
// the CNI plugin, behind the unix-socket API of engine/api. Every
// attachment is recorded under the state directory before its engine
// starts, so a restarted daemon re-adopts every live sandbox: their TUN
// devices are persistent and their policies are in the records.
package daemon

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/childflow/childflow/engine"
	"github.com/childflow/childflow/engine/api"
	"github.com/childflow/childflow/engine/dns"
	"github.com/childflow/childflow/engine/flowlog"
	"github.com/childflow/childflow/engine/proxy"
	"github.com/childflow/childflow/internal/accept"
	"github.com/childflow/childflow/internal/nftwatch"
	"github.com/childflow/childflow/internal/procnet"
	"github.com/childflow/childflow/internal/steer"
	"github.com/childflow/childflow/internal/tunns"
	"github.com/childflow/childflow/policy"
	"github.com/childflow/childflow/policy/profile"
)

// Config of a daemon.
type Config struct {
	Socket   string // api.DefaultSocket
	StateDir string // api.DefaultStateDir
	// FlowLogDir, if set, gets one JSON Lines flow log per sandbox,
	// named after its id.
	FlowLogDir string
	// FlowLogMaxSize and FlowLogKeep bound each flow log
	// (flowlog.Options); zero: unbounded.
	FlowLogMaxSize int64
	FlowLogKeep    int
	// FlowLogRetain bounds what the flow logs of sandboxes no longer
	// attached hold together (pruneFlowLogs); zero: they are all kept.
	FlowLogRetain int64
	// FlowLogStdout also writes every sandbox's events to Stdout, for a
	// cluster's log pipeline.
	FlowLogStdout bool
	Stdout        io.Writer
	// MetricsAddr, if set, serves Prometheus metrics on /metrics.
	MetricsAddr string
	// DNS are the resolvers for sandboxes whose policy names none.
	DNS []netip.AddrPort
	// MaxFlows bounds the flows of all sandboxes together (engine.FlowBudget);
	// zero: half the node's ephemeral port range.
	MaxFlows int
	// ExitWhenIdle stops the daemon once its last sandbox is detached
	// (or when none attaches soon after start): the per-container engine
	// a hook starts where no node daemon runs.
	ExitWhenIdle bool
	// Logf reports what happens; nil discards.
	Logf func(format string, args ...any)
}

// Daemon serves sandboxes.
type Daemon struct {
	cfg    Config
	ctx    context.Context
	cancel context.CancelFunc

	stdout *flowlog.Writer
	// One budget for every sandbox's buffers: what the node's engines
	// hold for stuck flows is bounded by it, not by it times the pods.
	buffers *engine.BufferBudget
	// And one for their flows, which share the node's ephemeral ports.
	flows *engine.FlowBudget

	mu        sync.Mutex
	sandboxes map[string]*sandbox
}

// nodeBufferBudget is the budget the daemon's sandboxes share.
const nodeBufferBudget = 256 << 20

type sandbox struct {
	att api.Attachment
	// netns is held open: a namespace can outlive the process whose
	// /proc path att names (a pod's pinned one, a named one), and its TUN
	// and steering are removed through this when the sandbox goes.
	netns   *os.File
	eng     *engine.Engine
	log     *flowlog.Writer
	logPath string
	stdout  *flowlog.Writer // shared by all sandboxes; nil: off
	since   time.Time
	adopted bool
	// lingering: its container is gone, and processes are left in its
	// namespace (linger). Under Daemon.mu, as att is.
	lingering bool
	// links guards interfaces added to its namespace since.
	links *linkWatch

	flows, allowed, denied, up, down atomic.Uint64
}

// idleGrace is how long an ExitWhenIdle daemon waits for its first
// sandbox.
const idleGrace = 30 * time.Second

// removeSocket removes what an earlier daemon left at path: a socket, never
// another file the path happens to name (--socket /etc/passwd, a typo).
func removeSocket(path string) error {
	st, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if st.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("socket path %s exists and is not a socket", path)
	}
	return os.Remove(path)
}

// Run serves until ctx ends, calling ready once the socket accepts
// calls. Stopping keeps every sandbox's record and TUN: the next daemon
// re-adopts them.
func Run(ctx context.Context, cfg Config, ready func()) error {
	if cfg.Socket == "" {
		cfg.Socket = api.DefaultSocket
	}
	if cfg.StateDir == "" {
		cfg.StateDir = api.DefaultStateDir
	}
	if cfg.Logf == nil {
		cfg.Logf = func(string, ...any) {}
	}
	if cfg.MaxFlows == 0 {
		cfg.MaxFlows = halfEphemeralPorts()
	}
	d := &Daemon{cfg: cfg, sandboxes: map[string]*sandbox{}, buffers: engine.NewBufferBudget(nodeBufferBudget), flows: engine.NewFlowBudget(cfg.MaxFlows)}
	d.ctx, d.cancel = context.WithCancel(ctx)
	defer d.cancel()

	if err := os.MkdirAll(d.recordDir(), 0o700); err != nil {
		return fmt.Errorf("creating state directory: %w", err)
	}
	os.Chmod(cfg.StateDir, 0o700)
	lock, err := lockFile(filepath.Join(cfg.StateDir, "daemon.lock"))
	if err != nil {
		return err
	}
	defer lock.Close()
	if cfg.FlowLogDir != "" {
		if err := os.MkdirAll(cfg.FlowLogDir, 0o700); err != nil {
			return fmt.Errorf("creating flow log directory: %w", err)
		}
	}
	if cfg.FlowLogStdout {
		d.stdout = flowlog.NewWriter(cfg.Stdout)
		defer d.stdout.Close()
	}
	if !procnet.SeesEveryProcess() {
		cfg.Logf("warning: this daemon is not in the host's PID namespace: it cannot reach the OCI hook's containers (named by host pids), nor tell whether processes are left in a sandbox's namespace; run it in the host's")
	}
	d.adoptAll()
	d.buryTombstones()
	d.pruneFlowLogs()
	if watcher, err := nftwatch.New(); err != nil {
		cfg.Logf("host guards will not be put back if deleted: %v", err)
	} else {
		go d.keepGuards(watcher)
	}

	if err := removeSocket(cfg.Socket); err != nil {
		return err
	}
	if err := os.MkdirAll(filepath.Dir(cfg.Socket), 0o700); err != nil {
		return fmt.Errorf("creating socket directory: %w", err)
	}
	ln, err := net.Listen("unix", cfg.Socket)
	if err != nil {
		return fmt.Errorf("listening on %s: %w", cfg.Socket, err)
	}
	defer removeSocket(cfg.Socket)
	// Root only: attaching a TUN is a root operation, and the list shows
	// every sandbox's policy.
	if err := os.Chmod(cfg.Socket, 0o600); err != nil {
		ln.Close()
		return fmt.Errorf("chmod %s: %w", cfg.Socket, err)
	}
	if cfg.MetricsAddr != "" {
		stop, err := d.serveMetrics(cfg.MetricsAddr)
		if err != nil {
			ln.Close()
			return err
		}
		defer stop()
	}
	go func() { <-d.ctx.Done(); ln.Close() }()
	if cfg.ExitWhenIdle {
		time.AfterFunc(idleGrace, d.exitIfIdle)
	}
	go d.reapLoop()
	if ready != nil {
		ready()
	}
	cfg.Logf("serving on %s with %d sandbox(es)", cfg.Socket, d.count())
	var wg sync.WaitGroup
	for {
		// Out of descriptors (a sandbox's many flows) is no reason to
		// stop serving, and so every sandbox.
		c, err := accept.Next(d.ctx, ln)
		if err != nil {
			break
		}
		wg.Add(1)
		go func() { defer wg.Done(); d.serve(c.(*net.UnixConn)) }()
	}
	wg.Wait()
	d.stopAll()
	return nil
}

// lockFile keeps two daemons off one state directory.
func lockFile(path string) (*os.File, error) {
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE|unix.O_NOFOLLOW, 0o600)
	if err != nil {
		return nil, fmt.Errorf("opening %s: %w", path, err)
	}
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		f.Close()
		return nil, fmt.Errorf("another childflow daemon is running on this state directory (%s is locked)", path)
	}
	return f, nil
}

func (d *Daemon) serve(c *net.UnixConn) {
	defer c.Close()
	c.SetDeadline(time.Now().Add(60 * time.Second))
	line, files, err := api.ReadMessage(c)
	defer func() {
		for _, f := range files {
			if f != nil {
				f.Close()
			}
		}
	}()
	if err != nil {
		d.cfg.Logf("reading a request: %v", err)
		return
	}
	var req api.Request
	resp := api.Response{OK: true}
	if err := json.Unmarshal(line, &req); err != nil {
		resp = failure(policy.Usagef("bad request: %v", err))
	} else {
		switch req.Op {
		case api.OpAttach:
			if req.Attach == nil || len(files) != 1 {
				resp = failure(policy.Usagef("attach needs one attachment and exactly one TUN fd, got %d fd(s)", len(files)))
				break
			}
			tunFile := files[0]
			files[0] = nil // the engine owns it now, or attach closed it
			if err := d.attach(*req.Attach, tunFile, false); err != nil {
				resp = failure(err)
			}
		case api.OpDetach:
			if err := d.detach(req.ID); err != nil {
				resp = failure(err)
			}
		case api.OpJoin:
			if req.Attach == nil {
				resp = failure(policy.Usagef("join needs an attachment"))
			} else if st, err := d.join(*req.Attach); err != nil {
				resp = failure(err)
			} else {
				resp.Sandboxes = []api.Status{st}
			}
		case api.OpList, api.OpStatus:
			resp.Sandboxes = d.list(req.ID)
			if req.Op == api.OpStatus && len(resp.Sandboxes) == 0 {
				resp = failure(fmt.Errorf("no sandbox %q", req.ID))
			}
		default:
			resp = failure(policy.Usagef("unknown op %q", req.Op))
		}
	}
	out, _ := json.Marshal(resp)
	c.Write(append(out, '\n'))
}

func failure(err error) api.Response {
	var u *policy.UsageError
	return api.Response{Error: err.Error(), Usage: errors.As(err, &u)}
}

// attach starts an engine for a; it owns link from here on. adopted
// means a comes from a record of an earlier daemon.
func (d *Daemon) attach(a api.Attachment, link *os.File, adopted bool) (err error) {
	defer func() {
		if err != nil {
			link.Close()
		}
	}()
	if err := api.CheckID(a.ID); err != nil {
		return err
	}
	if a.Settings == nil {
		return policy.Usagef("sandbox %s: no settings", a.ID)
	}
	if isOwnNetns(a.NetnsInode) {
		return policy.Usagef("sandbox %s: %s is the daemon's own network namespace", a.ID, a.Netns)
	}
	set, err := api.ResolveContainer(a.Settings, func(key string) string { return "setting " + key })
	if err != nil {
		return err
	}
	if len(set.DNS) == 0 {
		set.DNS = d.cfg.DNS
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if old, ok := d.sandboxes[a.ID]; ok {
		if old.att.NetnsInode == a.NetnsInode {
			link.Close() // a repeated attach of the same sandbox: already served
			return nil
		}
		return fmt.Errorf("sandbox %s is already attached to another network namespace (%s)", a.ID, old.att.Netns)
	}
	if !adopted {
		if err := d.writeRecord(a); err != nil {
			return err
		}
		defer func() {
			if err != nil {
				os.Remove(d.recordPath(a.ID))
			}
		}()
	}
	netns, err := tunns.OpenNetns(a.Netns, a.NetnsInode)
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			netns.Close()
		}
	}()
	sb := &sandbox{att: a, netns: netns, since: time.Now(), adopted: adopted, stdout: d.stdout}
	if d.cfg.FlowLogDir != "" {
		sb.logPath = filepath.Join(d.cfg.FlowLogDir, a.ID+".jsonl")
		o := flowlog.Options{Append: adopted, MaxSize: d.cfg.FlowLogMaxSize, Keep: d.cfg.FlowLogKeep}
		if sb.log, err = flowlog.Open(sb.logPath, o); err != nil {
			return err
		}
		defer func() {
			if err != nil {
				sb.log.Close()
			}
		}()
	}
	cfg := engine.Config{
		ID: a.ID, Link: link, Plan: a.Plan, Policy: set.Policy, DNS: set.DNS, Hosts: dns.ParseHosts(strings.NewReader(a.Hosts)), Proxy: proxy.FromURI(set.Proxy, set.ProxyInsecure),
		OnEvent: sb.record, Buffers: d.buffers, Flows: d.flows,
	}
	if sb.log != nil || sb.stdout != nil {
		// Only a flow log names processes (metrics do not), and finding
		// one is on each new flow's way: among the processes in the
		// namespace, through a sock_diag socket of its own (the engine
		// closes it); without one, among the container init's
		// descendants, if known.
		cfg.SandboxPID = a.PID
		if diag, derr := tunns.SockDiagIn(a.Netns); derr != nil {
			d.cfg.Logf("%s: flows not attributed to processes: %v", a.ID, derr)
		} else {
			cfg.SandboxNetns, cfg.SocketDiag = a.NetnsInode, diag
			defer func() {
				if err != nil {
					diag.Close()
				}
			}()
		}
	}
	if sb.links, err = d.watchLinks(sb); err != nil {
		return err
	}
	defer func() {
		if err != nil {
			sb.links.stop()
		}
	}()
	eng, err := engine.New(cfg)
	if err != nil {
		return err
	}
	if err := eng.Start(d.ctx); err != nil {
		return fmt.Errorf("starting engine for %s: %w", a.ID, err)
	}
	sb.eng = eng
	d.sandboxes[a.ID] = sb
	d.cfg.Logf("attached %s (netns %s, adopted %v)", a.ID, a.Netns, adopted)
	return nil
}

// record counts ev for metrics and writes it to the flow log.
func (sb *sandbox) record(ev flowlog.Event) {
	ev.PodNamespace, ev.PodName, ev.PodUID = sb.att.Labels["pod_namespace"], sb.att.Labels["pod_name"], sb.att.Labels["pod_uid"]
	switch ev.Event {
	case flowlog.ConnectAttempt:
		sb.flows.Add(1)
		if ev.Verdict == "allow" {
			sb.allowed.Add(1)
		} else {
			sb.denied.Add(1)
		}
	case flowlog.FlowEnd:
		sb.up.Add(uint64(ev.BytesUp))
		sb.down.Add(uint64(ev.BytesDown))
	}
	if sb.log != nil {
		sb.log.Log(ev)
	}
	if sb.stdout != nil {
		sb.stdout.Log(ev)
	}
}

// join admits a container into the sandbox that holds its network
// namespace (the pod's other containers, a container run in another's
// network): it shares that sandbox and its policy, so it must ask for the
// same. Nothing is recorded for it: the sandbox stays its holder's, whose
// detach ends it, and the container's own detach finds nothing.
func (d *Daemon) join(a api.Attachment) (api.Status, error) {
	if err := api.CheckID(a.ID); err != nil {
		return api.Status{}, err
	}
	d.mu.Lock()
	var holder *sandbox
	for _, sb := range d.sandboxes {
		if sb.att.NetnsInode == a.NetnsInode {
			holder = sb
			break
		}
	}
	d.mu.Unlock()
	if holder == nil {
		return api.Status{}, fmt.Errorf("%s has childflow's interface, but no sandbox of this daemon holds it", a.Netns)
	}
	if !sameSettings(holder.att.Settings, a.Settings) {
		return api.Status{}, policy.Usagef("its network namespace is sandbox %s's, which has another policy: containers that share a network namespace share its sandbox, and must ask for the same childflow.dev/ settings or none", holder.att.ID)
	}
	st := d.list(holder.att.ID)
	if len(st) != 1 {
		return api.Status{}, fmt.Errorf("sandbox %s was detached meanwhile", holder.att.ID)
	}
	return st[0], nil
}

// sameSettings compares two containers' settings as the policies they
// make (profile.Canonical).
func sameSettings(a, b *profile.Profile) bool {
	x, errA := json.Marshal(a.Canonical())
	y, errB := json.Marshal(b.Canonical())
	return errA == nil && errB == nil && bytes.Equal(x, y)
}

// detach stops a sandbox and removes its TUN, record and host guards.
// Unknown ids succeed: poststop and CNI DEL may come more than once. A
// container's sandbox whose namespace still holds processes lingers
// instead (linger).
func (d *Daemon) detach(id string) error {
	if err := api.CheckID(id); err != nil {
		return err
	}
	d.mu.Lock()
	sb := d.sandboxes[id]
	d.mu.Unlock()
	if sb != nil && sb.att.Source != api.SourceCNI {
		if pid, _ := procnet.AProcessIn(sb.att.NetnsInode); d.linger(sb, pid) {
			return nil
		}
	}
	return d.detachIf(id, nil)
}

// detachIf detaches id if it is still only (nil: whatever it is now).
func (d *Daemon) detachIf(id string, only *sandbox) error {
	if err := api.CheckID(id); err != nil {
		return err
	}
	d.mu.Lock()
	sb := d.sandboxes[id]
	if only != nil && sb != only {
		d.mu.Unlock()
		return nil // detached, and maybe attached again, meanwhile
	}
	delete(d.sandboxes, id)
	left := len(d.sandboxes)
	var a api.Attachment
	var lingering bool
	if sb != nil {
		a, lingering = sb.att, sb.lingering
	}
	d.mu.Unlock()
	var netns *os.File
	if sb != nil {
		if only == nil && !lingering {
			// Detached by its runtime, once the container has exited:
			// what it sent before is relayed first. (The reaper's
			// sandboxes have lost their namespace or its last process:
			// nothing is coming.)
			sb.eng.Linger(engine.LingerMax)
		}
		if err := sb.stop(); err != nil {
			d.cfg.Logf("sandbox %s: flow log: %v", id, err)
		}
		netns = sb.netns
		defer netns.Close()
	} else if rec, err := d.readRecord(id); err == nil {
		a = rec
	} else {
		d.forgetGuard(id) // detached before, or never attached (a joined container)
		return nil
	}
	kept, err := removeLink(a, netns)
	if err != nil {
		return fmt.Errorf("removing %s of sandbox %s: %w", a.Plan.Interface, id, err)
	}
	switch {
	case kept && a.Source != api.SourceCNI:
		// A process that entered since linger looked: fail closed. The
		// record stays for the next daemon, or childflow cleanup, which
		// adopt or drop it by what is left then.
		d.cfg.Logf("sandbox %s: processes are left in its network namespace: its %s, steering, host guards and record stay, and nothing they send leaves", id, a.Plan.Interface)
	case kept:
		d.cfg.Logf("sandbox %s: processes are left in its network namespace: its %s and steering stay, and nothing they send leaves", id, a.Plan.Interface)
		os.Remove(d.recordPath(id))
	default:
		d.forgetGuard(id)
		os.Remove(d.recordPath(id))
	}
	d.cfg.Logf("detached %s", id)
	d.pruneFlowLogs()
	if left == 0 && d.cfg.ExitWhenIdle {
		d.cancel()
	}
	return nil
}

// linger keeps a container's sandbox whose container is gone while
// processes are left in its namespace (containers that joined it, a
// podman pod's infra container, a process that entered it): they keep
// its policy, TUN, steering and host guards, which would otherwise leave
// them a TUN nothing reads and, once the guards went, a way around the
// sandbox through the namespace's veth. It ends when they are gone
// (reapLoop). Its record is moved to one of them, so that a restarted
// daemon finds the namespace. A pod's sandbox (childflow-cni) ends at
// CNI DEL: its namespace is the runtime's. pid is a process left in the
// namespace, 0 if none; linger says whether sb lingers.
func (d *Daemon) linger(sb *sandbox, pid int) bool {
	// A daemon that cannot see the namespace's processes (a PID
	// namespace of its own) finds none, and cannot tell when they are
	// gone: it ends the sandbox, and removeLink keeps the TUN and
	// steering.
	if pid == 0 || sb.att.Source == api.SourceCNI {
		return false
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.sandboxes[sb.att.ID] != sb {
		return true // ended meanwhile
	}
	if !sb.lingering {
		d.cfg.Logf("sandbox %s: its container is gone, and processes are left in its network namespace: it serves them until they are gone", sb.att.ID)
	}
	sb.lingering = true
	if pid != sb.att.PID {
		a := movedTo(sb.att, pid)
		if err := d.writeRecord(a); err != nil {
			d.cfg.Logf("sandbox %s: %v", a.ID, err)
		} else {
			// Field by field: the engine reads the others unlocked.
			sb.att.Netns, sb.att.PID = a.Netns, a.PID
		}
	}
	return true
}

// removeLink deletes the sandbox's TUN and steering if its namespace is
// still the recorded one (reached through netns where held) and no
// process is left in it. Processes left (containers that joined the
// sandbox) keep both: the steering would hand them the namespace's other
// interfaces back, and the TUN, which nothing reads now, keeps their
// traffic in. kept says so.
func removeLink(a api.Attachment, netns *os.File) (kept bool, err error) {
	path := a.Netns
	if netns != nil {
		path = fmt.Sprintf("/proc/self/fd/%d", netns.Fd())
	}
	if ino, err := tunns.NetnsInode(path); err != nil || ino != a.NetnsInode || isOwnNetns(ino) {
		return false, nil // the namespace is gone, and the TUN with it
	}
	if procnet.Occupied(a.NetnsInode) {
		return true, nil
	}
	return false, tunns.DeleteIn(path, a.Plan.Interface)
}

// isOwnNetns guards the host: the daemon never configures or cleans up
// its own namespace as if it were a sandbox's.
func isOwnNetns(ino uint64) bool {
	self, err := tunns.NetnsInode("/proc/self/ns/net")
	return err != nil || self == ino
}

// stop closes the sandbox's engine and flow log; the error is the flow
// log's (a full disk cut it short).
func (sb *sandbox) stop() error {
	sb.links.stop()
	sb.eng.Close()
	if sb.log != nil {
		return sb.log.Close()
	}
	return nil
}

func (d *Daemon) stopAll() {
	d.mu.Lock()
	defer d.mu.Unlock()
	for id, sb := range d.sandboxes {
		if err := sb.stop(); err != nil {
			d.cfg.Logf("sandbox %s: flow log: %v", id, err)
		}
		sb.netns.Close()
		delete(d.sandboxes, id)
	}
}

func (d *Daemon) count() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.sandboxes)
}

// reapInterval is how often sandboxes are checked for a namespace that
// went away without a detach (a runtime that failed after the hook ran,
// a killed pod without CNI DEL).
const reapInterval = 2 * time.Second

func (d *Daemon) reapLoop() {
	t := time.NewTicker(reapInterval)
	defer t.Stop()
	for {
		select {
		case <-d.ctx.Done():
			return
		case <-t.C:
		}
		d.mu.Lock()
		var lost []*sandbox
		for _, sb := range d.sandboxes {
			if sb.lingering || gone(sb.att) {
				lost = append(lost, sb)
			}
		}
		d.mu.Unlock()
		if len(lost) == 0 {
			continue
		}
		residents := procnet.AProcessInEach() // one walk of /proc for them all
		for _, sb := range lost {
			if d.linger(sb, residents[sb.att.NetnsInode]) {
				continue // processes are left: see again next time
			}
			d.cfg.Logf("sandbox %s: its network namespace is gone, or no process is left in it", sb.att.ID)
			d.detachIf(sb.att.ID, sb)
		}
	}
}

func (d *Daemon) exitIfIdle() {
	if d.count() == 0 {
		d.cfg.Logf("no sandbox attached within %s: exiting", idleGrace)
		d.cancel()
	}
}

// list returns the status of one sandbox (id) or all (id empty).
func (d *Daemon) list(id string) []api.Status {
	d.mu.Lock()
	out := []api.Status{}
	for _, sb := range d.sandboxes {
		if id != "" && sb.att.ID != id {
			continue
		}
		out = append(out, api.Status{
			ID: sb.att.ID, Netns: sb.att.Netns, NetnsInode: sb.att.NetnsInode, Labels: sb.att.Labels, PID: sb.att.PID, Plan: sb.att.Plan, Source: sb.att.Source,
			Since: sb.since, Adopted: sb.adopted, Lingering: sb.lingering, FlowLog: sb.logPath,
			Flows: sb.flows.Load(), Allowed: sb.allowed.Load(), Denied: sb.denied.Load(),
			BytesUp: sb.up.Load(), BytesDown: sb.down.Load(),
		})
	}
	d.mu.Unlock()
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	guards := steer.Guards{Dir: d.cfg.StateDir}
	for i := range out {
		out[i].Guarded = guards.Recorded(out[i].ID) // a file's stat: not under the lock
	}
	return out
}
