package cli

import (
	"io"
	"net"
	"path/filepath"
	"strings"

	"gvisor.dev/gvisor/pkg/buffer"

	"github.com/childflow/childflow/engine/capture"
	"github.com/childflow/childflow/engine/upstream"
	"github.com/childflow/childflow/internal/asuser"
	"github.com/childflow/childflow/policy"
)

// captures are the pcapng files of -c/--capture for one -C/--capture-point:
// child (the sandbox's cf0), egress (the host side of the same flows, on
// every host interface), wire-egress (the same, leaving out loopback:
// what crosses a wire), or both (<stem>.child.pcapng and
// <stem>.egress.pcapng).
type captures struct {
	// link, with --root, is the child view's file: it is captured on the
	// host end of the sandbox's veth once that exists (startLink).
	link     *capture.Writer
	child    func(outbound bool, packet buffer.Buffer)
	upstream upstream.Func
	closers  []func(io.Writer)
	paths    []string // the files, hidden from the sandbox
	flag     string   // what named them, for errors
	// dropped counts the packets the closed files could not keep up with;
	// failed holds the errors of those that could not be written.
	dropped uint64
	failed  []error
}

// capturePaths are the files -c path writes at -C point.
func capturePaths(path, point string) []string {
	switch {
	case path == "":
		return nil
	case point == "both":
		stem := strings.TrimSuffix(strings.TrimSuffix(path, filepath.Ext(path)), ".pcap")
		return []string{stem + ".child.pcapng", stem + ".egress.pcapng"}
	}
	return []string{path}
}

// openCaptures creates the files for a point already checked; name says
// what set a flag, for errors (execOptions.name).
func openCaptures(caller *asuser.User, name func(flag string) string, path, point string, root, privileged bool) (c *captures, err error) {
	c = &captures{flag: name("capture")}
	if path == "" {
		return c, nil
	}
	defer func() {
		if err != nil {
			c.close(io.Discard)
		}
	}()
	if point != "child" && !privileged {
		return c, policy.Usagef("%s %s captures on the host's interfaces and needs root (run with sudo, or use child)", name("capture-point"), point)
	}
	childPath, hostPath, hostView := path, path, point
	if point == "both" {
		paths := capturePaths(path, point)
		childPath, hostPath, hostView = paths[0], paths[1], "egress"
	}
	if point == "child" || point == "both" {
		view := capture.View{Name: "child", Backend: "rootless", Interface: "cf0"}
		if root {
			view = capture.View{Name: "child", Backend: "root", Interface: "the host end of the sandbox's veth"}
		}
		w, err := asuser.Call(caller, func() (*capture.Writer, error) { return capture.Create(childPath, view) })
		if err != nil {
			return c, err
		}
		c.paths = append(c.paths, childPath)
		c.child = w.Packet
		if root {
			c.link = w
		}
		c.closers = append(c.closers, func(stderr io.Writer) { c.closeFile(w, stderr) })
	}
	if point != "child" {
		iface := "any"
		if hostView == "wire-egress" {
			iface = "any but loopback"
		}
		w, err := asuser.Call(caller, func() (*capture.Writer, error) {
			return capture.Create(hostPath, capture.View{Name: hostView, Backend: "rootless", Interface: iface})
		})
		if err != nil {
			return c, err
		}
		c.paths = append(c.paths, hostPath)
		tap, err := capture.StartHostTap(w, hostView == "wire-egress")
		if err != nil {
			w.Close()
			return c, err
		}
		c.upstream = tap.Upstream
		c.closers = append(c.closers, func(stderr io.Writer) {
			tap.Close()
			c.closeFile(w, stderr)
		})
	}
	return c, nil
}

// startLink starts the --root child view on the host end of the veth.
func (c *captures) startLink(ifname string) error {
	if c.link == nil {
		return nil
	}
	ifc, err := net.InterfaceByName(ifname)
	if err != nil {
		return err
	}
	tap, err := capture.StartLinkTap(c.link, ifc.Index)
	if err != nil {
		return err
	}
	// First to close: the tap stops writing before the file closes.
	c.closers = append([]func(io.Writer){func(io.Writer) { tap.Close() }}, c.closers...)
	return nil
}

func (c *captures) closeFile(w *capture.Writer, stderr io.Writer) {
	if err := closeReporting(w, c.flag, "packets", stderr); err != nil {
		c.failed = append(c.failed, err)
	}
	c.dropped += w.Dropped()
}

// close finishes every file once; later calls do nothing.
func (c *captures) close(stderr io.Writer) {
	for _, f := range c.closers {
		f(stderr)
	}
	c.closers = nil
}
