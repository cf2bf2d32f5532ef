#!/bin/sh
# Mosquitto for the compose layout: runs deploy/mosquitto/mosquitto.conf with two lines changed
# (the password listener on all interfaces of the compose network instead of loopback, and the
# CRL in a writable volume), after the first CRL could be fetched from a control-plane replica
# (Mosquitto refuses to start without it). Then every CRL_PULL_SECONDS it fetches the CRL again
# (GET /crl.pem on a replica's metrics port, the first of CRL_URLS that answers) and reloads
# Mosquitto (SIGHUP) when it changed: a revoked device is refused from its next connection at
# most CRL_PULL_SECONDS after the revocation (the control plane ends its open session at once).
set -eu

conf=/tmp/mosquitto.conf
crl=/var/lib/mosquitto-crl/devices.crl.pem
pull_seconds=${CRL_PULL_SECONDS:-60}

sed -e 's|^listener 1883 127\.0\.0\.1$|listener 1883|' \
    -e "s|^crlfile .*|crlfile $crl|" /edgefleet/mosquitto.conf >"$conf"
chown mosquitto: "$(dirname "$crl")"

# Fetches the CRL into $crl; exit status 0 when the file changed.
pull() {
  for url in $CRL_URLS; do
    if wget -q -T 10 -O "$crl.new" "$url"; then
      if [ -f "$crl" ] && cmp -s "$crl.new" "$crl"; then
        rm -f "$crl.new"
        return 1
      fi
      mv -f "$crl.new" "$crl"
      return 0
    fi
  done
  echo "mosquitto-entrypoint: no control plane served its CRL" >&2
  return 1
}

until pull; do
  sleep 5
done
mosquitto -c "$conf" &
pid=$!
trap 'kill -TERM "$pid"' TERM INT
while kill -0 "$pid" 2>/dev/null; do
  sleep "$pull_seconds" &
  wait $! || true
  if pull; then
    kill -HUP "$pid"
  fi
done
wait "$pid"
