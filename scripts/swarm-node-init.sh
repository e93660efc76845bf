#!/bin/sh
# PID 1 of a test-cluster node (scripts/swarm-cluster.sh): Debian's dockerd in a container.
# MESHSWARM_NODE names the node's cgroup parent (its containers' cgroups stay apart from the host's).
set -eu
# Not --privileged: this machine's engine lacks CAP_SYS_RESOURCE, which --privileged asks for. So the
# node gets every other capability (scripts/swarm-cluster.sh) and makes sysfs and cgroups writable.
mount -o remount,rw /sys 2>/dev/null || :
if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
    # cgroup v2: dockerd must not sit in the root cgroup it delegates.
    mkdir -p /sys/fs/cgroup/init
    xargs -rn1 </sys/fs/cgroup/cgroup.procs >/sys/fs/cgroup/init/cgroup.procs 2>/dev/null || :
    sed -e 's/ / +/g' -e 's/^/+/' </sys/fs/cgroup/cgroup.controllers \
        >/sys/fs/cgroup/cgroup.subtree_control 2>/dev/null || :
elif ! mkdir /sys/fs/cgroup/memory/.probe 2>/dev/null; then
    # cgroup v1, mounted read-only: mount each controller afresh, writable.
    umount -R /sys/fs/cgroup
    mount -t tmpfs -o mode=755 cgroup /sys/fs/cgroup
    for c in cpu cpuacct cpuset devices freezer memory pids blkio hugetlb perf_event net_cls net_prio; do
        mkdir -p "/sys/fs/cgroup/$c"
        mount -t cgroup -o "$c" cgroup "/sys/fs/cgroup/$c" 2>/dev/null || rmdir "/sys/fs/cgroup/$c"
    done
    mkdir -p /sys/fs/cgroup/systemd
    mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd
else
    rmdir /sys/fs/cgroup/memory/.probe
fi
# A node killed and started again keeps its container filesystem: no process of the last boot is
# left, but its runtime state is, and a stale containerd socket makes dockerd time out.
rm -rf /var/run/docker.pid /var/run/docker /run/containerd
# No registry anywhere: images come in with `docker load`; warnings only, the node's log stays short.
exec dockerd --cgroup-parent="/${MESHSWARM_NODE:-meshswarm}" --host=unix:///var/run/docker.sock --log-level=warn --storage-driver=overlay2 \
    --log-driver=json-file --log-opt max-size=5m --log-opt max-file=2
