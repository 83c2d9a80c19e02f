// Package doctor checks what childflow needs on this host and says how to
// fix what is missing. `childflow --doctor` prints the report; exec fails
// with the first blocking finding's one-line reason.
package doctor

import (
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"github.com/childflow/childflow/internal/rootful"
)

// Status of one requirement.
type Status string

const (
	Available   Status = "available"
	Limited     Status = "limited"
	Unavailable Status = "unavailable"
)

// Check is one requirement.
type Check struct {
	Name     string `json:"name"`
	Status   Status `json:"status"`
	Detail   string `json:"detail"`
	Fix      string `json:"fix,omitempty"`
	Required bool   `json:"required"`
}

// Report is the whole result.
type Report struct {
	Overall  string  `json:"overall"` // ready, ready with warnings, blocked
	Rootless bool    `json:"rootless"`
	Checks   []Check `json:"checks"`
}

// Host is where the checks read from; tests point it elsewhere.
type Host struct {
	Proc    string // /proc
	DevTun  string // /dev/net/tun
	Resolv  string // /etc/resolv.conf
	Euid    int
	Egid    int
	CapEff  uint64 // the effective capabilities
	LookBin func(string) (string, error)
	// ForwardDrops names the host's forward chains that drop what
	// --root sandboxes send (rootful.ForwardDrops); nil: not looked at.
	ForwardDrops func() []string
	// Conntrack says whether conntrack answers over netlink, which --root
	// needs (rootful.ConntrackOverNetlink); nil: not looked at.
	Conntrack func() error
}

// Local is this machine.
func Local() Host {
	return Host{Proc: "/proc", DevTun: "/dev/net/tun", Resolv: "/etc/resolv.conf", Euid: os.Geteuid(), Egid: os.Getegid(), CapEff: effectiveCaps(), LookBin: exec.LookPath, ForwardDrops: rootful.ForwardDrops, Conntrack: rootful.ConntrackOverNetlink}
}

// Privileged reports whether this process builds a sandbox's namespaces
// without a user namespace of its own: root holding CAP_SYS_ADMIN and
// CAP_NET_ADMIN. Root without them (the command of another childflow, a
// restricted container) is treated as any other user.
func (h Host) Privileged() bool {
	return h.Euid == 0 && h.has(unix.CAP_SYS_ADMIN) && h.has(unix.CAP_NET_ADMIN)
}

func (h Host) has(capability int) bool { return h.CapEff&(1<<capability) != 0 }

func effectiveCaps() uint64 {
	hdr := unix.CapUserHeader{Version: unix.LINUX_CAPABILITY_VERSION_3}
	var data [2]unix.CapUserData
	if unix.Capget(&hdr, &data[0]) != nil {
		return 0
	}
	return uint64(data[1].Effective)<<32 | uint64(data[0].Effective)
}

// Run performs every check.
func (h Host) Run() Report {
	r := Report{Rootless: !h.Privileged()}
	r.Checks = []Check{h.userns(), h.tun(), h.resolvers(), h.ping(), h.uidmap(), h.nftables(), h.caps(), h.cgroups()}
	r.Overall = "ready"
	for _, c := range r.Checks {
		switch {
		case c.Status == Unavailable && c.Required:
			r.Overall = "blocked"
		case c.Status != Available && r.Overall == "ready":
			r.Overall = "ready with warnings"
		}
	}
	return r
}

// Preflight runs only the checks that can block a sandbox (user
// namespaces when rootless, /dev/net/tun, a resolv.conf to bind over):
// what exec needs at start-up; rootful, whose veth needs no TUN, only
// the last.
func (h Host) Preflight(rootful bool) error {
	if rootful {
		return Report{Checks: []Check{h.resolvers()}}.Blocking()
	}
	return Report{Checks: []Check{h.userns(), h.tun(), h.resolvers()}}.Blocking()
}

// Blocking returns the first required check that is unavailable, as the
// one-line reason exec fails with.
func (r Report) Blocking() error {
	for _, c := range r.Checks {
		if c.Required && c.Status == Unavailable {
			return fmt.Errorf("%s: %s (fix: %s)", c.Name, c.Detail, c.Fix)
		}
	}
	return nil
}

func (h Host) readInt(path string) (int, bool) {
	b, err := os.ReadFile(h.Proc + path)
	if err != nil {
		return 0, false
	}
	n, err := strconv.Atoi(strings.Fields(string(b) + " x")[0])
	return n, err == nil
}

