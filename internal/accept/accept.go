// Package accept takes connections from a listener that must outlive
// running out of descriptors.
package accept

import (
	"context"
	"errors"
	"net"
	"time"
)

// Next returns ln's next connection. An error other than ln's closing
// (EMFILE and ENFILE above all, which a sandbox holding connections can
// cause) is waited out rather than returned, until ctx ends: the
// listener is fine, and some connection will close.
func Next(ctx context.Context, ln net.Listener) (net.Conn, error) {
	for {
		c, err := ln.Accept()
		if err == nil || errors.Is(err, net.ErrClosed) {
			return c, err
		}
		select {
		case <-ctx.Done():
			return nil, err
		case <-time.After(10 * time.Millisecond):
		}
	}
}
