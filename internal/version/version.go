// Package version is set at build time with -ldflags -X.
package version

// Version of childflow.
var Version = "0.1.0-dev"