func (h Host) userns() Check {
	c := Check{Name: "user namespaces", Required: !h.Privileged(), Status: Available}
	if h.Privileged() {
		c.Detail = "not needed: running as root"
		return c
	}
	// Since Linux 5.12 a user namespace that maps root needs CAP_SETFCAP
	// in its parent: without it root has no way to build a sandbox.
	if h.Euid == 0 && !h.has(unix.CAP_SETFCAP) {
		c.Status = Unavailable
		c.Detail = "root without CAP_SYS_ADMIN and CAP_NET_ADMIN needs a user namespace, and mapping root into one needs CAP_SETFCAP (inside another childflow sandbox, or a container that dropped them)"
		c.Fix = "run childflow as an ordinary user, or as root with its capabilities"
		return c
	}
	if n, ok := h.readInt("/sys/user/max_user_namespaces"); ok && n == 0 {
		c.Status, c.Detail, c.Fix = Unavailable, "user.max_user_namespaces is 0", "sysctl -w user.max_user_namespaces=15000"
		return c
	}
	if n, ok := h.readInt("/sys/kernel/unprivileged_userns_clone"); ok && n == 0 {
		c.Status, c.Detail, c.Fix = Unavailable, "kernel.unprivileged_userns_clone is 0", "sysctl -w kernel.unprivileged_userns_clone=1"
		return c
	}
	if n, ok := h.readInt("/sys/kernel/apparmor_restrict_unprivileged_userns"); ok && n == 1 {
		c.Status, c.Detail = Unavailable, "AppArmor restricts unprivileged user namespaces (kernel.apparmor_restrict_unprivileged_userns=1)"
		c.Fix = "add an AppArmor profile granting 'userns' to childflow, or sysctl -w kernel.apparmor_restrict_unprivileged_userns=0"
		return c
	}
	n, _ := h.readInt("/sys/user/max_user_namespaces")
	c.Detail = fmt.Sprintf("unprivileged user namespaces enabled (max_user_namespaces=%d)", n)
	return c
}

func (h Host) tun() Check {
	c := Check{Name: "/dev/net/tun", Required: true, Status: Available}
	var st unix.Stat_t
	if err := unix.Stat(h.DevTun, &st); err != nil {
		c.Status, c.Detail, c.Fix = Unavailable, fmt.Sprintf("%s is missing", h.DevTun), "modprobe tun, or mknod /dev/net/tun c 10 200 && chmod 0666 /dev/net/tun"
		return c
	}
	if st.Mode&unix.S_IFMT != unix.S_IFCHR {
		c.Status, c.Detail, c.Fix = Unavailable, fmt.Sprintf("%s is not a character device", h.DevTun), "mknod /dev/net/tun c 10 200"
		return c
	}
	mode := st.Mode & 0o777
	if !h.Privileged() && unix.Access(h.DevTun, unix.R_OK|unix.W_OK) != nil {
		c.Status = Unavailable
		c.Detail = fmt.Sprintf("%s is mode %04o owned by uid %d: this user (uid %d) cannot open it", h.DevTun, mode, st.Uid, h.Euid)
		c.Fix = "sudo chmod 0666 /dev/net/tun (the mode most distributions ship), or run childflow as root"
		return c
	}
	c.Detail = fmt.Sprintf("%s mode %04o, usable", h.DevTun, mode)
	return c
}

// Nameservers reads the nameserver lines of a resolv.conf.
func Nameservers(path string) []string {
	b, _ := os.ReadFile(path)
	return ParseNameservers(string(b))
}

// ParseNameservers returns the nameserver lines' addresses.
func ParseNameservers(resolvConf string) []string {
	var out []string
	for _, line := range strings.Split(resolvConf, "\n") {
		if fs := strings.Fields(line); len(fs) >= 2 && fs[0] == "nameserver" {
			out = append(out, fs[1])
		}
	}
	return out
}

func (h Host) resolvers() Check {
	c := Check{Name: "resolvers", Status: Available}
	// The sandbox's resolv.conf is bound over the host's: there must be
	// a file to bind over (a stopped systemd-resolved leaves its symlink
	// naming none), and childflow writes none on the host.
	if st, err := os.Stat(h.Resolv); err != nil || !st.Mode().IsRegular() {
		c.Required, c.Status = true, Unavailable
		c.Detail = fmt.Sprintf("%s is missing: the sandbox's own resolv.conf is bound over it", h.Resolv)
		if err == nil {
			c.Detail = fmt.Sprintf("%s is not a file: the sandbox's own resolv.conf is bound over it", h.Resolv)
		} else if target, err := os.Readlink(h.Resolv); err == nil {
			c.Detail = fmt.Sprintf("%s names %s, which is missing: the sandbox's own resolv.conf is bound over it", h.Resolv, target)
		}
		c.Fix = "start the host's resolver (systemctl start systemd-resolved), or create " + h.Resolv + " (with -d/--dns its content is not used)"
		return c
	}
	ns := Nameservers(h.Resolv)
	if len(ns) == 0 {
		c.Status, c.Detail, c.Fix = Limited, fmt.Sprintf("no nameserver in %s: names resolve only with --dns", h.Resolv), "pass -d/--dns ADDR"
		return c
	}
	c.Detail = "upstream resolvers " + strings.Join(ns, ", ")
	return c
}

