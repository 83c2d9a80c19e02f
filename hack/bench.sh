#!/usr/bin/env bash
# make bench: childflow's relay against native loopback, slirp4netns and
# pasta, measured in one run on this machine. Every server listens on the
# host's loopback; each sandbox reaches it through its gateway mapping
# (childflow: --allow-cidr on its gateway; slirp4netns: 10.0.2.2; pasta:
# its gateway, mapped to the host). No traffic leaves the machine.
#
# Env: BENCH_SECONDS (iperf3 duration, default 5), BENCH_CONNS (2000),
#      BENCH_ROUNDS (rounds over every path, 3; the table gives medians),
#      BENCH_RUNS (startup runs, 100), BENCH_OUT (default docs/benchmarks.md).
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "bench: run as root (sudo make bench)" >&2; exit 1; }
T=${BENCH_SECONDS:-5}
N=${BENCH_CONNS:-2000}
R=${BENCH_ROUNDS:-3}
OUT=${BENCH_OUT:-docs/benchmarks.md}
work=$(mktemp -d /tmp/cfbench.XXXXXX)
chmod 755 "$work"
export CGO_ENABLED=0
# Built as `make build` builds them, then installed by copying: a start
# depends on how the binaries' page cache was filled, and straight from
# the linker the same binaries started 1.3-1.7 ms slower than a copy.
mkdir "$work/build"
for c in childflow childflow-init; do
	go build -trimpath -ldflags '-s -w' -o "$work/build/$c" "./cmd/$c"
	install -m 0755 "$work/build/$c" "$work/$c"
done
go build -o "$work/connbench" ./hack/connbench
CF="$work/childflow"
CB="$work/connbench"
ENVS="native childflow-65520 childflowobserved-65520 childflow-1500 childflowsquid-65520 childflowroot-1500 childflowroot-65520 slirp4netns-65520 slirp4netns-1500 pasta-65520 pasta-1500"

pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	[ -f "$work/pasta.pid" ] && kill "$(cat "$work/pasta.pid")" 2>/dev/null || true
	ip netns del cfbench-slirp4netns 2>/dev/null || true
	ip netns del cfbench-pasta 2>/dev/null || true
	rm -f /dev/shm/cfbench-* # squid's shared memory, named after its service
	rm -rf "$work"
}
trap cleanup EXIT

iperf3 -s -B 127.0.0.1 -p 5201 >/dev/null 2>&1 &
pids+=($!)
"$CB" serve 127.0.0.1:5300 &
pids+=($!)
# The rootful sandbox reaches the host on its veth's gateway address, not
# loopback: a second pair of servers on every address.
iperf3 -s -p 5202 >/dev/null 2>&1 &
pids+=($!)
"$CB" serve 0.0.0.0:5301 &
pids+=($!)
# squid for the proxied row: childflow -p forces the flow through CONNECT.
mkdir -p "$work/squid" && chmod 777 "$work/squid"
cat >"$work/squid/squid.conf" <<CONF
http_port 127.0.0.1:3140
pid_filename $work/squid/squid.pid
access_log none
cache_log $work/squid/cache.log
cache deny all
coredump_dir $work/squid
shutdown_lifetime 0 seconds
http_access allow all
CONF
squid -n cfbench -N -f "$work/squid/squid.conf" &
pids+=($!)
for _ in $(seq 100); do ss -Hltn 'sport = :3140' | grep -q . && break; sleep 0.05; done

