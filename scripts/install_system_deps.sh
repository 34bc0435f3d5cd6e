#!/usr/bin/env bash
# System libraries the Python packages load at run time, from Debian's packages:
# FFmpeg's shared libraries (torchcodec, which lerobot decodes videos with; without
# them lerobot falls back to PyAV) and EGL with Mesa's software renderer for headless MuJoCo rendering.
# Best effort: skipped without root or apt-get, when everything is present already.
set -u
packages=(libavcodec59 libavformat59 libavutil57 libswscale6 libswresample4 libavdevice59
          libavfilter8 libegl1 libegl-mesa0 libgl1 libgl1-mesa-dri)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "note: missing system packages (${missing[*]}); install them with apt-get for video decoding and rendering" >&2
  exit 0
fi
echo "installing system packages: ${missing[*]}"
apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
