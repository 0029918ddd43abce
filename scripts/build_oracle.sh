#!/usr/bin/env bash
# Build (once) and install llama-cpp-python, the ggml oracle used by the bit-exactness tests.
#   scripts/build_oracle.sh [nofma|default] [--install PYTHON]
# The wheel is cached per variant under $QUANTGATE_WHEEL_CACHE (default ~/.cache/quantgate/wheels),
# because pip's own wheel cache is keyed by the sdist only and would mix the two C-flag variants.
set -euo pipefail
VERSION=0.3.36
VARIANT=${1:-nofma}
PY=${3:-python3}
ROOT=${QUANTGATE_WHEEL_CACHE:-$HOME/.cache/quantgate/wheels}
DEST="$ROOT/llama-cpp-python-$VERSION-$VARIANT"
case "$VARIANT" in
  nofma)   FLAGS="-DCMAKE_C_FLAGS=-ffp-contract=off -DCMAKE_CXX_FLAGS=-ffp-contract=off" ;;
  default) FLAGS="" ;;
  *) echo "unknown oracle variant: $VARIANT (nofma|default)" >&2; exit 2 ;;
esac
# x86-64: the CPU backend is built for this machine's instruction sets but never with AMX. A -march=native build
# on a CPU that advertises AMX (Sapphire Rapids and later) runs `ldtilecfg` in matmul worker threads that never
# asked the kernel for AMX state (arch_prctl ARCH_REQ_XCOMP_PERM): a general protection fault as soon as a Q8_0 /
# Q4_0 model is evaluated. Measured on this project's machines (2026-12-02). The reference quantizers
# (libggml-base, the oracle proper) get no arch flags either way.
if [ "$(uname -m)" = x86_64 ]; then
  FLAGS="$FLAGS -DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
  has() { grep -m1 '^flags' /proc/cpuinfo | tr ' ' '\n' | grep -qx "$1"; }
  for f in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx512f:AVX512 avx512vbmi:AVX512_VBMI \
           avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16; do
    if has "${f%%:*}"; then FLAGS="$FLAGS -DGGML_${f##*:}=ON"; else FLAGS="$FLAGS -DGGML_${f##*:}=OFF"; fi
  done
fi
# The cache key includes the flags: a wheel built with other flags is never reused.
DEST="$DEST-$(printf '%s' "$FLAGS" | sha256sum | cut -c1-12)"
if ! ls "$DEST"/llama_cpp_python-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $VERSION ($VARIANT); this takes ~10 minutes on 2 cores" >&2
  tmp="$DEST.tmp.$$"; rm -rf "$tmp"; mkdir -p "$tmp"
  CMAKE_ARGS="$FLAGS -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
  CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
    "$PY" -m pip wheel --no-deps --no-cache-dir --no-binary llama-cpp-python \
      "llama-cpp-python==$VERSION" -w "$tmp" >&2
  rm -rf "$DEST"; mv "$tmp" "$DEST"
fi
# The pinned llama.cpp source itself (the sdist vendors it): the converter-comparison tests run its
# convert_hf_to_gguf.py. Kept beside the wheels.
SRC_ROOT="$(dirname "$ROOT")/src"
if [ ! -d "$SRC_ROOT/llama_cpp_python-$VERSION/vendor/llama.cpp" ]; then
  tmp="$SRC_ROOT.tmp.$$"; rm -rf "$tmp"; mkdir -p "$tmp"
  "$PY" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$tmp" >&2
  tar xzf "$tmp"/llama_cpp_python-$VERSION.tar.gz -C "$tmp"
  mkdir -p "$SRC_ROOT"; rm -rf "$SRC_ROOT/llama_cpp_python-$VERSION"
  mv "$tmp/llama_cpp_python-$VERSION" "$SRC_ROOT/"; rm -rf "$tmp"
fi
if [ "${2:-}" = "--install" ]; then
  "$PY" -m pip install -q --force-reinstall --no-deps "$DEST"/llama_cpp_python-*.whl >&2
  "$PY" -m pip install -q "diskcache>=5.6" "jinja2>=2.11" "typing-extensions>=4.5" >&2
fi
echo "$DEST"
