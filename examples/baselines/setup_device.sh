# Sourced on the GPU machine after .device-bundle/setup.sh:  source .ds-bundle/setup_device.sh
# Installs the DeepSpeed bundle under /tmp/ds-site once, unpacks libaio with dpkg -x, and sets what
# DeepSpeed's JIT op builder needs there: libaio's headers/library on the compiler's and loader's paths
# (CFLAGS/LDFLAGS are what async_io's compatibility check reads), ninja on PATH, and
# TORCH_CUDA_ARCH_LIST=9.0 (the image's "9.0a" is not parsed by DeepSpeed's op builder).
_dsb=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ ! -d /tmp/ds-site/deepspeed ]; then
  mkdir -p /tmp/ds-site /tmp/aio
  for w in "$_dsb"/whl/*.whl; do python3 -m zipfile -e "$w" /tmp/ds-site; done
  for d in "$_dsb"/deb/*.deb; do dpkg -x "$d" /tmp/aio; done
  mkdir -p /tmp/ds-site/bin && cp /tmp/ds-site/ninja-*.data/scripts/ninja /tmp/ds-site/bin/ninja
  chmod +x /tmp/ds-site/bin/ninja
  _lib=/tmp/aio/usr/lib/x86_64-linux-gnu
  [ -e "$_lib/libaio.so" ] || ln -sf "$(ls "$_lib"/libaio.so.1* | head -1)" "$_lib/libaio.so"
fi
export PYTHONPATH="$PYTHONPATH:/tmp/ds-site" PATH="/tmp/ds-site/bin:$PATH"
export CPATH="/tmp/aio/usr/include${CPATH:+:$CPATH}" LIBRARY_PATH="/tmp/aio/usr/lib/x86_64-linux-gnu${LIBRARY_PATH:+:$LIBRARY_PATH}"
export LD_LIBRARY_PATH="/tmp/aio/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export CFLAGS="-I/tmp/aio/usr/include" LDFLAGS="-L/tmp/aio/usr/lib/x86_64-linux-gnu"
export TORCH_CUDA_ARCH_LIST=9.0 DS_ACCELERATOR=cuda
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}
python3 -c "import deepspeed; print('deepspeed', deepspeed.__version__)"