# run_in ENV CMD...: run CMD inside environment ENV with $GW set to the
# address that reaches the host's loopback there.
run_in() {
	local env=$1
	shift
	case "$env" in
	native) GW=127.0.0.1 "$@" ;;
	childflowobserved-*)
		# Flow log and capture on: what observing costs.
		"$CF" --flow-log "$work/flows.jsonl" -c "$work/capture.pcapng" --allow-cidr 10.87.0.1/32 --allow-cidr 172.29.87.1/32 --allow-cidr 192.168.187.1/32 -- \
			sh -c 'GW=$(ip -4 route show default | cut -d" " -f3) exec "$@"' sh "$@"
		rm -f "$work/flows.jsonl" "$work/capture.pcapng"
		;;
	childflowroot-*)
		# Kernel forwarding: the veth's MTU is the path's.
		"$CF" --root --mtu "${env#childflowroot-}" --allow-cidr 10.88.0.0/16 -- \
			sh -c 'GW=$(ip -4 route show default | cut -d" " -f3) exec "$@"' sh "$@"
		;;
	childflowsquid-*)
		"$CF" -p http://127.0.0.1:3140 --allow-cidr 10.87.0.1/32 --allow-cidr 172.29.87.1/32 --allow-cidr 192.168.187.1/32 -- \
			sh -c 'GW=$(ip -4 route show default | cut -d" " -f3) exec "$@"' sh "$@"
		;;
	childflow-*)
		# The gateway is the first address of whichever subnet childflow
		# picked; allowing all three candidates keeps this independent of it.
		"$CF" --mtu "${env#childflow-}" --allow-cidr 10.87.0.1/32 --allow-cidr 172.29.87.1/32 --allow-cidr 192.168.187.1/32 -- \
			sh -c 'GW=$(ip -4 route show default | cut -d" " -f3) exec "$@"' sh "$@"
		;;
	slirp4netns-* | pasta-*) ip netns exec "cfbench-${env%-*}" env GW=10.0.2.2 "$@" ;;
	esac
}

start_slirp() {
	ip netns del cfbench-slirp4netns 2>/dev/null || true
	ip netns add cfbench-slirp4netns
	slirp4netns --configure --mtu="$1" --netns-type=path /run/netns/cfbench-slirp4netns tap0 >/dev/null 2>&1 &
	pids+=($!)
	for _ in $(seq 100); do
		ip netns exec cfbench-slirp4netns ip -4 addr show tap0 2>/dev/null | grep -q inet && return
		sleep 0.05
	done
	echo "slirp4netns did not come up" >&2
	return 1
}

start_pasta() {
	[ -f "$work/pasta.pid" ] && kill "$(cat "$work/pasta.pid")" 2>/dev/null || true
	ip netns del cfbench-pasta 2>/dev/null || true
	ip netns add cfbench-pasta
	ip netns exec cfbench-pasta ip link set lo up
	pasta -q --config-net --runas 0 -m "$1" -a 10.0.2.15 -n 24 -g 10.0.2.2 -P "$work/pasta.pid" --netns /run/netns/cfbench-pasta
	for _ in $(seq 100); do
		ip netns exec cfbench-pasta ip -4 route show default 2>/dev/null | grep -q 10.0.2.2 && return
		sleep 0.05
	done
	echo "pasta did not come up" >&2
	return 1
}

gbps() { jq -r '.end.sum_received.bits_per_second / 1e9 | . * 100 | round / 100'; }
port() { case "$1" in childflowroot-*) echo "$3" ;; *) echo "$2" ;; esac; }
throughput() { run_in "$1" sh -c 'iperf3 -c "$GW" -p '"$(port "$1" 5201 5202)"' -t '"$T"' -J' | gbps; }
connrate() { run_in "$1" sh -c '"$0" client "$GW:'"$(port "$1" 5300 5301)"'" '"$N" "$CB"; }

# Every path in turn, then again: a noisy minute on a shared machine weighs
# on one round of several paths rather than on every run of one, and the
# medians leave it out.
declare -A tputs rates tput rate spread
for round in $(seq "$R"); do
	for env in $ENVS; do
		case "$env" in
		slirp4netns-*) start_slirp "${env#*-}" ;;
		pasta-*) start_pasta "${env#*-}" ;;
		esac
		# A run that fails (a comparator refusing a connection, say) shows
		# as failed, not as a rate of 0.
		t=$(throughput "$env") || t=failed
		c=$(connrate "$env") || c=failed
		tputs[$env]+=" $t" rates[$env]+=" $c"
		echo "round $round, $env: $t Gbit/s, $c conn/s" >&2
	done
