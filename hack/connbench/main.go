// Command connbench measures the short-connection rate: N sequential
// connect / 1-byte echo / close cycles.
//
//	connbench serve ADDR
//	connbench client ADDR N
package main

import (
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"time"
)

func main() {
	if len(os.Args) < 3 {
		fmt.Fprintln(os.Stderr, "usage: connbench serve ADDR | connbench client ADDR N")
		os.Exit(2)
	}
	switch os.Args[1] {
	case "serve":
		ln, err := net.Listen("tcp", os.Args[2])
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		for {
			c, err := ln.Accept()
			if err != nil {
				continue
			}
			go func() {
				defer c.Close()
				b := make([]byte, 1)
				if _, err := io.ReadFull(c, b); err == nil {
					c.Write(b)
				}
			}()
		}
	case "client":
		n, _ := strconv.Atoi(os.Args[3])
		start := time.Now()
		b := []byte{'x'}
		var slowest time.Duration
		for i := 0; i < n; i++ {
			t0 := time.Now()
			c, err := net.DialTimeout("tcp", os.Args[2], 5*time.Second)
			if err != nil {
				fmt.Fprintf(os.Stderr, "connection %d: %v\n", i, err)
				os.Exit(1)
			}
			if _, err := c.Write(b); err != nil {
				fmt.Fprintln(os.Stderr, err)
				os.Exit(1)
			}
			if _, err := io.ReadFull(c, b); err != nil {
				fmt.Fprintln(os.Stderr, err)
				os.Exit(1)
			}
			c.Close()
			slowest = max(slowest, time.Since(t0))
		}
		fmt.Printf("%.0f\n", float64(n)/time.Since(start).Seconds())
		// A stall shows as one connection taking a SYN retransmission (1 s+).
		fmt.Fprintf(os.Stderr, "slowest connection: %v\n", slowest.Round(time.Millisecond))
	}
}
