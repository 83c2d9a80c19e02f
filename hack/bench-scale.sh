#!/usr/bin/env bash
# make bench (scale): one node daemon with 100 pod sandboxes attached
# through childflow-cni, as containerd would attach them. Reports the
# daemon's memory per idle sandbox and one pod's throughput to the host
# (iperf3 on an address of a veth of its own, 198.18.0.1 from the
# benchmarking range) alone and while 99 others are attached. No traffic
# leaves the machine.
#
# Env: BENCH_PODS (100), BENCH_SECONDS (5), BENCH_OUT (docs/benchmarks-scale.md).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "bench: run as root (sudo make bench)" >&2; exit 1; }
PODS=${BENCH_PODS:-100}
T=${BENCH_SECONDS:-5}
OUT=${BENCH_OUT:-docs/benchmarks-scale.md}
work=$(mktemp -d /tmp/cfbench-scale.XXXXXX)
export CGO_ENABLED=0
for c in childflow childflow-cni; do go build -o "$work/$c" ./cmd/$c; done

pids=()
cleanup() {
	for i in $(seq "$PODS"); do cni DEL "$i" >/dev/null 2>&1 || true; ip netns del "cfscale-$i" 2>/dev/null || true; done
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	ip link del cfbench0 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT

"$work/childflow" daemon --socket "$work/engine.sock" --state-dir "$work/state" --flow-log-dir "" 2>"$work/daemon.log" &
daemon=$!
pids+=($daemon)
for _ in $(seq 100); do [ -S "$work/engine.sock" ] && break; sleep 0.05; done
# A pod's gateway does not lead to the node's loopback (only childflow
# exec's does): the server is on an address of the host's own, which the
# pods may reach and nothing else.
ip link del cfbench0 2>/dev/null || true
ip link add cfbench0 type veth peer name cfbench1 && ip addr add 198.18.0.1/32 dev cfbench0 &&
	ip link set cfbench1 up && ip link set cfbench0 up
iperf3 -s -B 198.18.0.1 -p 5203 >/dev/null 2>&1 &
pids+=($!)
conf=$(jq -nc --arg s "$work/engine.sock" --arg d "$work/state" '{cniVersion: "1.0.0", name: "scale", type: "childflow-cni",
	socket: $s, stateDir: $d, runtimeConfig: {"io.kubernetes.cri.pod-annotations":
	{"childflow.dev/default-policy": "deny", "childflow.dev/allow-cidrs": "198.18.0.1/32"}}}')
cni() { # cni ADD|DEL N
	CNI_COMMAND=$1 CNI_CONTAINERID="scale$2" CNI_NETNS="/run/netns/cfscale-$2" CNI_IFNAME=eth0 CNI_PATH="$work" \
		"$work/childflow-cni" <<<"$conf"
}
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$daemon/status"; }
gbps() { jq -r '.end.sum_received.bits_per_second / 1e9 | . * 100 | round / 100'; }
iperf_pod() { ip netns exec "cfscale-$1" iperf3 -c 198.18.0.1 -p 5203 -t "$T" -J | gbps; }

idle0=$(rss_kib)
ip netns add cfscale-1 && ip -n cfscale-1 link set lo up && cni ADD 1 >/dev/null
alone=$(iperf_pod 1)
start=$(date +%s.%N)
for i in $(seq 2 "$PODS"); do
	ip netns add "cfscale-$i" && ip -n "cfscale-$i" link set lo up && cni ADD "$i" >/dev/null
done
attach_s=$(echo "$(date +%s.%N) - $start" | bc)
sleep 2
full=$(rss_kib)
crowded=$(iperf_pod 1)
n=$("$work/childflow" sandboxes --socket "$work/engine.sock" --format json | jq length)

per=$(awk -v a="$full" -v b="$idle0" -v n="$n" 'BEGIN { printf "%.2f", (a - b) / n / 1024 }')
{
	echo "# Scale: one daemon, $n pod sandboxes"
	echo
	echo "Measured by \`make bench\` (hack/bench-scale.sh) on $(date -u +%Y-%m-%d), $(nproc) cores, kernel $(uname -r)."
	echo "Pods are network namespaces attached with childflow-cni ADD, as containerd does."
	echo
	echo "| measure | value |"
	echo "|---|---|"
	echo "| sandboxes attached | $n |"
	echo "| daemon RSS, no sandbox | $((idle0 / 1024)) MiB |"
	echo "| daemon RSS, $n idle sandboxes | $((full / 1024)) MiB |"
	echo "| memory per idle sandbox | $per MiB (target: at most 2 MiB) |"
	echo "| time to attach $((n - 1)) sandboxes (CNI ADD each) | $(printf %.1f "$attach_s") s |"
	echo "| one pod's TCP throughput, alone | $alone Gbit/s |"
	echo "| the same pod with $((n - 1)) others attached and idle | $crowded Gbit/s ($(awk -v a="$crowded" -v b="$alone" 'BEGIN { printf "%.2fx", a / b }')) |"
} >"$work/table.md"
cp "$work/table.md" "$OUT"
cat "$work/table.md"
