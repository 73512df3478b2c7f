#!/bin/sh
# Starts Kamailio with callfabric's config; every address comes from the environment.
#   SIP_LISTEN (udp:0.0.0.0:5060), SIP_ADVERTISE (public ip[:port], optional),
#   EVAPI_BIND (0.0.0.0:8448), EVAPI_ALLOWED_NET (the controllers' subnet),
#   HTTP_PORT (8090), HTTP_ALLOWED_NET (who may read /metrics and /health: Prometheus),
#   RPC_ALLOWED_NET (who may use JSON-RPC /RPC: the controllers, which push bans there),
#   MEDIA_NODES (space-separated sip:host:port of the Asterisk nodes: set 1),
#   TRUSTED_NET (comma-separated subnets of trusted peers, e.g. carriers' SBCs: never banned),
#   TRUSTED_DEST_NET (comma-separated subnets of trusted destinations, e.g. the PBX of the human
#   desk: besides media nodes, the only ones that get callfabric's context headers and
#   X-Callfabric-Call-Id; outbound trunks never do),
#   FALLBACK (open|closed), DECISION_TIMEOUT_MS (200), SHM_MB (256), PKG_MB (16), CHILDREN (4),
#   EDGE_POLICY (the policy file the controller writes, its edge_policy_file: the edge then
#   decides the common calls itself; unset: every call is asked over evapi),
#   EDGE_POLICY_KEY (the key file that policy file's HMAC is checked with: the controller's
#   edge_policy_key_file), EDGE_DECIDE (1, or 0: the policy only keeps its rejects in the
#   fallback, every call goes to a controller); the last policy file that verified is kept in
#   $run/edge-policy.last-good,
#   EVENTS_REDIS_HOST / EVENTS_REDIS_PORT / EVENTS_REDIS_DB (the Redis holding call state: the
#   edge's events then go to its stream cf:edge:{EDGE_NAME}:events whatever the controllers
#   do; unset: over evapi to a connected controller), EDGE_NAME (edge), EVENTS_QUEUE_MAX,
#   TRUNKS_DIR (the directory the controller writes the trunk table in, its edge_trunks_dir:
#   initial INVITEs must then come from a declared inbound trunk; until the controller has
#   written it, a closed table refuses every source),
#   TLS_LISTEN (e.g. tls:0.0.0.0:5061: SIP over TLS with /etc/callfabric/tls.cfg, whose certificate,
#   key and CA list are mounted at /etc/callfabric/tls/edge.crt, edge.key and the system CAs;
#   `kamcmd tls.reload` re-reads them), RTPENGINE_SOCK (udp:rtpengine:2223: media anchored at the
#   edge), WSS_PORT (with TLS_LISTEN: browsers over a secure WebSocket), PHONE_SECRET (the
#   controller's phone_token_secret), WS_ORIGIN_RE (the Origin browsers' pages must have)
set -eu
run=/run/callfabric
: > "$run/dispatcher.list"
for node in ${MEDIA_NODES:-}; do echo "1 $node 0 0" >> "$run/dispatcher.list"; done
set -- kamailio -x tlsf -m "${SHM_MB:-256}" -M "${PKG_MB:-16}" -DD -E -Y "$run" -f /etc/callfabric/kamailio.cfg \
  -A "SIP_LISTEN=${SIP_LISTEN:-udp:0.0.0.0:5060}" \
  -A "HTTP_ADDR=${HTTP_ADDR:-0.0.0.0}" -A "HTTP_PORT=${HTTP_PORT:-8090}" \
  -A "EVAPI_BIND=\"${EVAPI_BIND:-0.0.0.0:8448}\"" -A "EVAPI_ALLOWED_NET=\"${EVAPI_ALLOWED_NET:-127.0.0.0/8}\"" \
  -A "HTTP_ALLOWED_NET=\"${HTTP_ALLOWED_NET:-127.0.0.0/8}\"" -A "RPC_ALLOWED_NET=\"${RPC_ALLOWED_NET:-127.0.0.1/32}\"" \
  -A "DS_LIST=\"$run/dispatcher.list\"" -A "CTL_SOCKET=\"unix:$run/kamailio_ctl\"" \
  -A "FALLBACK=${FALLBACK:-open}" -A "DECISION_TIMEOUT_MS=${DECISION_TIMEOUT_MS:-200}" \
  -A "CHILDREN=${CHILDREN:-4}"
if [ -n "${SIP_ADVERTISE:-}" ]; then set -- "$@" -A "SIP_ADVERTISE=${SIP_ADVERTISE}"; fi
if [ -n "${TRUSTED_NET:-}" ]; then set -- "$@" -A "TRUSTED_NET=\"${TRUSTED_NET}\""; fi
if [ -n "${TRUSTED_DEST_NET:-}" ]; then set -- "$@" -A "TRUSTED_DEST_NET=\"${TRUSTED_DEST_NET}\""; fi
if [ -n "${EDGE_POLICY:-}" ]; then
  set -- "$@" -A "EDGE_POLICY=\"${EDGE_POLICY}\"" -A "EDGE_POLICY_CACHE=\"$run/edge-policy.last-good\"" \
    -A "EDGE_DECIDE=${EDGE_DECIDE:-1}"
fi
if [ -n "${EDGE_POLICY_KEY:-}" ]; then set -- "$@" -A "EDGE_POLICY_KEY=\"${EDGE_POLICY_KEY}\""; fi
if [ -n "${EVENTS_REDIS_HOST:-}" ]; then
  set -- "$@" -A "EVENTS_REDIS=\"name=cfev;addr=${EVENTS_REDIS_HOST};port=${EVENTS_REDIS_PORT:-6379};db=${EVENTS_REDIS_DB:-0}\"" \
    -A "EDGE_NAME=\"${EDGE_NAME:-edge}\""
  if [ -n "${EVENTS_QUEUE_MAX:-}" ]; then set -- "$@" -A "EVENTS_QUEUE_MAX=${EVENTS_QUEUE_MAX}"; fi
fi
if [ -n "${TRUNKS_DIR:-}" ]; then
  if [ ! -f "$TRUNKS_DIR/cftrunk" ]; then
    mkdir -p "$TRUNKS_DIR"
    printf 'key_name(str) key_type(int) value_type(int) key_value(str) expires(int)\nenforce:0:0:1:0\nnets:0:0:0:0\nrealm:0:0:callfabric:0\nv:0:0:none:0\n' > "$TRUNKS_DIR/cftrunk"
    printf 'table_name(str) table_version(int)\ncftrunk:2\n' > "$TRUNKS_DIR/version"
  fi
  set -- "$@" -A "TRUNKS_DB=\"text://${TRUNKS_DIR}\""
fi
if [ -n "${RTPENGINE_SOCK:-}" ]; then set -- "$@" -A "RTPENGINE_SOCK=\"${RTPENGINE_SOCK}\""; fi
if [ -n "${TLS_LISTEN:-}" ]; then
  set -- "$@" -A "TLS_CFG=\"/etc/callfabric/tls.cfg\"" -A "TLS_LISTEN=${TLS_LISTEN}"
  if [ -n "${WSS_PORT:-}" ]; then
    # (a define string: its backslashes doubled for Kamailio's string escapes)
    origin=$(printf '%s' "${WS_ORIGIN_RE:-^\$}" | sed 's/\\/\\\\/g')
    set -- "$@" -A "WSS_ADDR=0.0.0.0" -A "WSS_PORT=${WSS_PORT}" -A "PHONE_SECRET=\"${PHONE_SECRET:-}\"" \
      -A "WS_ORIGIN_RE=\"${origin}\""
  fi
fi
exec "$@"
