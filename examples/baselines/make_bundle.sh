#!/usr/bin/env bash
# Pack DeepSpeed and what it needs on the GPU machine into ./.ds-bundle/ (git-ignored; ~3 MB): a DeepSpeed
# wheel built here without pre-compiled ops (they are JIT-built there with its nvcc), the small Python
# packages it requires that the machine's image and the device bundle lack, and Debian's libaio .debs for
# the async_io op. Nothing of DeepSpeed is committed. Run from the project root:
#     bash examples/baselines/make_bundle.sh
set -euo pipefail
DS_VERSION=${DS_VERSION:-0.19.8}
out=.ds-bundle
grep -qx '/.ds-bundle/' .git/info/exclude 2>/dev/null || echo '/.ds-bundle/' >> .git/info/exclude
[ -d "$out/whl" ] && { echo "$out exists (delete it to rebuild)"; exit 0; }
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
mkdir -p "$out/whl" "$out/deb"
python3 -m pip download -q --no-deps --no-binary deepspeed -d "$tmp" "deepspeed==$DS_VERSION"
# DS_BUILD_OPS=0: a pure-Python wheel; its ops are compiled on first use on the GPU machine.
DS_BUILD_OPS=0 .venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w "$out/whl" "$tmp"/deepspeed-*.tar.gz
plat=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux2014_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)
python3 -m pip download -q --no-deps "${plat[@]}" -d "$out/whl" einops hjson ninja py-cpuinfo nvidia-ml-py psutil tqdm
(cd "$out/deb" && apt-get download libaio1 libaio-dev)
cp examples/baselines/setup_device.sh "$out/"
du -sh "$out"
