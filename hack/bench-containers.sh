#!/usr/bin/env bash
# make bench (containers): what childflow costs a container.
#  - hook latency: `runc run` of /bin/true with and without childflow-hook
#    (annotated: attach to a running daemon; unannotated: the hook's no-op);
#  - throughput: iperf3 from a docker container to the host's docker0
#    address, through docker's bridge vs through the childflow daemon
#    (docker --runtime childflow-runtime). No traffic leaves the machine.
#
# Env: BENCH_SECONDS (iperf3 duration, 5), BENCH_RUNS (hyperfine runs, 30),
#      BENCH_OUT (default docs/benchmarks-containers.md).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "bench: run as root (sudo make bench)" >&2; exit 1; }
T=${BENCH_SECONDS:-5}
RUNS=${BENCH_RUNS:-30}
OUT=${BENCH_OUT:-docs/benchmarks-containers.md}
work=$(mktemp -d /tmp/cfbench-ct.XXXXXX)
export CGO_ENABLED=0
for c in childflow childflow-hook childflow-runtime; do go build -o "$work/$c" ./cmd/$c; done

pids=()
creates=()
cleanup() {
	docker -H "unix://$work/docker.sock" rm -f $(docker -H "unix://$work/docker.sock" ps -aq 2>/dev/null) >/dev/null 2>&1 || true
	[ -f "$work/docker.pid" ] && kill "$(cat "$work/docker.pid")" 2>/dev/null || true
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	for _ in $(seq 50); do [ -e "$work/docker.pid" ] || break; sleep 0.1; done
	[ -n "${BENCH_DEBUG:-}" ] && cat "$work/iperf.json" "$work/dockerd.log" >&2
	ip link del docker0 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT
[ -n "${BENCH_DEBUG:-}" ] && set -x

"$work/childflow" daemon --socket "$work/engine.sock" --state-dir "$work/state" --flow-log-dir "" 2>"$work/daemon.log" &
pids+=($!)
for _ in $(seq 100); do [ -S "$work/engine.sock" ] && break; sleep 0.05; done

# A busybox bundle running /bin/true, with the hook in config.json.
bundle() { # bundle DIR ANNOTATIONS_JSON
	mkdir -p "$1/rootfs/bin" && cp /bin/busybox "$1/rootfs/bin/" && ln -sf busybox "$1/rootfs/bin/true"
	(cd "$1" && runc spec)
	local hook="$work/childflow-hook" args
	args=$(jq -nc --arg s "$work/engine.sock" --arg d "$work/state" '{c: ["childflow-hook","--socket",$s,"--state-dir",$d,"createRuntime"], p: ["childflow-hook","--socket",$s,"--state-dir",$d,"poststop"]}')
	jq --arg h "$hook" --argjson a "$args" --argjson ann "$2" '.process.terminal=false | .process.args=["/bin/true"] | .annotations=$ann |
		if $ann == null then . else .hooks={createRuntime: [{path: $h, args: $a.c}], poststop: [{path: $h, args: $a.p}]} end' \
		"$1/config.json" >"$1/c.json" && mv "$1/c.json" "$1/config.json"
}
bundle "$work/plain" null
bundle "$work/noop" '{}'
bundle "$work/sandboxed" '{"childflow.dev/default-policy": "deny"}'
hyperfine -N --warmup 3 --runs "$RUNS" --export-json "$work/hf.json" \
	"runc --root $work/runc run --bundle $work/plain b1" \
	"runc --root $work/runc run --bundle $work/noop b2" \
	"runc --root $work/runc run --bundle $work/sandboxed b3" >"$work/hf.log" 2>&1 || { cat "$work/hf.log" "$work/daemon.log" >&2; exit 1; }
mapfile -t starts < <(jq -r '.results[].mean * 1000 | . * 10 | round / 10' "$work/hf.json")
# The start alone: `runc create` (createRuntime hook: cf0 + attach), with the
# previous container deleted (poststop: detach) outside the timing.
for b in plain sandboxed; do
	hyperfine -N --warmup 3 --runs "$RUNS" --export-json "$work/hf-$b.json" \
		--prepare "runc --root $work/runc delete --force c-$b" --cleanup "runc --root $work/runc delete --force c-$b" \
		"runc --root $work/runc create --bundle $work/$b c-$b" >"$work/hf.log" 2>&1 || { cat "$work/hf.log" >&2; exit 1; }
	creates+=("$(jq -r '.results[0].mean * 1000 | . * 10 | round / 10' "$work/hf-$b.json")")
done

# Docker with its default bridge (no iptables: nothing leaves the host).
cat >"$work/daemon.json" <<JSON
{"runtimes": {"childflow": {"path": "$work/childflow-runtime", "runtimeArgs": ["--childflow-socket=$work/engine.sock", "--childflow-state-dir=$work/state"]}},
 "iptables": false, "storage-driver": "vfs"}
JSON
dockerd --config-file "$work/daemon.json" --data-root "$work/docker" --exec-root "$work/dexec" -H "unix://$work/docker.sock" \
	--pidfile "$work/docker.pid" >"$work/dockerd.log" 2>&1 &
D="docker -H unix://$work/docker.sock"
for _ in $(seq 100); do $D version >/dev/null 2>&1 && break; sleep 0.1; done
mkdir -p "$work/img/bin" "$work/img/tmp" && chmod 1777 "$work/img/tmp" && cp /bin/busybox "$work/img/bin/" && ln -sf busybox "$work/img/bin/sh"
tar -C "$work/img" -c . | $D import - cfbench:latest >/dev/null
HOST=$(ip -4 -o addr show docker0 | awk '{print $4}' | cut -d/ -f1)
iperf3 -s -B "$HOST" -p 5202 >/dev/null 2>&1 &
pids+=($!)
sleep 0.5
gbps() { tee -a "$work/iperf.json" | jq -r '.end.sum_received.bits_per_second / 1e9 | . * 100 | round / 100'; }
iperf_in() { # iperf_in RUNTIME [ANNOTATION...]: iperf3 client in a container
	$D run --rm --runtime "$1" --cap-drop NET_RAW -v /usr:/usr:ro -v /lib:/lib:ro -v /lib64:/lib64:ro "${@:2}" cfbench:latest \
		/usr/bin/iperf3 -c "$HOST" -p 5202 -t "$T" -J | gbps
}
bridge=$(iperf_in runc)
[ -n "${BENCH_DEBUG:-}" ] && echo "bridge=$bridge" >&2
# docker 20.10 cannot set annotations: the wrapper's policy file does.
echo "allow_cidrs: [$HOST/32]" >"$work/policy.yaml"
jq --arg p "--childflow-policy=$work/policy.yaml" '.runtimes.childflow.runtimeArgs += [$p]' "$work/daemon.json" >"$work/d2.json"
kill -HUP "$(cat "$work/docker.pid")" 2>/dev/null || true # runtimes are reloaded on SIGHUP
cp "$work/d2.json" "$work/daemon.json" && kill -HUP "$(cat "$work/docker.pid")"
sleep 1
sandboxed=$(iperf_in childflow)

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2fx", a / b; else print "n/a" }'; }
over() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f ms", a - b }'; }
{
	echo "# Container benchmarks"
	echo
	echo "Measured by \`make bench\` (hack/bench-containers.sh) on $(date -u +%Y-%m-%d), $(nproc) cores, kernel $(uname -r)."
	echo
	echo "| runc run /bin/true (busybox rootfs) | mean | added by childflow |"
	echo "|---|---|---|"
	echo "| no hook | ${starts[0]} ms | |"
	echo "| hook, container without childflow annotations | ${starts[1]} ms | $(over "${starts[1]}" "${starts[0]}") |"
	echo "| hook, sandboxed (cf0 + attach to the daemon + detach) | ${starts[2]} ms | $(over "${starts[2]}" "${starts[0]}") |"
	echo "| runc create only, no hook | ${creates[0]} ms | |"
	echo "| runc create only, sandboxed (createRuntime: cf0 + attach) | ${creates[1]} ms | $(over "${creates[1]}" "${creates[0]}") |"
	echo
	echo "iperf3, one TCP stream for ${T}s, container to the host's docker0 address:"
	echo
	echo "| docker container | TCP throughput | ratio |"
	echo "|---|---|---|"
	echo "| docker's bridge (runc) | $bridge Gbit/s | 1.00x |"
	echo "| childflow daemon (childflow-runtime, cf0 MTU 65520) | $sandboxed Gbit/s | $(ratio "$sandboxed" "$bridge") |"
} >"$work/table.md"
cat "$work/table.md" >"$OUT"
cat "$work/table.md"