func (h Host) ping() Check {
	c := Check{Name: "ICMP echo relay", Status: Available}
	if h.Privileged() {
		c.Detail = "raw ICMP sockets (root)"
		return c
	}
	b, _ := os.ReadFile(h.Proc + "/sys/net/ipv4/ping_group_range")
	f := strings.Fields(string(b))
	if len(f) == 2 {
		lo, _ := strconv.Atoi(f[0])
		hi, _ := strconv.Atoi(f[1])
		if lo <= h.Egid && h.Egid <= hi {
			c.Detail = "unprivileged ICMP echo sockets allowed for this group"
			return c
		}
	}
	c.Status = Limited
	c.Detail = fmt.Sprintf("net.ipv4.ping_group_range is %q: ping inside the sandbox gets no replies", strings.TrimSpace(string(b)))
	c.Fix = "sysctl -w net.ipv4.ping_group_range='0 2147483647'"
	return c
}

func (h Host) uidmap() Check {
	c := Check{Name: "uidmap helpers", Status: Available, Detail: "not needed: the sandbox maps only the caller's own uid and gid"}
	if _, err := h.LookBin("newuidmap"); err == nil {
		c.Detail = "newuidmap present (not needed: only the caller's own uid is mapped)"
	}
	return c
}

func (h Host) nftables() Check {
	c := Check{Name: "nftables", Status: Available, Detail: "only the --root backend uses nftables"}
	if !h.Privileged() {
		c.Status, c.Detail, c.Fix = Limited, "--root needs root privileges (nftables over netlink)", "run --root through sudo"
		return c
	}
	if h.Conntrack != nil {
		if err := h.Conntrack(); err != nil {
			c.Status = Limited
			c.Detail = fmt.Sprintf("conntrack does not answer over netlink (%v): --root, which removes a finished sandbox's connections from it, fails at the start", err)
			c.Fix = "modprobe nf_conntrack_netlink"
			return c
		}
	}
	if h.ForwardDrops != nil {
		if drops := h.ForwardDrops(); len(drops) > 0 {
			c.Status = Limited
			c.Detail = fmt.Sprintf("chain %s drops forwarded packets no rule accepts (Docker and ufw set iptables' FORWARD so): --root sandboxes reach nothing beyond the host", strings.Join(drops, ", "))
			c.Fix = "iptables -I FORWARD -i cfr+ -j ACCEPT; iptables -I FORWARD -o cfr+ -j ACCEPT (DOCKER-USER with Docker); childflow's own table still refuses what the policy denies"
		}
	}
	return c
}

func (h Host) caps() Check {
	c := Check{Name: "capabilities", Status: Available, Detail: fmt.Sprintf("effective %016x", h.CapEff)}
	if h.Euid == 0 && !h.Privileged() {
		c.Status, c.Fix = Limited, "root without CAP_SYS_ADMIN and CAP_NET_ADMIN gets the rootless backend and no --root: run outside a restricted container for them"
	}
	return c
}

func (h Host) cgroups() Check {
	c := Check{Name: "cgroups", Status: Available}
	var st unix.Statfs_t
	switch {
	case unix.Statfs("/sys/fs/cgroup", &st) == nil && st.Type == unix.CGROUP2_SUPER_MAGIC:
		c.Detail = "cgroup v2 unified hierarchy"
	case unix.Statfs("/sys/fs/cgroup/unified", &st) == nil && st.Type == unix.CGROUP2_SUPER_MAGIC:
		c.Detail = "hybrid: cgroup v1 with v2 at /sys/fs/cgroup/unified (not used by childflow exec)"
	default:
		c.Status, c.Detail = Limited, "no cgroup v2 hierarchy found (not used by childflow exec)"
	}
	return c
}

// Text renders the report for people.
func (r Report) Text() string {
	var b strings.Builder
	for _, c := range r.Checks {
		fmt.Fprintf(&b, "%-12s %-18s %s\n", c.Status, c.Name, c.Detail)
		if c.Fix != "" && c.Status != Available {
			fmt.Fprintf(&b, "%-12s %-18s fix: %s\n", "", "", c.Fix)
		}
	}
	mode := "rootless"
	if !r.Rootless {
		mode = "root"
	}
	fmt.Fprintf(&b, "overall: %s (%s)\n", r.Overall, mode)
	return b.String()
}