done
# median VALUES...: the median of those that are numbers, and how many
# were not; "failed" if none was.
median() {
	local nums bad m
	nums=$(printf '%s\n' "$@" | grep -E '^[0-9.]+$' | sort -g) || true
	bad=$(printf '%s\n' "$@" | grep -cvE '^[0-9.]+$') || true
	[ -n "$nums" ] || { echo failed; return; }
	m=$(awk '{ v[NR] = $1 } END { print (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2) }' <<<"$nums")
	[ "$bad" = 0 ] || m="$m ($bad failed)"
	echo "$m"
}
# range VALUES...: lowest-highest of those that are numbers.
range() { printf '%s\n' "$@" | grep -E '^[0-9.]+$' | sort -g | sed -n '1p;$p' | paste -sd-; }
for env in $ENVS; do
	# shellcheck disable=SC2086 # the lists split on purpose
	tput[$env]=$(median ${tputs[$env]}) rate[$env]=$(median ${rates[$env]})
	# shellcheck disable=SC2086
	spread[$env]="$(range ${tputs[$env]}) Gbit/s, $(range ${rates[$env]}) conn/s"
done

# Startup overhead over a plain /bin/true (hyperfine, no shell).
hf() {
	hyperfine -N --warmup 3 --runs "${BENCH_RUNS:-100}" --export-json "$work/hf.json" "$@" >/dev/null 2>&1
	jq -r '.results[].median * 1000 | . * 10 | round / 10' "$work/hf.json"
}
mapfile -t starts < <(hf "/bin/true" "$CF -- /bin/true" "$CF --root -- /bin/true" "pasta --config-net --runas 0 -q -a 10.0.2.15 -n 24 -g 10.0.2.2 /bin/true")

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a ~ /^[0-9.]+$/ && b ~ /^[0-9.]+$/ && b > 0) printf "%.2fx", a / b; else print "n/a" }'; }
over() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f ms", a - b }'; }
{
	echo "# Benchmarks"
	echo
	echo "Measured by \`make bench\` (hack/bench.sh) on $(date -u +%Y-%m-%d), $(nproc) cores, kernel $(uname -r)."
	echo "iperf3, one TCP stream for ${T}s, sandbox to host; connection rate: $N sequential"
	echo "connect / 1-byte echo / close. Every server is on the host's loopback. Medians of $R rounds"
	echo "over every path (the range in the last column); ratios are of the medians to native loopback."
	echo
	echo "| path | MTU | TCP throughput | ratio | conn/s | ratio | range |"
	echo "|---|---|---|---|---|---|---|"
	for env in $ENVS; do
		name=${env%-*} mtu=${env##*-}
		[ "$env" = native ] && name="native loopback" mtu=65536
		[ "${env%-*}" = childflowsquid ] && name="childflow via squid CONNECT"
		[ "${env%-*}" = childflowobserved ] && name="childflow + flow log + capture"
		[ "${env%-*}" = childflowroot ] && name="childflow --root (veth, nftables)"
		echo "| $name | $mtu | ${tput[$env]} Gbit/s | $(ratio "${tput[$env]}" "${tput[native]}") | ${rate[$env]} | $(ratio "${rate[$env]}" "${rate[native]}") | ${spread[$env]} |"
	done
	echo
	echo "| startup | median | overhead over /bin/true |"
	echo "|---|---|---|"
	echo "| /bin/true | ${starts[0]} ms | |"
	echo "| childflow -- /bin/true | ${starts[1]} ms | $(over "${starts[1]}" "${starts[0]}") |"
	echo "| childflow --root -- /bin/true | ${starts[2]} ms | $(over "${starts[2]}" "${starts[0]}") |"
	echo "| pasta --config-net /bin/true | ${starts[3]} ms | $(over "${starts[3]}" "${starts[0]}") |"
} >"$work/table.md"
mkdir -p "$(dirname "$OUT")"
# Hand-written analysis below the marker survives a new run.
notes=""
[ -f "$OUT" ] && notes=$(sed -n '/^<!-- notes -->/,$p' "$OUT")
{ cat "$work/table.md"; [ -n "$notes" ] && printf '\n%s\n' "$notes"; } >"$OUT"
cat "$work/table.md"
