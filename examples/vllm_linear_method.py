"""A vLLM-style block-FP8 linear method on torch_fp8_blockwise (no vLLM needed to run it).

vLLM's quantized linear layers delegate to a LinearMethod with three hooks: create_weights
(allocate parameters the checkpoint loader fills), process_weights_after_loading (one-time layout
fixes) and apply (the forward). This one keeps DeepSeek's layout end to end, so it loads the
checkpoint's tensors as they are.
"""

import torch
from torch import nn

from torch_fp8_blockwise.integrations.vllm import per_token_group_quant_fp8, w8a8_block_fp8_matmul


class BlockFp8LinearMethod:
    def __init__(self, weight_block_size=(128, 128)):
        self.block_n, self.block_k = weight_block_size

    def create_weights(self, layer, input_size_per_partition, output_partition_sizes, params_dtype):
        n, k = sum(output_partition_sizes), input_size_per_partition
        n_blocks, k_blocks = -(-n // self.block_n), -(-k // self.block_k)
        # weight [N, K] float8_e4m3fn; weight_scale_inv [cdiv(N, bn), cdiv(K, bk)] float32 multipliers.
        layer.weight = nn.Parameter(torch.empty(n, k, dtype=torch.float8_e4m3fn), requires_grad=False)
        layer.weight_scale_inv = nn.Parameter(torch.empty(n_blocks, k_blocks), requires_grad=False)
        layer.params_dtype = params_dtype

    def process_weights_after_loading(self, layer):
        # The kernels read [N, K] row-major: fix the layout once here, never per call.
        layer.weight = nn.Parameter(layer.weight.data.contiguous(), requires_grad=False)
        layer.weight_scale_inv = nn.Parameter(
            layer.weight_scale_inv.data.float().contiguous(), requires_grad=False
        )

    def apply(self, layer, x, bias=None):
        x_q, x_s = per_token_group_quant_fp8(x, self.block_k, column_major_scales=True)
        y = w8a8_block_fp8_matmul(
            x_q, layer.weight, x_s, layer.weight_scale_inv, [self.block_n, self.block_k], output_dtype=x.dtype
        )
        return y if bias is None else y + bias


def main():
    from torch_fp8_blockwise import quantize

    torch.manual_seed(0)
    method, layer = BlockFp8LinearMethod(), nn.Module()
    method.create_weights(layer, 576, [384, 192], torch.bfloat16)  # e.g. fused gate/up projections
    w = torch.randn(576, 576)
    w_q, w_s = quantize(w, (128, 128))  # what a DeepSeek-format checkpoint holds
    layer.weight.data.copy_(w_q)
    layer.weight_scale_inv.data.copy_(w_s)
    method.process_weights_after_loading(layer)
    x = torch.randn(4, 576, dtype=torch.bfloat16)
    y = method.apply(layer, x)
    exact = x.float() @ w.T
    err = ((y.float() - exact).norm() / exact.norm()).item()
    print(f"y {tuple(y.shape)} {y.dtype}, relative error vs the unquantized product: {err:.3f}")
    return y


if __name__ == "__main__":
    main()
