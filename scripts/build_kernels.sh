#!/usr/bin/env bash
# Build rotgraph's custom onnxruntime kernels (rotgraph/kernels/librotgraph_ops.so).
#
# A custom-op library needs onnxruntime's C API headers, which no PyPI wheel ships; Debian packages them
# as libonnxruntime-dev. This fetches that .deb from Debian's archive (checked against its SHA-256),
# unpacks only the headers into build/, and compiles rotgraph_ops.cc against them. Nothing is installed
# system-wide and the library does not link against onnxruntime: onnxruntime hands it the C API when it
# registers the library (API version 21 of the header; newer onnxruntime releases accept older versions).
set -euo pipefail
cd "$(dirname "$0")/.."
DEB=libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb
SHA256=14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08
URL=${ROTGRAPH_ORT_DEB_URL:-http://deb.debian.org/debian/pool/main/o/onnxruntime/$DEB}
CXX=${CXX:-g++}
CXXFLAGS=${ROTGRAPH_KERNEL_CXXFLAGS:--O3 -march=native}
OUT=rotgraph/kernels/librotgraph_ops.so
# ROTGRAPH_ORT_INCLUDE: a folder that already holds onnxruntime_c_api.h and its C++ companions (e.g. an
# onnxruntime release's include/), for machines that cannot reach Debian's archive.
HEADERS=${ROTGRAPH_ORT_INCLUDE:-build/onnxruntime-headers}

if [ -n "${ROTGRAPH_ORT_INCLUDE:-}" ] && [ ! -f "$HEADERS/onnxruntime_c_api.h" ]; then
  echo "ROTGRAPH_ORT_INCLUDE=$HEADERS holds no onnxruntime_c_api.h" >&2
  exit 1
fi
if [ ! -f "$HEADERS/onnxruntime_c_api.h" ]; then
  mkdir -p build
  tmp=$(mktemp -d build/ortdev.XXXXXX)
  trap 'rm -rf "$tmp"' EXIT
  curl -fsSL --retry 3 -o "$tmp/$DEB" "$URL"
  echo "$SHA256  $tmp/$DEB" | sha256sum -c --quiet -
  dpkg-deb -x "$tmp/$DEB" "$tmp/root"
  rm -rf "$HEADERS"
  mv "$tmp/root/usr/include/onnxruntime" "$HEADERS"
fi

# shellcheck disable=SC2086
"$CXX" -std=c++17 $CXXFLAGS -fPIC -shared -fvisibility=hidden -Wall -Wextra \
  -I"$HEADERS" rotgraph/kernels/rotgraph_ops.cc -o "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
echo "built $OUT"
