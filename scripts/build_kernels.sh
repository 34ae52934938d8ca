#!/usr/bin/env bash
# Build rotgraph's custom onnxruntime kernels: build/kernels/librotgraph_ops.so and, beside it,
# librotgraph_ops.json, which records what the library was built for (rotgraph.kernels reads it and only
# registers the library on a CPU that has every instruction-set extension it lists). scripts/setup.sh runs
# it, and so does building the package (setup.py: `pip install .`, a wheel), which copies both files into
# rotgraph/kernels/ of the installed package.
#
# A custom-op library needs onnxruntime's C API headers, which no PyPI wheel ships; Debian packages them
# as libonnxruntime-dev. This fetches that .deb from the Debian archive this machine's apt already uses
# (checked against its SHA-256), unpacks only the headers into build/, and compiles rotgraph_ops.cc
# against them. Nothing is installed system-wide and the library does not link against onnxruntime:
# onnxruntime hands it the C API when it registers the library (API version 21 of the header; newer
# onnxruntime releases accept older versions).
#
# Environment:
#   ROTGRAPH_KERNEL_NATIVE=1     compile for this machine's CPU (-march=native); the library then refuses
#                                to load on a CPU without the same extensions. Default: a portable
#                                baseline (x86-64-v2 on x86-64: SSE4.2 and POPCNT, every x86-64 CPU since
#                                about 2009; the compiler's default elsewhere).
#   ROTGRAPH_KERNEL_CXXFLAGS     replaces the optimization and target flags (default -O3 and the above).
#   ROTGRAPH_ORT_INCLUDE         a folder that already holds onnxruntime_c_api.h and its C++ companions
#                                (e.g. an onnxruntime release's include/): no download.
#   ROTGRAPH_ORT_DEB_URL         where to fetch the .deb instead of the apt archive.
#   ROTGRAPH_KERNEL_REBUILD=1    build even when the library is up to date.
#   CXX                          the compiler (g++).
set -euo pipefail
cd "$(dirname "$0")/.."
DEB=libonnxruntime-dev_1.21.0+dfsg-1_amd64.deb
SHA256=14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08
POOL=pool/main/o/onnxruntime
CXX=${CXX:-g++}
SOURCE=rotgraph/kernels/rotgraph_ops.cc
OUT_DIR=build/kernels
OUT=$OUT_DIR/librotgraph_ops.so
INFO=$OUT_DIR/librotgraph_ops.json
HEADERS=${ROTGRAPH_ORT_INCLUDE:-build/onnxruntime-headers}
MACHINE=$(uname -m)

if [ -n "${ROTGRAPH_KERNEL_CXXFLAGS:-}" ]; then
  TARGET_FLAGS=$ROTGRAPH_KERNEL_CXXFLAGS
elif [ "${ROTGRAPH_KERNEL_NATIVE:-0}" = 1 ]; then
  TARGET_FLAGS="-O3 -march=native"
elif [ "$MACHINE" = x86_64 ]; then
  TARGET_FLAGS="-O3 -march=x86-64-v2 -mtune=generic"
else
  TARGET_FLAGS="-O3"
fi
# -ffp-contract=off last, so that no flag above can turn it back on: a fused multiply-add rounds once where
# the ONNX function bodies round twice.
CXXFLAGS="-std=c++17 $TARGET_FLAGS -ffp-contract=off -fPIC -shared -fvisibility=hidden -Wall -Wextra -Wno-psabi"

# The Debian archive URIs of this machine's apt sources (one-line .list and deb822 .sources files), in
# order: entries of type `deb` with the `main` component, security suites left out.
apt_archives() {
  local f
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
    [ -f "$f" ] || continue
    # deb [options] URI suite component...
    sed -e 's/#.*//' -e 's/\[[^]]*\]//' "$f" |
      awk '$1 == "deb" && $3 !~ /-security$/ { for (i = 4; i <= NF; i++) if ($i == "main") { print $2; break } }'
  done
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk 'function flush() {
           if (types ~ /(^| )deb( |$)/ && comps ~ /(^| )main( |$)/ && suites !~ /-security/ && enabled != "no")
             { n = split(uris, u, " "); for (i = 1; i <= n; i++) print u[i] }
           types = uris = suites = comps = enabled = ""
         }
         /^[ \t]*#/ { next }
         /^[ \t]*$/ { flush(); next }
         { key = tolower($1); $1 = ""; sub(/^ +/, "") }
         key == "types:" { types = $0 } key == "uris:" { uris = $0 } key == "suites:" { suites = $0 }
         key == "components:" { comps = $0 } key == "enabled:" { enabled = tolower($0) }
         END { flush() }' "$f"
  done
}

