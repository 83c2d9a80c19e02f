#!/usr/bin/env bash
# What a test run leaves on the host: `record FILE` before it, `check FILE`
# after, which lists what appeared meanwhile and fails if anything did.
# The e2e tests check childflow's own state after each test; this covers
# the whole run (unit tests too) and what the tests' tools leave: network
# namespaces, links, rules, routes, nftables tables, mounts, sysctls the
# tests set, files in /run/childflow, /tmp and /dev/shm, and processes of
# the programs the tests start.
set -euo pipefail

# Each line names its kind: check compares the lines as sets.
as() { sed "s|^|$1: |"; }

state() {
	ls -1 /run/netns 2>/dev/null | as netns || true
	if command -v ip >/dev/null; then
		ip -o link show | awk '{print $2}' | as link
		{ ip rule; ip -6 rule 2>/dev/null || true; } | as rule
		# Routes and addresses the kernel's own timers renew carry their lifetimes.
		{ ip route show table all; ip -6 route show table all 2>/dev/null | grep -v 'fe80::'; } | sed 's/ expires [0-9a-z]*//' | as route
		# Not what autoconfiguration or DHCP gives and takes back by itself.
		ip -o addr show | grep -v -e 'fe80::' -e ' dynamic' | awk '{print $2, $4}' | as address
	fi
	{ nft list tables 2>/dev/null || true; } | as nftables
	awk '{print $5}' /proc/self/mountinfo | as mount
	for f in /proc/sys/net/ipv4/ip_forward /proc/sys/net/ipv6/conf/{all,default}/forwarding \
		/proc/sys/net/ipv4/conf/all/src_valid_mark /proc/sys/kernel/apparmor_restrict_unprivileged_userns \
		/proc/sys/kernel/unprivileged_userns_clone /proc/sys/net/ipv4/ping_group_range; do
		if [ -e "$f" ]; then echo "$f $(tr '\t' ' ' <"$f")"; fi
	done | as setting
	{ stat -c '/dev/net/tun %a' /dev/net/tun 2>/dev/null || true; } | as setting
	# childflow's lock files stay by design: removing a lock someone waits
	# on would let two holders in.
	{ find /run/childflow /var/run/childflow 2>/dev/null || true; } |
		grep -vxE '/(var/)?run/childflow(/root)?|/(var/)?run/childflow/(root/\.lock|daemon\.lock)' | as file || true
	ls -1A /tmp | grep -vE '^(bash_|go-build|hsperfdata_)' | sed 's|^|/tmp/|' | as file || true
	ls -1A /dev/shm | sed 's|^|/dev/shm/|' | as file || true
}

# ps's columns: pid, parent, state, start (five words), name.
processes() { ps -eo pid=,ppid=,stat=,lstart=,comm=; }

# new_processes lists the processes of the tools the tests start that
# were not running at the record (FILE.procs: pid and start of each), and
# descend from none that was: what runs beside the tests (the shell that
# started them, a terminal's commands) is not theirs. Not zombies: what
# has exited is left for its parent, which may be an init that reaps late.
new_processes() {
	processes | awk -v before="$1" '
	BEGIN { while ((getline l < before) > 0) old[l] = 1 }
	{
		key[$1] = $1 "@" $4 $5 $6 $7 $8; parent[$1] = $2; state[$1] = $3
		name[$1] = $9; for (i = 10; i <= NF; i++) name[$1] = name[$1] " " $i
	}
	END {
		for (p in key) {
			if (state[p] ~ /^Z/ || old[key[p]]) continue
			for (q = parent[p]; q > 1 && (q in key) && !old[key[q]]; q = parent[q]) {}
			if (q > 1 && (q in key)) continue # a child of what ran before
			if (name[p] ~ /^(childflow|e2e\.test|dnsmasq|unbound|squid|tinyproxy|microsocks|danted|sockd|containerd|dockerd|docker-proxy|runc|crun|conmon|podman|pasta|slirp4netns|iperf3|python3|tshark|dumpcap|chrom|qemu-system|socat|nc$|sleep|curl|dig$|ping$|pause|catatonit|helm)/)
				print "process: " p " " name[p]
		}
	}'
}

case "${1:-}" in
record)
	state >"$2"
	processes | awk '{print $1 "@" $4 $5 $6 $7 $8}' >"$2.procs"
	;;
check)
	# What the last test killed may take a moment to go.
	for try in 1 2 3 4 5; do
		left=$({ comm -13 <(sort "$2") <(state | sort); new_processes "$2.procs"; } | sed 's/^/  /')
		if [ -z "$left" ]; then break; fi
		sleep 1
	done
	rm -f "$2" "$2.procs"
	if [ -n "$left" ]; then
		echo "left on the host by the tests:"
		echo "$left"
		exit 1
	fi
	echo "nothing left on the host by the tests"
	;;
*)
	echo "usage: $0 record|check FILE" >&2
	exit 2
	;;
esac
