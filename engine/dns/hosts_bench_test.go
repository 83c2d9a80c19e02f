package dns

import (
	"bytes"
	"fmt"
	"strings"
	"testing"
)

func BenchmarkParseHostsBlocklist(b *testing.B) {
	var sb strings.Builder
	for i := range 150000 {
		fmt.Fprintf(&sb, "0.0.0.0 ads%d.tracker-network.example\n", i)
	}
	data := []byte(sb.String())
	b.SetBytes(int64(len(data)))
	for b.Loop() {
		ParseHosts(bytes.NewReader(data))
	}
}