fetch_headers() {
  local url urls fetched=""
  mkdir -p build
  tmp=$(mktemp -d build/ortdev.XXXXXX)  # global: the EXIT trap runs after this function has returned
  trap 'rm -rf "$tmp"' EXIT
  if [ -n "${ROTGRAPH_ORT_DEB_URL:-}" ]; then
    urls=$ROTGRAPH_ORT_DEB_URL
  else
    urls=$(apt_archives | awk -v pool="$POOL" -v deb="$DEB" '!seen[$0]++ { sub(/\/+$/, ""); print $0 "/" pool "/" deb }')
  fi
  for url in $urls; do
    echo "build_kernels.sh: fetching $url"
    if curl -fsSL --retry 3 -o "$tmp/$DEB" "$url"; then
      fetched=$url
      break
    fi
  done
  if [ -z "$fetched" ]; then
    cat >&2 <<EOF
build_kernels.sh: could not fetch $DEB (tried: ${urls:-no Debian archive found in /etc/apt/sources.list*}).
  The kernels need onnxruntime's C API headers (onnxruntime_c_api.h, onnxruntime_cxx_api.h,
  onnxruntime_lite_custom_op.h, ...). Either
  - set ROTGRAPH_ORT_INCLUDE to a folder holding them, e.g. the include/ folder of an onnxruntime
    release archive (onnxruntime-linux-x64-<version>.tgz, version 1.21 or newer), or
  - set ROTGRAPH_ORT_DEB_URL to a reachable copy of $DEB (SHA-256 $SHA256),
  and run bash scripts/build_kernels.sh again.
EOF
    exit 1
  fi
  echo "$SHA256  $tmp/$DEB" | sha256sum -c --quiet -
  dpkg-deb -x "$tmp/$DEB" "$tmp/root"
  rm -rf "$HEADERS"
  mv "$tmp/root/usr/include/onnxruntime" "$HEADERS"
}

if ! "$CXX" --version >/dev/null 2>&1; then  # before fetching headers that it could not compile against
  echo "build_kernels.sh: no working C++ compiler (CXX=$CXX); install g++ or set CXX" >&2
  exit 1
fi
if [ -n "${ROTGRAPH_ORT_INCLUDE:-}" ] && [ ! -f "$HEADERS/onnxruntime_c_api.h" ]; then
  echo "build_kernels.sh: ROTGRAPH_ORT_INCLUDE=$HEADERS holds no onnxruntime_c_api.h" >&2
  exit 1
fi
[ -f "$HEADERS/onnxruntime_c_api.h" ] || fetch_headers

