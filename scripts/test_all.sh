#!/usr/bin/env bash
# The whole test job (README's test command; .ci/run calls it): builds the environments if needed,
# then lint, the test suite in each environment, the vLLM plugin tests inside vLLM (environment
# "vllm": ~4-7 min and 9.5 GB to build once per machine), and the offline lowering proofs. Every step runs
# even if an earlier one failed; the summary at the end lists each step and the script fails if any did.
#   PYTEST_ARGS   extra pytest arguments (default: -m "" = everything, slow tests included)
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
xla=$(scripts/venv.sh xla) || exit 1
latest=$(scripts/venv.sh latest) || exit 1
if [ -n "${PYTEST_ARGS+set}" ]; then read -ra pytest_args <<<"$PYTEST_ARGS"; else pytest_args=(-m ""); fi
declare -a names=() codes=()

step() {  # step NAME COMMAND...
  local name=$1; shift
  echo; echo "=================== $name ==================="
  local start=$SECONDS
  "$@"
  local rc=$?
  echo "--- $name: exit $rc in $((SECONDS - start)) s"
  names+=("$name"); codes+=("$rc")
}

step "lint (ruff check + format)" bash -c "'$latest/bin/ruff' check . && '$latest/bin/ruff' format --check ."
step "pytest [latest: torch 2.13 + triton 3.9]" \
  env PYTHONPATH="$root" "$latest/bin/python" -m pytest "${pytest_args[@]}" -p no:cacheprovider
step "pytest [xla: torch 2.9 + torch_xla 2.9 + jax 0.7.1 + triton 3.5]" \
  env PYTHONPATH="$root" PJRT_DEVICE=CPU JAX_PLATFORMS=cpu "$xla/bin/python" -m pytest "${pytest_args[@]}" -p no:cacheprovider
# The official vLLM wheel pins its own torch / transformers, so the plugin is tested in its own venv.
# `import vllm` must work there first: the plugin tests skip without vLLM, and a skip is no pass.
vllm_step() {
  local venv
  venv=$(scripts/venv.sh vllm) || return 1
  env PYTHONPATH="$root" VLLM_TARGET_DEVICE=cpu "$venv/bin/python" -c "import vllm; print('vllm', vllm.__version__)" || return 1
  env PYTHONPATH="$root" VLLM_TARGET_DEVICE=cpu "$venv/bin/python" -m pytest "${pytest_args[@]}" -p no:cacheprovider \
    tests/test_vllm_plugin.py tests/test_vllm_integration.py
}
step "pytest [vllm: vLLM 0.33.0 + torch 2.14, CPU] tests/test_vllm_*" vllm_step
for target in tpu cuda; do
  module=torch_fp8_blockwise/backends/$([ $target = tpu ] && echo pallas || echo triton)/lowering.py
  [ -f "$module" ] || continue
  step "check_lowering --target $target [xla env]" \
    env -u TRITON_INTERPRET PYTHONPATH="$root" JAX_PLATFORMS=cpu "$xla/bin/python" scripts/check_lowering.py --target $target
  if [ $target = cuda ]; then
    step "check_lowering --target cuda [latest env]" \
      env -u TRITON_INTERPRET PYTHONPATH="$root" "$latest/bin/python" scripts/check_lowering.py --target cuda
  fi
done

echo; echo "=================== summary ==================="
status=0
for i in "${!names[@]}"; do
  if [ "${codes[$i]}" = 0 ]; then echo "PASS  ${names[$i]}"; else echo "FAIL  ${names[$i]} (exit ${codes[$i]})"; status=1; fi
done
exit $status
