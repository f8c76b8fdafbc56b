#!/usr/bin/env bash
# Packs a small kit for an offline GPU machine (Python 3.12, numpy, no TVM, no gguf)
# into .device/ at the project root, kept out of git through .git/info/exclude.
# It holds TVM's runtime-only half (the full wheel's libtvm_compiler.so alone is
# 92 MB compressed): compile on the CPU machine, run the modules there.
#
#   bash bench/device/pack.sh           # once per machine; ~6 MB
#   then on the GPU machine:  source .device/setup.sh && python3 ...
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
mkdir -p .git/info .device
grep -qx '/.device/' .git/info/exclude 2>/dev/null || echo '/.device/' >> .git/info/exclude
TVM_VERSION=${TVM_VERSION:-0.27.0.post1}
FFI_VERSION=${FFI_VERSION:-0.1.14.post1}  # 0.1.15.x segfaults in tvm.ir.save_json with this TVM (pyproject.toml)
tmp=$(mktemp -d)
plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
    -d "$tmp" "apache-tvm==$TVM_VERSION" "apache-tvm-ffi==$FFI_VERSION" gguf
rm -f .device/*.whl
cp "$tmp"/apache_tvm_ffi-*.whl "$tmp"/gguf-*.whl .device/
python3 - "$tmp" <<'PY'
import glob, sys, tarfile, zipfile, io
whl = glob.glob(sys.argv[1] + "/apache_tvm-*.whl")[0]
skip = ("tvm/lib/libtvm_compiler.so", "tvm/3rdparty/")
with zipfile.ZipFile(whl) as z, tarfile.open(".device/tvm_runtime.tar.xz", "w:xz") as t:
    for i in z.infolist():
        if i.is_dir() or not i.filename.startswith("tvm/") or i.filename.startswith(skip):
            continue
        data = z.read(i)
        ti = tarfile.TarInfo(i.filename); ti.size = len(data); ti.mode = 0o755
        t.addfile(ti, io.BytesIO(data))
PY
cp "$(dirname "$0")/setup.sh" .device/setup.sh
rm -rf "$tmp"
du -sh .device
