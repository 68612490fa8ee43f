#!/usr/bin/env bash
# Build llama.cpp's llama-completion, llama-tokenize and llama-quantize (CPU) from the source that the
# llama-cpp-python sdist vendors, once, into a cache folder; print the folder that holds them. Needs cmake and
# a C++ compiler (about 3 minutes on 2 cores). tests/test_gguf.py runs our GGUF files in llama.cpp with them;
# `python -m sft_recipes.merge gguf=q4_k_m` (llama.cpp's k-quants) finds llama-quantize there.
#   bin=$(bash tools/llama_cpp.sh) && "$bin/llama-completion" -m RUN/merged/model.Q8_0.gguf -cnv
set -euo pipefail
VERSION="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
PY="${PYTHON:-python3}"
# CPU flags: on x86-64 with AVX2, AVX2/FMA/F16C and no more. A native build (-march=native) also compiles ggml's AMX
# kernels where the CPU reports AMX, and on this project's machines (Xeon with AMX, in a VM) every matrix product there
# ended in a general protection fault: llama-completion crashed at its first token.
if [[ "$(uname -m)" == x86_64 ]] && grep -qw avx2 /proc/cpuinfo 2>/dev/null; then
  FLAVOUR=avx2
  CPU_FLAGS=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON)
else
  FLAVOUR=native
  CPU_FLAGS=(-DGGML_NATIVE=ON)
fi
ROOT="${SFT_RECIPES_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sft_recipes}/llama.cpp-$VERSION-$FLAVOUR"
BIN="$ROOT/build/bin"
if [[ -x "$BIN/llama-completion" && -x "$BIN/llama-tokenize" && -x "$BIN/llama-quantize" ]]; then echo "$BIN"; exit 0; fi

mkdir -p "$ROOT"
work=$(mktemp -d "$ROOT.tmp-XXXXXX")
trap 'rm -rf "$work"' EXIT
{
  "$PY" -m pip download -q --no-deps --no-binary=:all: "llama-cpp-python==$VERSION" -d "$work"
  tar xzf "$work"/llama_cpp_python-"$VERSION".tar.gz -C "$work"
  src="$work/llama_cpp_python-$VERSION/vendor/llama.cpp"
  gen=(); command -v ninja >/dev/null && gen=(-G Ninja)
  cmake -S "$src" -B "$work/build" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF "${CPU_FLAGS[@]}" -DBUILD_SHARED_LIBS=OFF
  cmake --build "$work/build" -j "$(nproc)" --target llama-completion llama-tokenize llama-quantize
} >&2
rm -rf "$ROOT/build"
mv "$work/build" "$ROOT/build"
echo "$BIN"
