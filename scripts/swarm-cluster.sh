#!/usr/bin/env bash
# A three-node Docker Swarm on one machine, for tests and for trying the mesh on Swarm (docs/SWARM.md).
#
# Each node is a container (all capabilities, see up) running Debian's dockerd (Docker-in-Docker) from the offline
# base image, with its own /var/lib/docker volume, on the user bridge `meshswarm`. Node 1 initialises
# the swarm on its address; nodes 2 and 3 join as managers, so that raft keeps a quorum and the
# control plane can move when any one node is lost. There is no registry: images go in with
# `docker save | docker load`.
#
#   scripts/swarm-cluster.sh up        nodes, swarm, images (idempotent)
#   scripts/swarm-cluster.sh load      (re)load the images into every node
#   scripts/swarm-cluster.sh check     an overlay network across nodes 1 and 3: a call crosses it
#   scripts/swarm-cluster.sh deploy    the mesh stack (compose/swarm.yml) and the shop (compose/swarm-demo.yml)
#   scripts/swarm-cluster.sh undeploy  both stacks removed (the secrets stay: the same CA next time)
#                                      (deploy makes the secrets once; the admin token's copy for
#                                      meshctl is .cache/meshswarm-admin.token)
#   scripts/swarm-cluster.sh dev-image meshd:swarm in every node: meshd:latest with this checkout's
#                                      Python sources over it (trying changes before `make image`)
#   scripts/swarm-cluster.sh admin METHOD PATH [JSON]
#                                      the control plane's admin API, wherever its task runs
#                                      (e.g. admin POST /v1/rules/catalog/split '{"weights":{"v1":90,"v2":10}}')
#   scripts/swarm-cluster.sh status    `docker node ls` on node 1
#   scripts/swarm-cluster.sh down      remove the nodes, their volumes and the network
#
# Environment: SWARM_NODES (3), NODE_IMAGE (meshswarm-node:bookworm), SWARM_IMAGES (the images moved
# in: meshd:latest mesh-demo:latest), MESH_SWARM_IMAGE (the mesh's image in the stacks: meshd:latest).
set -euo pipefail

here="$(cd "$(dirname "$0")/.." && pwd)"
NODES="${SWARM_NODES:-3}"
NODE_IMAGE="${NODE_IMAGE:-meshswarm-node:bookworm}"
IMAGES="${SWARM_IMAGES:-meshd:latest mesh-demo:latest}"
NET=meshswarm
PREFIX=meshswarm

log() { echo "swarm-cluster: $*" >&2; }
node() { echo "$PREFIX-$1"; }
on() { local n="$1"; shift; docker exec "$(node "$n")" "$@"; }
node_ip() { docker inspect -f "{{(index .NetworkSettings.Networks \"$NET\").IPAddress}}" "$(node "$1")"; }

wait_engine() {
    local n="$1" end=$(( $(date +%s) + 60 ))
    until on "$n" docker info >/dev/null 2>&1; do
        if [ "$(date +%s)" -ge "$end" ]; then
            docker logs --tail 30 "$(node "$n")" >&2 || :
            log "dockerd of $(node "$n") did not answer in 60 s"; exit 1
        fi
        sleep 1
    done
}

swarm_state() { on "$1" docker info -f '{{.Swarm.LocalNodeState}}' 2>/dev/null || echo unknown; }

up() {
    if ! docker image inspect "$NODE_IMAGE" >/dev/null 2>&1; then
        IMAGE="$NODE_IMAGE" EXTRA_PACKAGES="docker.io,iptables,ca-certificates,procps,kmod,xz-utils,tini" \
            "$here/images/build-base.sh"
    fi
    docker network inspect "$NET" >/dev/null 2>&1 || docker network create "$NET" >/dev/null
    for n in $(seq 1 "$NODES"); do
        local name; name="$(node "$n")"
        if [ "$(docker inspect -f '{{.State.Running}}' "$name" 2>/dev/null)" != true ]; then
            docker rm -f "$name" >/dev/null 2>&1 || :
            log "starting $name"
            # Every capability but CAP_SYS_RESOURCE, which this machine's engine does not hold
            # (so --privileged fails here); the init script makes sysfs and cgroups writable.
            docker run -d --name "$name" --hostname "$name" --network "$NET" \
                --cap-add ALL --cap-drop SYS_RESOURCE --security-opt seccomp=unconfined \
                --security-opt apparmor=unconfined --security-opt systempaths=unconfined \
                --device-cgroup-rule 'a *:* rwm' -e MESHSWARM_NODE="$name" \
                --label meshswarm.node="$n" \
                -v "$name-docker:/var/lib/docker" \
                -v "$here/scripts/swarm-node-init.sh:/usr/local/sbin/swarm-node-init:ro" \
                --entrypoint /usr/local/sbin/swarm-node-init "$NODE_IMAGE" >/dev/null
        fi
    done
    for n in $(seq 1 "$NODES"); do wait_engine "$n"; done
    local addr; addr="$(node_ip 1)"
    if [ "$(swarm_state 1)" != active ]; then
        log "swarm init on $(node 1) ($addr)"
        on 1 docker swarm init --advertise-addr "$addr" >/dev/null
    fi
    local token; token="$(on 1 docker swarm join-token -q manager)"
    for n in $(seq 2 "$NODES"); do
        if [ "$(swarm_state "$n")" != active ]; then
            log "$(node "$n") joins as a manager"
            on "$n" docker swarm join --token "$token" --advertise-addr "$(node_ip "$n")" "$addr:2377" >/dev/null
        fi
    done
    load
    on 1 docker node ls
}

