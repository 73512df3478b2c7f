#!/bin/sh
# Fills the config set's @@NAME@@ placeholders from the environment into /etc/asterisk and
# runs Asterisk in the foreground with the set's asterisk.conf (the same [options] as local
# runs). ARI_USER/ARI_PASSWORD and AMI_USER/AMI_PASSWORD are read by bin/env-user.sh at load
# time (never written to disk). Websocket agents' connections (websocket_client.conf) are
# the operator's to add: mount a file with them over /etc/callfabric/asterisk/websocket_client.conf.
set -eu
src=/etc/callfabric/asterisk
dst=/etc/asterisk
for file in "$src"/*.conf; do
  sed -e "s|@@SIP_BIND@@|${SIP_BIND:-0.0.0.0:5060}|g" \
      -e "s|@@EDGE_IP@@|${EDGE_IP:?EDGE_IP (the Kamailio edge address) is required}|g" \
      -e "s|@@EDGE_URI@@|${EDGE_URI:-sip:${EDGE_IP}:5060}|g" \
      -e "s|@@HTTP_BIND@@|${HTTP_BIND:-0.0.0.0}|g" -e "s|@@HTTP_PORT@@|${HTTP_PORT:-8088}|g" \
      -e "s|@@RTP_START@@|${RTP_START:-10000}|g" -e "s|@@RTP_END@@|${RTP_END:-10200}|g" \
      -e "s|@@AMI_BIND@@|${AMI_BIND:-0.0.0.0}|g" -e "s|@@AMI_PORT@@|${AMI_PORT:-5038}|g" \
      -e "s|@@CONFIG_DIR@@|$src|g" -e "/@@WEBSOCKET_CLIENTS@@/d" "$file" > "$dst/$(basename "$file")"
done
exec asterisk -f -C "$dst/asterisk.conf"