# The instruction-set extensions the compiler may use under these flags, as /proc/cpuinfo names them
# (from the compiler's predefined macros). A macro beyond plain x86-64 that this table does not know
# stops the build: the library would need an extension that rotgraph.kernels could not check for.
declare -A CPUINFO_NAME=(
  [__MMX__]=mmx [__FXSR__]=fxsr [__SSE__]=sse [__SSE2__]=sse2 [__SSE3__]=pni [__SSSE3__]=ssse3
  [__SSE4_1__]=sse4_1 [__SSE4_2__]=sse4_2 [__CRC32__]=sse4_2 [__SSE4A__]=sse4a [__POPCNT__]=popcnt
  [__LAHF_SAHF__]=lahf_lm [__GCC_HAVE_SYNC_COMPARE_AND_SWAP_16]=cx16 [__AVX__]=avx [__AVX2__]=avx2 [__FMA__]=fma
  [__FMA4__]=fma4 [__XOP__]=xop [__F16C__]=f16c [__BMI__]=bmi1 [__BMI2__]=bmi2 [__LZCNT__]=abm [__ABM__]=abm
  [__MOVBE__]=movbe [__AES__]=aes [__PCLMUL__]=pclmulqdq [__SHA__]=sha_ni [__ADX__]=adx [__RDRND__]=rdrand
  [__RDSEED__]=rdseed [__XSAVE__]=xsave [__XSAVEOPT__]=xsaveopt [__XSAVEC__]=xsavec [__XSAVES__]=xsaves
  [__CLFLUSHOPT__]=clflushopt [__CLWB__]=clwb [__FSGSBASE__]=fsgsbase [__RDPID__]=rdpid [__PRFCHW__]=3dnowprefetch
  [__GFNI__]=gfni [__VAES__]=vaes [__VPCLMULQDQ__]=vpclmulqdq [__AVXVNNI__]=avx_vnni [__AVX512F__]=avx512f
  [__AVX512CD__]=avx512cd [__AVX512DQ__]=avx512dq [__AVX512BW__]=avx512bw [__AVX512VL__]=avx512vl
  [__AVX512IFMA__]=avx512ifma [__AVX512VBMI__]=avx512vbmi [__AVX512VBMI2__]=avx512_vbmi2
  [__AVX512VNNI__]=avx512_vnni [__AVX512BITALG__]=avx512_bitalg [__AVX512VPOPCNTDQ__]=avx512_vpopcntdq
  [__AVX512BF16__]=avx512_bf16 [__AVX512FP16__]=avx512_fp16 [__AVX512VP2INTERSECT__]=avx512_vp2intersect
  [__AMX_TILE__]=amx_tile [__AMX_INT8__]=amx_int8 [__AMX_BF16__]=amx_bf16 [__CLZERO__]=clzero [__MWAITX__]=mwaitx
  [__PKU__]=pku [__SGX__]=sgx [__SERIALIZE__]=serialize [__WAITPKG__]=waitpkg [__MOVDIRI__]=movdiri
  [__MOVDIR64B__]=movdir64b [__WBNOINVD__]=wbnoinvd
)
macros() {  # the predefined macros of the compiler under the given flags
  "$CXX" "$@" -dM -E -x c++ /dev/null | awk '$1 == "#define" { print $2 }' | sort -u
}
cpu_flags=()
if [ "$MACHINE" = x86_64 ]; then
  # shellcheck disable=SC2086
  baseline=$(macros $CXXFLAGS -march=x86-64 -mtune=generic)  # the same flags for plain x86-64
  # shellcheck disable=SC2086
  for macro in $(macros $CXXFLAGS); do
    if [ -n "${CPUINFO_NAME[$macro]:-}" ]; then
      cpu_flags+=("${CPUINFO_NAME[$macro]}")
    elif ! grep -qx -- "$macro" <<<"$baseline" &&
      [[ ! $macro =~ ^__[a-z] && ! $macro =~ ^__FP_FAST_ && $macro != __SHSTK__ ]]; then
      # lower-case macros name the target CPU (__znver3__, __tune_haswell__); __FP_FAST_FMA* follow
      # __FMA__; CET's shadow-stack instructions are NOPs on CPUs without it.
      echo "build_kernels.sh: the flags ($CXXFLAGS) enable $macro, which this script cannot map to a" \
        "/proc/cpuinfo flag; add it to CPUINFO_NAME or build without it" >&2
      exit 1
    fi
  done
  mapfile -t cpu_flags < <(printf '%s\n' "${cpu_flags[@]}" | sort -u)
fi

# Up to date: the same source, headers, compiler and flags as the library's record says.
stamp=$({
  cat "$SOURCE" "$HEADERS/onnxruntime_c_api.h" scripts/build_kernels.sh
  "$CXX" --version | head -1
  echo "$CXXFLAGS"
} | sha256sum | cut -d' ' -f1)
if [ "${ROTGRAPH_KERNEL_REBUILD:-0}" != 1 ] && [ -f "$OUT" ] && [ -f "$INFO" ] && grep -q "\"inputs_sha256\": \"$stamp\"" "$INFO"; then
  echo "build_kernels.sh: $OUT is up to date"
  exit 0
fi

mkdir -p "$OUT_DIR"
rm -f "$INFO"  # a library without its record is never registered, so no stale record may describe it
# shellcheck disable=SC2086
"$CXX" $CXXFLAGS -I"$HEADERS" "$SOURCE" -o "$OUT.tmp"
mv "$OUT.tmp" "$OUT"
flags_json=""
[ ${#cpu_flags[@]} -eq 0 ] || flags_json=$(printf '"%s", ' "${cpu_flags[@]}")
cat >"$INFO.tmp" <<EOF
{
  "library": "$(basename "$OUT")",
  "machine": "$MACHINE",
  "cpu_flags": [${flags_json%, }],
  "cxxflags": "$CXXFLAGS",
  "compiler": "$("$CXX" --version | head -1)",
  "inputs_sha256": "$stamp"
}
EOF
mv "$INFO.tmp" "$INFO"
rm -f rotgraph/kernels/librotgraph_ops.so  # where older versions of this script built it
echo "built $OUT for $MACHINE (${cpu_flags[*]:-no extensions}); record in $INFO"
