#!/usr/bin/env bash
# System packages and services that matchmap's tests and demo need (Debian 12, run as root).
# Idempotent: installs only what is missing, starts PostgreSQL only if it is not running.
set -euo pipefail

APT_PACKAGES=(espeak-ng libespeak-ng1 sox postgresql festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts flite
              chromium chromium-driver  # headless Chromium drives the search page in tests/test_web.py
              fonts-noto-color-emoji unicode-data)  # the objects world's glyphs and emoji groups
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing system packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# PostgreSQL on loopback for the catalog tests: role and database "matchmap".
if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  version=$(ls /usr/lib/postgresql | sort -n | tail -n 1)
  if ! pg_lsclusters -h | grep -q "^$version main"; then
    pg_createcluster "$version" main >/dev/null
  fi
  pg_ctlcluster "$version" main start
  for _ in $(seq 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
fi
su postgres -c "psql -tAc \"SELECT 1 FROM pg_roles WHERE rolname='matchmap'\"" | grep -q 1 \
  || su postgres -c "psql -qc \"CREATE ROLE matchmap LOGIN PASSWORD 'matchmap' CREATEDB\""
su postgres -c "psql -tAc \"SELECT 1 FROM pg_database WHERE datname='matchmap_test'\"" | grep -q 1 \
  || su postgres -c "psql -qc \"CREATE DATABASE matchmap_test OWNER matchmap\""
