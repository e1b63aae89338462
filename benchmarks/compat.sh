#!/usr/bin/env bash
# benchmarks/compat.sh [TORCH_VERSION:PYTHON_VERSION ...]
#
# Builds fused_resnet against each supported torch release and runs benchmarks/compat_smoke.py:
#   2.11.0 on Python 3.12  the GPU machine's stack (torch 2.11.0+cu130 from PyPI)
#   2.13.0 on Python 3.11  the CPU wheel
#   2.14.1 on Python 3.11  the CUDA build pip gives on Linux (the project's default)
#   2.15.0 on Python 3.11  the latest release (past this machine's pip cap, lifted for that install)
# Each release has its own cached virtual environment (benchmarks/torch_venv.sh, outside the repo).
# For each: a CPU-only build (FUSED_RESNET_NO_CUDA=1) and, where torch is a CUDA build, the
# default build, which finds nvcc and compiles and links the CUDA kernels, for sm_90 only
# (TORCH_CUDA_ARCH_LIST=9.0: one architecture shows that the sources build; the default adds sm_80).
# No other override: the build chooses the C++ standard and the CUDA toolkit itself.
# Builds run in a scratch copy of the working tree (tracked and untracked files), so the
# checkout's own fused_resnet/_C*.so is left alone. Logs go to ${COMPAT_LOGS:-/tmp/fused_resnet-compat}.
# Exit status: 0 when every build and smoke test passed.
set -uo pipefail
cd "$(dirname "$0")/.."
specs=("$@")
((${#specs[@]})) || specs=(2.11.0:3.12 2.13.0:3.11 2.14.1:3.11 2.15.0:3.11)
logs=${COMPAT_LOGS:-/tmp/fused_resnet-compat}
mkdir -p "$logs"
failures=0

for spec in "${specs[@]}"; do
  torch_version=${spec%%:*} python_version=${spec##*:}
  tag="torch-$torch_version-py$python_version"
  if ! venv=$(bash benchmarks/torch_venv.sh "$torch_version" "$python_version" 2> "$logs/$tag-venv.log"); then
    echo "FAIL $tag: no virtual environment (see $logs/$tag-venv.log)"
    failures=$((failures + 1))
    continue
  fi
  python="$venv/bin/python"
  builds=(cpu)
  [[ "$("$python" -c 'import torch; print(torch.version.cuda is not None)')" == True ]] && builds+=(cuda)
  for build in "${builds[@]}"; do
    scratch=$(mktemp -d)
    git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$scratch"
    start=$SECONDS
    if [[ $build == cpu ]]; then
      env_build=(FUSED_RESNET_NO_CUDA=1)
    else
      env_build=(TORCH_CUDA_ARCH_LIST=9.0)
    fi
    if (cd "$scratch" && env "${env_build[@]}" "$python" setup.py build_ext --inplace) > "$logs/$tag-$build-build.log" 2>&1 \
      && (cd "$scratch" && PYTHONPATH="$scratch" "$python" benchmarks/compat_smoke.py "$build") > "$logs/$tag-$build-smoke.log" 2>&1; then
      echo "ok   $tag $build build: built and smoke-tested in $((SECONDS - start)) s"
    else
      echo "FAIL $tag $build build after $((SECONDS - start)) s: see $logs/$tag-$build-{build,smoke}.log"
      tail -n 5 "$logs/$tag-$build-build.log" "$logs/$tag-$build-smoke.log" 2> /dev/null | sed 's/^/     /'
      failures=$((failures + 1))
    fi
    sed 's/^/     /' "$logs/$tag-$build-smoke.log" 2> /dev/null | grep -E "torch:|compat smoke"
    rm -rf "$scratch"
  done
done
echo "compat: $failures failure(s)"
((failures == 0))
