#!/usr/bin/env bash
# .whl/ for Ray Train + DeepSpeed runs of jobs/pretrain.py on the device machine WITH
# causal-conv1d (the job's fused conv + SSD path): ../shared/device/wheelhouse.sh's train set
# (51 MB) plus causal-conv1d's 24 MB would pass the 64 MiB carry limit, so the Ray wheel is
# replaced by an xz tarball of its unpacked tree without ray/rllib, ray/llm and the
# dashboard's source maps (install.sh unpacks every .whl/*.tar.xz into its site dir).
#
#   PYTHON=.venv/bin/python bash bench/wheelhouse_job.sh     # from the project root
#   device run: carry [".whl"], command starts `source .whl/install.sh || exit;`
set -euo pipefail
root=$(git rev-parse --show-toplevel); cd "$root"
shared=$(cd "$root/../shared/device" && pwd)
bash "$shared/wheelhouse.sh" train >/dev/null
wheel=$(ls .whl/ray-*.whl); tmp=$(mktemp -d)
# unpacked keeping each file's mode (python -m zipfile -e drops it: Ray's gcs_server and
# raylet lost their exec bit, and ray.init failed with PermissionError)
python3 - "$wheel" "$tmp" <<'EOF'
import os, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for info in z.infolist():
        path = z.extract(info, sys.argv[2])
        if info.external_attr >> 16:
            os.chmod(path, (info.external_attr >> 16) & 0o777)
EOF
rm -rf "$tmp"/ray/rllib "$tmp"/ray/llm
find "$tmp"/ray/dashboard -name '*.map' -delete
tar -C "$tmp" -cf - . | xz -T0 -9 > .whl/ray.tar.xz
rm -rf "$tmp" "$wheel"
cp "$shared"/causal_conv1d-*.tar.xz .whl/
ls -la .whl; du -sh .whl
size=$(du -sm .whl | cut -f1)
[ "$size" -lt 62 ] || { echo "wheelhouse_job.sh: .whl is ${size} MiB, over what one device call carries" >&2; exit 1; }
