// The torch.ops.fp8 schemas, declared in C++ so a C++ / AOTInductor deployment can load the same
// op contract without Python. Kernels are registered by the Python package (or by a deployment's
// own TORCH_LIBRARY_IMPL); this file only declares. tests/test_registration.py keeps these strings
// identical to torch_fp8_blockwise/ops.py::SCHEMAS, and builds this file when asked:
//   FP8_BUILD_CPP_STUBS=1 pip install .    (or the slow test test_cpp_stubs_build)
// Do not load it into a process that imported torch_fp8_blockwise: an op may be defined only once.
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fp8, m) {
  m.def(
      "quantize(Tensor x, int[] block_shape, ScalarType dtype=float8_e4m3fn, "
      "str scale_format=\"fp32\") -> (Tensor q, Tensor scale)");
  m.def("dequantize(Tensor q, Tensor scale, int[] block_shape, ScalarType out_dtype=float32) -> Tensor");
  m.def(
      "blockwise_matmul(Tensor x, Tensor w, Tensor w_scale, int[] block_shape=[128,128], "
      "Tensor? x_scale=None, Tensor? bias=None, ScalarType? out_dtype=None, "
      "str activation=\"dynamic\") -> Tensor");
  m.def("mxfp8_quantize(Tensor x, ScalarType dtype=float8_e4m3fn) -> (Tensor q, Tensor scale_u8)");
  m.def(
      "mxfp8_matmul(Tensor x, Tensor w, Tensor w_scale, Tensor? x_scale=None, Tensor? bias=None, "
      "ScalarType? out_dtype=None) -> Tensor");
  m.def(
      "grouped_matmul(Tensor x, Tensor w, Tensor w_scale, Tensor group_sizes, int[] block_shape=[128,128], "
      "Tensor? x_scale=None, ScalarType? out_dtype=None, str activation=\"dynamic\") -> Tensor");
  m.def(
      "grouped_matmul_transposed(Tensor x, Tensor dy, Tensor group_sizes, int block_m=128, "
      "ScalarType? out_dtype=None) -> Tensor");
}
