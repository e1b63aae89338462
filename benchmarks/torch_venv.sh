#!/usr/bin/env bash
# benchmarks/torch_venv.sh TORCH_VERSION PYTHON_VERSION [PACKAGE...]
#
# Makes (once) and prints the path of a cached virtual environment with Python PYTHON_VERSION
# (e.g. 3.12, from pyenv or `pythonX.Y` on PATH) and torch==TORCH_VERSION, plus what the build
# needs (setuptools, wheel, ninja, numpy) and the extra PACKAGEs. The cache lives outside the
# repository, in ${FUSED_RESNET_CACHE:-$HOME/.cache/fused_resnet}/venvs/torch-VERSION-pyX.Y; a
# stamp file records what was installed, so a second call costs nothing and a call with other
# packages installs only those.
#
# pip on this machine is capped at torch 2.14.1 (/etc/xdg/pip/constraints.txt): a newer release is
# installed with the constraint file replaced by an empty one for that one call.
# Everything pip says goes to stderr; stdout is the path alone.
set -euo pipefail
torch_version=${1:?usage: torch_venv.sh TORCH_VERSION PYTHON_VERSION [PACKAGE...]}
python_version=${2:?usage: torch_venv.sh TORCH_VERSION PYTHON_VERSION [PACKAGE...]}
shift 2
cache=${FUSED_RESNET_CACHE:-$HOME/.cache/fused_resnet}
venv="$cache/venvs/torch-$torch_version-py$python_version"
stamp="$venv/.fused_resnet-stamp"

find_python() {
  local candidate
  # A pyenv shim on PATH may exist and still refuse to run: try each candidate.
  for candidate in "$(pyenv root 2> /dev/null)"/versions/"$python_version".*/bin/python \
    "$(command -v "python$python_version" 2> /dev/null)"; do
    [[ -x "$candidate" ]] && "$candidate" -c "" 2> /dev/null && { echo "$candidate"; return; }
  done
  echo "torch_venv.sh: no Python $python_version found (neither python$python_version on PATH nor in pyenv)" >&2
  return 1
}

wanted=(setuptools wheel ninja numpy "$@")
if [[ ! -x "$venv/bin/python" ]]; then
  mkdir -p "$cache/venvs"
  "$(find_python)" -m venv "$venv" >&2
fi
missing=()
for package in "torch==$torch_version" "${wanted[@]}"; do
  grep -qxF "$package" "$stamp" 2> /dev/null || missing+=("$package")
done
if ((${#missing[@]})); then
  constraint=()
  if [[ "$(printf '%s\n' "$torch_version" 2.14.1 | sort -V | tail -n 1)" != 2.14.1 ]]; then
    constraint=(env PIP_CONSTRAINT=/dev/null)
  fi
  echo "torch_venv.sh: installing ${missing[*]} into $venv" >&2
  "${constraint[@]}" "$venv/bin/python" -m pip install -q "torch==$torch_version" "${wanted[@]}" >&2
  { cat "$stamp" 2> /dev/null || true; printf '%s\n' "torch==$torch_version" "${wanted[@]}"; } | sort -u > "$stamp.new"
  mv "$stamp.new" "$stamp"
fi
echo "$venv"
