// Command childflow runs a command tree in a network sandbox.
package main

import (
	"context"
	"os"

	"github.com/childflow/childflow/internal/cli"
	"github.com/childflow/childflow/internal/sandbox"
)

func main() {
	if sandbox.IsInit() {
		sandbox.Init()
	}
	os.Exit(cli.Run(context.Background(), os.Args, os.Stdout, os.Stderr))
}