load() {
    local cache="$here/.cache"; mkdir -p "$cache"
    local tarball="$cache/meshswarm-images.tar"
    # One save, then one load per node (a pipe per node would save the images three times).
    docker save $IMAGES -o "$tarball.tmp" && mv "$tarball.tmp" "$tarball"
    for n in $(seq 1 "$NODES"); do
        log "loading $IMAGES into $(node "$n")"
        docker exec -i "$(node "$n")" docker load -q <"$tarball" >/dev/null
    done
    rm -f "$tarball"
}

check() {
    # A call across the vxlan overlay: a server on node 1, a client on the last node.
    local last="$NODES" net=meshswarm-check
    on 1 docker network rm "$net" >/dev/null 2>&1 || :
    on 1 docker network create -d overlay --attachable "$net" >/dev/null
    on 1 docker rm -f meshswarm-check-server >/dev/null 2>&1 || :
    on "$last" docker rm -f meshswarm-check-client >/dev/null 2>&1 || :
    on 1 docker run -d --name meshswarm-check-server --network "$net" --entrypoint python3 \
        meshd:latest -m http.server 8000 >/dev/null
    local ip
    ip="$(on 1 docker inspect -f "{{(index .NetworkSettings.Networks \"$net\").IPAddress}}" meshswarm-check-server)"
    local ok=1
    for _ in $(seq 1 20); do
        if on "$last" docker run --rm --name meshswarm-check-client --network "$net" --entrypoint curl \
                meshd:latest -s -o /dev/null -w '%{http_code} %{time_total}s\n' --max-time 3 "http://$ip:8000/"; then
            ok=0; break
        fi
        sleep 1
    done
    on 1 docker rm -f meshswarm-check-server >/dev/null 2>&1 || :
    on 1 docker network rm "$net" >/dev/null 2>&1 || :
    if [ "$ok" = 0 ]; then log "overlay: $(node "$last") reached $ip on $(node 1)"; else log "overlay call failed"; fi
    return "$ok"
}

secrets() {
    # The mesh CA (made once by the image's own code, kept in raft) and the agents' key.
    if ! on 1 docker secret inspect mesh_ca_key >/dev/null 2>&1; then
        log "creating the mesh CA and the swarm secrets mesh_ca_cert, mesh_ca_key, mesh_agent_key"
        on 1 sh -c 'rm -rf /tmp/meshca && mkdir -m 700 /tmp/meshca'
        on 1 docker run --rm -v /tmp/meshca:/out --entrypoint python3 "${MESH_SWARM_IMAGE:-meshd:latest}" -c \
            "import time; from certs.ca import CertificateAuthority as CA; CA.create('${MESH_TRUST_DOMAIN:-mesh.local}', time.time()).save('/out/ca')"
        on 1 docker secret create mesh_ca_key /tmp/meshca/ca/ca.key >/dev/null
        on 1 docker secret create mesh_ca_cert /tmp/meshca/ca/ca.crt >/dev/null
        on 1 rm -rf /tmp/meshca
    fi
    if ! on 1 docker secret inspect mesh_agent_key >/dev/null 2>&1; then
        on 1 sh -c 'head -c 32 /dev/urandom | base64 | docker secret create mesh_agent_key -' >/dev/null
    fi
    # The admin token: a copy stays here for meshctl (--token-file), readable by root only.
    local token_file="$here/.cache/meshswarm-admin.token"
    if ! on 1 docker secret inspect mesh_admin_token >/dev/null 2>&1; then
        mkdir -p "$here/.cache"
        (umask 077; head -c 48 /dev/urandom | base64 | tr -d '=+/\n' >"$token_file")
        docker exec -i "$(node 1)" docker secret create mesh_admin_token - <"$token_file" >/dev/null
    fi
}

deploy() {
    secrets
    docker cp "$here/compose/swarm.yml" "$(node 1):/tmp/swarm.yml"
    docker cp "$here/compose/swarm-demo.yml" "$(node 1):/tmp/swarm-demo.yml"
    on 1 env MESH_SWARM_IMAGE="${MESH_SWARM_IMAGE:-meshd:latest}" docker stack deploy -c /tmp/swarm.yml mesh
    on 1 docker stack deploy -c /tmp/swarm-demo.yml shop
    on 1 docker service ls
    # The shop through the gateway of node 1 (the agents run one on every node).
    local url="http://$(node_ip 1):8080/api/orders/1" end=$(( $(date +%s) + 120 ))
    log "waiting up to 120 s for $url"
    until curl -sf -o /dev/null -m 3 "$url"; do
        if [ "$(date +%s)" -ge "$end" ]; then log "no 200 from $url after 120 s"; return 1; fi
        sleep 2
    done
    log "the shop is up: $url (and on port 8080 of every node); meshctl --api http://$(node_ip 1):15014" \
        "--token-file .cache/meshswarm-admin.token status"
}

undeploy() {
    on 1 docker stack rm shop || :
    on 1 docker stack rm mesh || :
}

dev_image() {
    # meshd:latest with this checkout's Python sources over the installed ones (compiled modules stay).
    local site=/opt/mesh/lib/python3.11/site-packages ctx
    ctx="$(mktemp -d)"
    for pkg in meshcore meshd sidecar gateway meshctl certs meshproc; do
        [ -d "$here/$pkg" ] && (cd "$here" && find "$pkg" -name '*.py' -print0 | tar --null -T - -cf - ) | tar -C "$ctx" -xf -
    done
    printf 'FROM meshd:latest\nCOPY . %s/\n' "$site" >"$ctx/Dockerfile"
    for n in $(seq 1 "$NODES"); do
        tar -C "$ctx" -cf - . | docker exec -i "$(node "$n")" sh -c \
            'rm -rf /tmp/devimg && mkdir /tmp/devimg && tar -C /tmp/devimg -xf - && docker build -q -t meshd:swarm /tmp/devimg >/dev/null && rm -rf /tmp/devimg'
        log "meshd:swarm built in $(node "$n")"
    done
    rm -rf "$ctx"
}

control_task() {
    # "<node number> <container id>" of the control plane's running task
    for n in $(seq 1 "$NODES"); do
        local c
        c="$(on "$n" docker ps -q -f label=com.docker.swarm.service.name=mesh_control 2>/dev/null | head -1)"
        if [ -n "$c" ]; then echo "$n $c"; return 0; fi
    done
    log "no running mesh_control task"; return 1
}

admin() {
    local method="$1" path="$2" body="${3:-}" where
    where="$(control_task)"
    # The token stays in the control plane's container: curl reads it there.
    on "${where% *}" docker exec "${where#* }" sh -c \
        'curl -sS -X "$0" -H "Authorization: Bearer $(cat /var/lib/meshd/admin.token)" \
             -H "Content-Type: application/json" ${2:+--data "$2"} "http://127.0.0.1:15014$1"; echo' \
        "$method" "$path" "$body"
}

down() {
    for n in $(seq 1 "$NODES"); do
        docker rm -f "$(node "$n")" >/dev/null 2>&1 || :
        docker volume rm "$(node "$n")-docker" >/dev/null 2>&1 || :
        # The node's containers had their cgroups under /<node> of the host's hierarchies (cgroup v1).
        find /sys/fs/cgroup/*/"$(node "$n")" -depth -type d -exec rmdir {} + 2>/dev/null || :
    done
    docker network rm "$NET" >/dev/null 2>&1 || :
    log "removed"
}

case "${1:-}" in
    up) up ;;
    load) load ;;
    check) check ;;
    deploy) deploy ;;
    undeploy) undeploy ;;
    dev-image) dev_image ;;
    admin) shift; admin "$@" ;;
    status) on 1 docker node ls ;;
    down) down ;;
    *) echo "usage: $0 up|load|check|deploy|undeploy|dev-image|admin|status|down" >&2; exit 2 ;;
esac
