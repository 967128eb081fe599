#!/usr/bin/env bash
# Build llama.cpp's llama-server and llama-bench natively (-march=native; CPU=avx2 or avx512: see below)
# from the llama-cpp-python source distribution, for same-machine comparisons in bench/.
#
#   [CPU=avx2|avx512] bench/build_llama_cpp.sh [SDIST.tar.gz] [BUILD_DIR]
#
# SDIST defaults to downloading llama-cpp-python==0.3.36 with pip; BUILD_DIR defaults
# to bench/llama-native (gitignored). The shared libraries (libllama.so, libggml*.so)
# are built too, so LLAMA_CPP_LIB_PATH=BUILD_DIR/bin can point llama-cpp-python at them.
#
# Nothing is fetched while configuring or building: the web UI's assets would be
# downloaded from Hugging Face at build time unless LLAMA_USE_PREBUILT_UI is off
# (HF_ENABLED alone does not reach the script that downloads), and where the kernel
# allows it both steps run in a network namespace of their own with no interfaces.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
version=0.3.36
sdist="${1:-}"
build="${2:-$here/llama-native}"

die() { echo "build_llama_cpp: error: $*" >&2; exit 2; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

if [[ -z "$sdist" ]]; then
    python3 -m pip download --no-binary :all: --no-deps -d "$work" "llama-cpp-python==$version"
    sdist="$(ls "$work"/llama_cpp_python-*.tar.gz)"
fi
[[ -f "$sdist" ]] || die "no such source distribution: $sdist"

tar -xzf "$sdist" -C "$work"
src="$(ls -d "$work"/llama_cpp_python-*/vendor/llama.cpp)"
[[ -f "$src/CMakeLists.txt" ]] || die "$sdist holds no vendor/llama.cpp"

offline=()
if unshare -n true 2>/dev/null; then
    offline=(unshare -n)
fi

# CPU=avx2: the instructions of the AVX2 wheel (Zen 3) instead of -march=native, for the users' case beside
# dllama's NUMBA_CPU_NAME=znver3 build; also where a native build dies of an illegal instruction (a VM whose
# CPUID lists AMX that its hypervisor does not enable: seen on a Sapphire Rapids VM).
# CPU=avx512: such a Sapphire Rapids VM's own instructions less AMX (-march=native would add -mamx-*), so
# llama.cpp runs native against native beside dllama's own native (AVX-512 VNNI) build.
x86=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON)
case "${CPU:-native}" in
    native) cpu=(-DGGML_NATIVE=ON) ;;
    avx2) cpu=("${x86[@]}") ;;
    avx512) cpu=("${x86[@]}" -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON
                 -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON) ;;
    *) die "CPU must be native, avx2 or avx512, not ${CPU}" ;;
esac

mkdir -p "$build"
"${offline[@]}" cmake -S "$src" -B "$build" -G Ninja \
    -DCMAKE_BUILD_TYPE=Release \
    "${cpu[@]}" \
    -DBUILD_SHARED_LIBS=ON \
    -DLLAMA_CURL=OFF \
    -DHF_ENABLED=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF
"${offline[@]}" cmake --build "$build" --target llama-server llama-bench \
    -j "${JOBS:-$(nproc)}"

# The sources live in a temporary folder; the binaries find their libraries by
# RUNPATH in the build dir's bin/, which stays.
ls -l "$build"/bin/llama-server "$build"/bin/llama-bench "$build"/bin/libllama.so* "$build"/bin/libggml*.so*
