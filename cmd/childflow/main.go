// Command childflow runs a command tree in a network sandbox.
package main

import (
	"context"
	"fmt"
	"os"

	"github.com/childflow/childflow/internal/cli"
	"github.com/childflow/childflow/internal/sandbox"
)

func main() {
	if err := sandbox.NotSetid(); err != nil {
		fmt.Fprintln(os.Stderr, "childflow:", err)
		os.Exit(1)
	}
	if sandbox.IsInit() {
		sandbox.Init()
	}
	os.Exit(cli.Run(context.Background(), os.Args, os.Stdout, os.Stderr))
}
