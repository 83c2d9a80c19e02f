// Package api is the node daemon's socket protocol and its client. The
// OCI hook and the CNI plugin use it; it must not import gVisor so that
// they start fast.
//
// One request per connection: a JSON object on one line, answered by one
// JSON line. An attach request carries the sandbox's TUN fd (SCM_RIGHTS)
// with its first byte.
package api

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"

	"github.com/childflow/childflow/internal/fdpass"
	"github.com/childflow/childflow/internal/netplan"
	"github.com/childflow/childflow/policy"
	"github.com/childflow/childflow/policy/profile"
)

// Default locations on a node.
const (
	DefaultSocket   = "/run/childflow/engine.sock"
	DefaultStateDir = "/run/childflow"
	// TombstoneDir (under the state directory) holds the ids of sandboxes
	// detached while the daemon was down; it detaches them at start.
	TombstoneDir = "detached"
	// RecordDir (under the state directory) holds a record of each
	// attached sandbox (RecordPath), for a restarted daemon.
	RecordDir = "sandboxes"
)

// RecordPath is where the daemon on stateDir records sandbox id.
func RecordPath(stateDir, id string) string {
	return filepath.Join(stateDir, RecordDir, id+".json")
}

// ReadRecord reads the record of sandbox id under stateDir.
func ReadRecord(stateDir, id string) (Attachment, error) {
	var a Attachment
	b, err := os.ReadFile(RecordPath(stateDir, id))
	if err != nil {
		return a, err
	}
	if err := json.Unmarshal(b, &a); err != nil {
		return a, fmt.Errorf("reading record of sandbox %s: %w", id, err)
	}
	return a, nil
}

// Operations.
const (
	OpAttach = "attach"
	OpDetach = "detach"
	OpList   = "list"
	OpStatus = "status"
	// OpJoin admits a container into the sandbox that already holds its
	// network namespace, if it asks for the same settings.
	OpJoin = "join"
)

// Request is one call.
type Request struct {
	Op     string      `json:"op"`
	ID     string      `json:"id,omitempty"`
	Attach *Attachment `json:"attach,omitempty"`
}

// Attachment is everything the daemon needs to relay one sandbox, and
// what it records under its state directory to re-adopt the sandbox
// after a restart.
type Attachment struct {
	ID string `json:"id"`
	// Netns is the sandbox's network namespace as a host path
	// (/proc/PID/ns/net, /var/run/netns/NAME); NetnsInode tells it apart
	// from whatever reuses the path later.
	Netns      string `json:"netns"`
	NetnsInode uint64 `json:"netns_inode"`
	// PID is a process inside the sandbox, for naming flows' processes.
	PID  int          `json:"pid,omitempty"`
	Plan netplan.Plan `json:"plan"`
	// Settings is the sandbox's policy, resolvers and proxy in profile
	// form; Source says who produced it (SourceHook, SourceCNI).
	Settings *profile.Profile `json:"settings"`
	Source   string           `json:"source,omitempty"`
	// Labels name the sandbox in its flow log and metrics
	// (pod_namespace, pod_name, pod_uid).
	Labels map[string]string `json:"labels,omitempty"`
	// Hosts is the sandbox's hosts file (dns.ParseHosts): flows to the
	// addresses it names carry those names.
	Hosts string `json:"hosts,omitempty"`
	// Keep are the destinations that stay on the namespace's other
	// interfaces (a pod's clusterCIDRs): so they do on one added later.
	Keep []netip.Prefix `json:"keep,omitempty"`
}

// Who attached a sandbox: the OCI hook (a container, through any
// runtime) or childflow-cni (a pod, whose namespace the runtime owns).
const (
	SourceHook = "oci-hook"
	SourceCNI  = "cni"
)

// CheckID rejects ids that cannot name files under the state directory.
// (No regexp: compiling one costs the hook a millisecond at start.)
func CheckID(id string) error {
	valid := len(id) > 0 && len(id) <= 128 && id[0] != '.' && id[0] != '-' && id[0] != '_'
	for _, c := range id {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_' || c == '.' || c == '-') {
			valid = false
		}
	}
	if !valid {
		return policy.Usagef("invalid sandbox id %q: want 1-128 of [A-Za-z0-9_.-], not starting with a dot or dash", id)
	}
	return nil
}

// Status describes one attached sandbox.
type Status struct {
	ID         string       `json:"id"`
	Netns      string       `json:"netns"`
	NetnsInode uint64       `json:"netns_inode"`
	PID        int          `json:"pid,omitempty"`
	Plan       netplan.Plan `json:"plan"`
	Source     string       `json:"source,omitempty"`
	// Guarded: its other interface is guarded from the host (a host
	// guard under the daemon's state directory, the CNI plugin's or
	// the hook's), so its capabilities cannot send around it.
	Guarded bool              `json:"guarded,omitempty"`
	Labels  map[string]string `json:"labels,omitempty"`
	Since   time.Time         `json:"since"`
	Adopted bool              `json:"adopted,omitempty"` // re-adopted after a daemon restart
	// Lingering: its container is gone, and it serves the processes
	// left in its namespace until they go (Daemon.linger).
	Lingering bool   `json:"lingering,omitempty"`
	FlowLog   string `json:"flow_log,omitempty"`
	Flows     uint64 `json:"flows"`
	Allowed   uint64 `json:"allowed"`
	Denied    uint64 `json:"denied"`
	BytesUp   uint64 `json:"bytes_up"`
	BytesDown uint64 `json:"bytes_down"`
}

