package nftexpr

import (
	"errors"
	"os"
	"runtime"
	"strings"
	"testing"

	"github.com/google/nftables"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// A transaction the kernel refuses at its first message refuses the rest
// too, one error each: the error stays one line, and still says why.
func TestARefusedTransactionIsOneLine(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for a network namespace")
	}
	runtime.LockOSThread() // never unlocked: the thread goes with the namespace
	if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
		t.Fatal(err)
	}
	c, err := nftables.New()
	if err != nil {
		t.Fatal(err)
	}
	// Rules for a chain of a table that does not exist.
	table := &nftables.Table{Family: nftables.TableFamilyINet, Name: "missing"}
	chain := &nftables.Chain{Table: table, Name: "missing"}
	for range 5 {
		c.AddRule(&nftables.Rule{Table: table, Chain: chain, Exprs: []expr.Any{&expr.Counter{}}})
	}
	err = Flush(c)
	if err == nil || strings.Contains(err.Error(), "\n") || !strings.HasSuffix(err.Error(), "(and 4 more errors)") || !errors.Is(err, unix.ENOENT) {
		t.Fatalf("got %q, want one line ending in (and 4 more errors), ENOENT", err)
	}
}
