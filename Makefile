# Two commands on a fresh machine (each builds what it needs, once, outside the clone):
#   make demo   the main job: quantize a random layer, run blockwise_matmul on every backend
#               available on this machine (CPU, torch_xla's CPU device via Pallas, interpreters)
#   make test   lint + the test suite in both environments + offline lowering proofs (what CI runs)
.PHONY: demo test test-fast envs

demo:
	@xla=$$(scripts/venv.sh xla) && PYTHONPATH=$(CURDIR) PJRT_DEVICE=CPU JAX_PLATFORMS=cpu \
		$$xla/bin/python -m torch_fp8_blockwise.cli demo

test:
	bash scripts/test_all.sh

# The default (fast) suite only: slow interpreter / compile tests deselected.
test-fast:
	PYTEST_ARGS="-q" bash scripts/test_all.sh

envs:
	scripts/venv.sh xla && scripts/venv.sh latest