// Response answers a Request. Usage is set when the request itself was
// wrong (a bad policy): the caller should not retry.
type Response struct {
	OK        bool     `json:"ok"`
	Error     string   `json:"error,omitempty"`
	Usage     bool     `json:"usage,omitempty"`
	Sandboxes []Status `json:"sandboxes,omitempty"`
}

// maxMessage bounds a request: policies are small.
const maxMessage = 4 << 20

// Client calls a daemon.
type Client struct {
	Socket  string
	Timeout time.Duration // whole call; zero: 30 s
}

// Attach hands the sandbox's TUN to the daemon and returns once its
// engine runs.
func (c Client) Attach(a *Attachment, tun *os.File) error {
	_, err := c.call(Request{Op: OpAttach, ID: a.ID, Attach: a}, tun)
	return err
}

// Detach stops a sandbox's engine and removes its TUN and record. It
// succeeds when the daemon does not know the id.
func (c Client) Detach(id string) error {
	_, err := c.call(Request{Op: OpDetach, ID: id}, nil)
	return err
}

// Join asks to admit a container (a.ID, its namespace's inode and its
// settings) into the sandbox that holds that namespace, and returns that
// sandbox's status. It fails if no sandbox holds it or if the sandbox's
// settings differ.
func (c Client) Join(a *Attachment) (Status, error) {
	r, err := c.call(Request{Op: OpJoin, ID: a.ID, Attach: a}, nil)
	if err == nil && len(r.Sandboxes) != 1 {
		err = fmt.Errorf("joining sandbox: the daemon answered with %d sandboxes", len(r.Sandboxes))
	}
	if err != nil {
		return Status{}, err
	}
	return r.Sandboxes[0], nil
}

// List returns every attached sandbox.
func (c Client) List() ([]Status, error) {
	r, err := c.call(Request{Op: OpList}, nil)
	return r.Sandboxes, err
}

// Status returns one sandbox's status.
func (c Client) Status(id string) (Status, error) {
	r, err := c.call(Request{Op: OpStatus, ID: id}, nil)
	if err != nil {
		return Status{}, err
	}
	if len(r.Sandboxes) != 1 {
		return Status{}, fmt.Errorf("no sandbox %q", id)
	}
	return r.Sandboxes[0], nil
}

// ErrUnavailable wraps failures to reach the daemon at all.
var ErrUnavailable = errors.New("childflow daemon unavailable")

func (c Client) call(req Request, fd *os.File) (Response, error) {
	var resp Response
	timeout := c.Timeout
	if timeout == 0 {
		timeout = 30 * time.Second
	}
	conn, err := net.DialTimeout("unix", c.Socket, timeout)
	if err != nil {
		return resp, fmt.Errorf("%w: %v", ErrUnavailable, err)
	}
	defer conn.Close()
	uc := conn.(*net.UnixConn)
	uc.SetDeadline(time.Now().Add(timeout))
	msg, err := json.Marshal(req)
	if err != nil {
		return resp, err
	}
	msg = append(msg, '\n')
	if err := WriteMessage(uc, msg, fd); err != nil {
		return resp, fmt.Errorf("sending %s to %s: %w", req.Op, c.Socket, err)
	}
	line, _, err := ReadMessage(uc)
	if err != nil {
		return resp, fmt.Errorf("reading the daemon's answer to %s: %w", req.Op, err)
	}
	if err := json.Unmarshal(line, &resp); err != nil {
		return resp, fmt.Errorf("decoding the daemon's answer to %s: %w", req.Op, err)
	}
	if !resp.OK {
		if resp.Usage {
			return resp, policy.Usagef("%s", resp.Error)
		}
		return resp, errors.New(resp.Error)
	}
	return resp, nil
}

// WriteMessage sends msg, with fd (if any) attached to its first byte.
func WriteMessage(c *net.UnixConn, msg []byte, fd *os.File) error {
	if fd == nil {
		_, err := c.Write(msg)
		return err
	}
	var oob []byte
	rc, err := fd.SyscallConn()
	if err != nil {
		return err
	}
	rc.Control(func(f uintptr) { oob = unix.UnixRights(int(f)) })
	n, _, err := c.WriteMsgUnix(msg, oob, nil)
	if err != nil || n == len(msg) {
		// Nothing left: a zero-length write would fail with EPIPE once
		// the daemon has answered and closed.
		return err
	}
	_, err = c.Write(msg[n:])
	return err
}

// ReadMessage reads one line and the fds that came with it.
func ReadMessage(c *net.UnixConn) (line []byte, files []*os.File, err error) {
	buf := make([]byte, 64<<10)
	// Room for a few fds: more than one is a protocol error the daemon
	// answers, not a leak.
	oob := make([]byte, fdpass.Space(4))
	n, oobn, _, _, err := c.ReadMsgUnix(buf, oob)
	if oobn > 0 {
		files, _ = fdpass.Files(oob[:oobn])
	}
	data := append([]byte(nil), buf[:n]...)
	for err == nil && !bytes.Contains(data, []byte("\n")) {
		if len(data) > maxMessage {
			err = errors.New("message too long")
			break
		}
		n, err = c.Read(buf)
		data = append(data, buf[:n]...)
	}
	if i := bytes.IndexByte(data, '\n'); i >= 0 {
		return data[:i], files, nil
	}
	for _, f := range files {
		f.Close()
	}
	if err == nil {
		err = errors.New("empty message")
	}
	return nil, nil, err
}
