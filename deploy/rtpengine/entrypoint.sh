#!/bin/sh
# rtpengine for callfabric's edge: userspace forwarding (--table=-1), NG control on 2223/udp (the
# core network only: Kamailio's RTPENGINE_SOCK, the controllers' rtpengine_ng), RTP on
# RTP_PORT_MIN..RTP_PORT_MAX of the container's address, advertised as PUBLIC_RTP_ADDRESS when set
# (the address callers and carriers reach, behind NAT).
set -eu
address=$(ip -4 -o addr show scope global | awk '{split($4, a, "/"); print a[1]; exit}')
interface="$address"
if [ -n "${PUBLIC_RTP_ADDRESS:-}" ]; then interface="$address!$PUBLIC_RTP_ADDRESS"; fi
exec rtpengine --config-file=none --foreground --log-stderr --log-level="${LOG_LEVEL:-5}" --table=-1 \
  --interface="$interface" --listen-ng="$address:2223" \
  --port-min="${RTP_PORT_MIN:-30000}" --port-max="${RTP_PORT_MAX:-30200}" \
  --timeout=60 --silent-timeout=3600 --delete-delay=0 --num-threads="${THREADS:-4}"
