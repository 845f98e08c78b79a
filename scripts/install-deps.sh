#!/usr/bin/env bash
# Installs the system libraries mergekit links against (OpenBLAS, LAPACKE, zstd) when missing.
# As root it uses apt-get; otherwise it prints the command to run and fails.
set -euo pipefail

packages=(libopenblas-dev liblapacke-dev libzstd-dev)
headers=(cblas.h lapacke.h zstd.h)

have_header() {
  local h=$1
  for dir in /usr/include /usr/include/x86_64-linux-gnu /usr/include/aarch64-linux-gnu /usr/include/openblas /usr/local/include; do
    [[ -e "$dir/$h" ]] && return 0
  done
  return 1
}

missing=()
if command -v dpkg-query >/dev/null 2>&1; then
  for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
else
  for i in "${!headers[@]}"; do have_header "${headers[$i]}" || missing+=("${packages[$i]}"); done
fi

if [[ ${#missing[@]} -eq 0 ]]; then
  echo "deps: ${packages[*]} present"
  exit 0
fi

if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
  echo "deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "deps: missing ${missing[*]}." >&2
  echo "      Install them with: sudo apt-get install ${missing[*]}" >&2
  echo "      (on other systems: OpenBLAS with its CBLAS header, LAPACKE and zstd development files)" >&2
  exit 1
fi
