"""Does vLLM take our ``save(..., format="compressed-tensors")`` output? (run by hand, not in CI)

vLLM's own classes, at tensor parallel 1 on CPU: its ``CompressedTensorsConfig`` parses our
config.json, picks a scheme per layer (targets / ignore), builds ``ColumnParallelLinear`` /
``RowParallelLinear`` with it, and its weight loaders fill them from our safetensors file; each
parameter must equal the file's tensor (dtype included). No forward: vLLM has no fp8 kernel for a
CPU without AMX, so two things are patched, and said so: the capability check (CPU has none; vLLM
would fall back to its CUDA-only Marlin W8A16 scheme) and the kernel choice (create_weights asks
for one). Checked with vLLM 0.33.0 and its pinned compressed-tensors 0.17.0, installed with
--no-deps over torch 2.13 (CPU) next to its pure-Python requirements.

    PYTHONPATH=. python scripts/check_vllm_compressed_tensors.py   # in that environment
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import types

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")

import torch  # noqa: E402
import vllm.model_executor.layers.quantization.compressed_tensors.schemes.compressed_tensors_w8a8_fp8 as w8a8  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch import nn  # noqa: E402
from vllm.config import VllmConfig, set_current_vllm_config  # noqa: E402
from vllm.distributed import init_distributed_environment, initialize_model_parallel  # noqa: E402
from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear  # noqa: E402
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (  # noqa: E402
    CompressedTensorsConfig,
)

from torch_fp8_blockwise import checkpoint  # noqa: E402
from torch_fp8_blockwise.nn import Fp8BlockwiseLinear, Fp8Config, quantize_model_  # noqa: E402

CompressedTensorsConfig._check_scheme_supported = staticmethod(lambda *a, **k: True)
w8a8.init_fp8_linear_kernel = lambda *a, **k: None
w8a8.expose_input_quant_key = lambda *a, **k: None


def model() -> nn.Module:
    """Two blocks; layers.1.up_proj at 256 x 256 blocks (a second config group), layers.1.down_proj
    kept in high precision (in ``ignore``)."""
    torch.manual_seed(0)
    m = nn.Module()
    m.layers = nn.ModuleList()
    for _ in range(2):
        block = nn.Module()
        block.q_proj, block.up_proj, block.down_proj = (
            nn.Linear(256, 256),
            nn.Linear(256, 320),
            nn.Linear(320, 256),
        )
        m.layers.append(block)
    m = m.to(torch.bfloat16)
    quantize_model_(m, filter_fn=lambda mod, fqn: fqn != "layers.1.down_proj", progress=False)
    m.layers[1].up_proj = Fp8BlockwiseLinear.from_linear(
        nn.Linear(256, 320).bfloat16(), Fp8Config((256, 256))
    )
    return m


def main() -> int:
    vllm_config = VllmConfig()
    with set_current_vllm_config(vllm_config), tempfile.TemporaryDirectory() as root:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        init_distributed_environment(1, 0, f"tcp://127.0.0.1:{port}", 0, backend="gloo")
        initialize_model_parallel(1, 1)
        # the W8A8 scheme reads the model dtype from a model config this check does not build
        object.__setattr__(vllm_config, "model_config", types.SimpleNamespace(dtype=torch.bfloat16))

        ours = model()
        checkpoint.save(ours, root, format="compressed-tensors")
        with open(os.path.join(root, "config.json")) as f:
            config = CompressedTensorsConfig.from_config(json.load(f)["quantization_config"])
        tensors = load_file(os.path.join(root, "model.safetensors"))
        failures = 0
        for name, layer in ours.named_modules():
            if not isinstance(layer, (Fp8BlockwiseLinear, nn.Linear)):
                continue
            cls = RowParallelLinear if name.endswith("down_proj") else ColumnParallelLinear
            n, k = layer.out_features, layer.in_features
            v = cls(k, n, bias=True, quant_config=config, prefix=name, params_dtype=torch.bfloat16)
            scheme = type(v.scheme).__name__ if hasattr(v, "scheme") else type(v.quant_method).__name__
            for p, param in v.named_parameters():
                param.weight_loader(param, tensors[f"{name}.{p}"])
                want = tensors[f"{name}.{p}"]
                ok = param.dtype == want.dtype and torch.equal(
                    param.data.view(torch.uint8), want.view(torch.uint8)
                )
                failures += not ok
                print(
                    f"{name}: {cls.__name__} {scheme}: {p} {tuple(param.shape)} {param.dtype} == file: {ok}"
                )
    print("FAILED" if failures else "all checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
