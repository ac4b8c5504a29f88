// The CPU kernel of fp8::blockwise_matmul in C++ (issue 22): an eager call on CPU tensors that the
// fused C GEMM serves (M <= the fused rule's bound) runs from the dispatcher to fp8_cpu.c's fp8_gemm
// without entering Python. A Python kernel costs the dispatcher a trip through the interpreter
// (boxing 8 arguments, the GIL, a frame per step): 4 of the 6.5 us of an M = 0 call (56k of its
// instructions; with this kernel 23k, of which ~19k are torch's own parsing of the 8 arguments).
//
// Registered, by cpu_native.py and only after fp8_cpu.c's library has loaded, at two keys:
//   AutogradCPU: what the Python Autograd kernel (ops._autograd_kernel) does, in the same order:
//     inputs requiring grad (grad mode on) -> the Python path (outputs whose backward raises);
//     keys below Autograd other than plain CPU (fake tensors, modes, functionalization, sparse)
//     -> redispatched to them; else the CPU kernel below.
//   CPU (reached directly under torch.inference_mode, which skips the Autograd keys):
//     the fast path where it applies, else the Python implementation (ops._blockwise_matmul_impl).
// The fast path never raises for an argument: it takes a call only when every check of
// _validate.matmul_args passes for it (checked here, a sufficient condition), and hands anything
// else to the Python implementation, whose errors are then the only ones. It also hands over calls
// while use_backend is active anywhere in the process, calls outside the fused rule
// (cpu.uses_fused_gemm: the panel path), K = 0, and a GEMM that returns non-zero (the overflow
// edge, which the Python path answers with the reference; or an allocation failure, which it
// reports). fp8_gemm is the function of the library that the Python path calls through ctypes
// (its address comes from there): the results are the same bits. Its parameters are declared
// twice, in GemmFn below and in cpu_kernels/__init__.py's _declare: a change to one is a change to both.
//
// Only the headers it uses (not torch/extension.h, which pulls in the whole C++ frontend): the
// first-use build takes about a third of the time.
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/utils/pybind.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <string_view>

namespace {

namespace py = pybind11;

// fp8_cpu.c: int fp8_gemm(x, xdt, xs, dynamic, M, w, kind, ws, N, K, bn, bk, bias, bias_dt, y, ydt,
// nthreads) -> 0, or non-zero (ERR_NOMEM, EDGE).
using GemmFn = int (*)(const void*, int, const float*, int, int64_t, const uint8_t*, int, const float*, int64_t,
                       int64_t, int64_t, int64_t, const void*, int, void*, int, int);

constexpr size_t kArgs = 8;  // x, w, w_scale, block_shape, x_scale, bias, out_dtype, activation

GemmFn g_gemm = nullptr;
std::atomic<int64_t> g_forced{0};  // use_backend contexts open in this process (any thread)
std::atomic<int64_t> g_fast_calls{0};  // calls the fast path served (tests)
// cpu.uses_fused_gemm(m, n, k): m <= small_m or (m <= small_weight_max_m and n * k < small_weight)
int64_t g_small_m = 0, g_small_weight_max_m = 0, g_small_weight = 0;
// The Python path: impl(*args) and grad(*args). Never freed (no Python at process exit).
py::object* g_impl = nullptr;
py::object* g_grad = nullptr;
std::unique_ptr<torch::Library>* g_libs = nullptr;

int hp_code(at::ScalarType s) {  // cpu.py _DT
  switch (s) {
    case at::kFloat: return 0;
    case at::kBFloat16: return 1;
    case at::kHalf: return 2;
    default: return -1;
  }
}

int fp8_kind(at::ScalarType s) {  // cpu.py _KIND
  switch (s) {
    case at::ScalarType::Float8_e4m3fn: return 0;
    case at::ScalarType::Float8_e5m2: return 1;
    default: return -1;
  }
}

bool dense_cpu(const at::Tensor& t) {
  return t.defined() && t.layout() == at::kStrided && t.device().type() == at::kCPU;
}

bool block_size(int64_t b) { return b == 128 || b == 256 || b == 512; }  // formats.MATMUL_BLOCKS

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The fast path: true with *out set when the call is one it serves (see the top of the file).
bool fast(const torch::jit::Stack& s, at::Tensor* out) {
  if (g_forced.load(std::memory_order_relaxed) != 0) return false;
  const size_t b = s.size() - kArgs;
  const at::Tensor& x = s[b].toTensor();
  const at::Tensor& w = s[b + 1].toTensor();
  const at::Tensor& ws = s[b + 2].toTensor();
  const c10::IValue& xs_iv = s[b + 4];
  const c10::IValue& bias_iv = s[b + 5];
  const c10::IValue& out_iv = s[b + 6];
  const std::string_view act = s[b + 7].toStringView();
  const bool dynamic_act = act == "dynamic";
  if (!dynamic_act && act != "none") return false;
  const auto block = s[b + 3].toListRef();
  if (block.size() != 2) return false;
  const int64_t bn = block[0].toInt(), bk = block[1].toInt();
  if (!block_size(bn) || !block_size(bk)) return false;
  // w [N, K] fp8, contiguous; w_scale [cdiv(N, bn), cdiv(K, bk)] float32
  if (!dense_cpu(w) || !dense_cpu(ws) || !dense_cpu(x)) return false;
  const int kind = fp8_kind(w.scalar_type());
  if (kind < 0 || w.dim() != 2 || !w.is_contiguous()) return false;
  const int64_t n = w.size(0), k = w.size(1);
  if (k == 0) return false;
  if (ws.scalar_type() != at::kFloat || ws.dim() != 2 || ws.size(0) != cdiv(n, bn) || ws.size(1) != cdiv(k, bk))
    return false;
  // x [..., K]: high precision without x_scale, or fp8 with x_scale [..., cdiv(K, bk)] float32
  const int64_t nd = x.dim();
  if (nd < 1 || x.size(nd - 1) != k) return false;
  const int x_kind = fp8_kind(x.scalar_type());
  const int x_hp = hp_code(x.scalar_type());
  at::Tensor xs;
  if (x_kind >= 0) {
    if (!dynamic_act || xs_iv.isNone()) return false;
    xs = xs_iv.toTensor();
    if (!dense_cpu(xs) || xs.scalar_type() != at::kFloat || xs.dim() != nd || xs.size(nd - 1) != cdiv(k, bk))
      return false;
    for (int64_t d = 0; d + 1 < nd; ++d)
      if (xs.size(d) != x.size(d)) return false;
  } else if (x_hp < 0 || !xs_iv.isNone()) {
    return false;
  }
  at::Tensor bias;
  if (!bias_iv.isNone()) {
    bias = bias_iv.toTensor();
    if (!dense_cpu(bias) || hp_code(bias.scalar_type()) < 0 || bias.dim() != 1 || bias.size(0) != n) return false;
  }
  const at::ScalarType out_dtype =
      out_iv.isNone() ? (x_kind >= 0 ? at::kBFloat16 : x.scalar_type()) : out_iv.toScalarType();
  const int ydt = hp_code(out_dtype);
  if (ydt < 0) return false;
  int64_t m = 1;
  for (int64_t d = 0; d + 1 < nd; ++d) m *= x.size(d);
  c10::SmallVector<int64_t, 4> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  if (m == 0 || n == 0) {  // ops._blockwise_matmul_impl: an empty result, nothing to compute
    *out = at::detail::empty_cpu(out_shape, out_dtype);  // what at::empty's CPU kernel runs
    g_fast_calls.fetch_add(1, std::memory_order_relaxed);
    return true;
  }
  if (!(m <= g_small_m || (m <= g_small_weight_max_m && n * k < g_small_weight))) return false;
  // ops._run_matmul + cpu.blockwise_matmul's fused branch, step for step
  const bool batched = nd != 2;
  const at::Tensor x2 = (batched ? x.reshape({m, k}) : x).contiguous();
  if (xs.defined()) xs = (batched ? xs.reshape({m, -1}) : xs).contiguous();
  if (bias.defined()) bias = bias.contiguous();
  const at::Tensor ws_c = ws.contiguous();
  at::Tensor y = at::detail::empty_cpu({m, n}, out_dtype);
  const int xdt = xs.defined() ? 3 + x_kind : x_hp;
  const int rc = g_gemm(x2.const_data_ptr(), xdt, xs.defined() ? xs.const_data_ptr<float>() : nullptr,
                        !xs.defined() && dynamic_act, m, static_cast<const uint8_t*>(w.const_data_ptr()), kind,
                        ws_c.const_data_ptr<float>(), n, k, bn, bk, bias.defined() ? bias.const_data_ptr() : nullptr,
                        bias.defined() ? hp_code(bias.scalar_type()) : 0, y.mutable_data_ptr(), ydt,
                        at::get_num_threads());
  if (rc != 0) return false;  // the Python path computes it again and answers (reference / MemoryError)
  *out = batched ? y.view(out_shape) : y;
  g_fast_calls.fetch_add(1, std::memory_order_relaxed);
  return true;
}

// Call the Python function fn with the op's arguments; its result replaces them on the stack.
void call_python(const py::object* fn, torch::jit::Stack* stack) {
  py::gil_scoped_acquire gil;
  const size_t b = stack->size() - kArgs;
  const auto& s = *stack;
  py::tuple args(kArgs);
  for (size_t i = 0; i < kArgs; ++i) {
    const c10::IValue& v = s[b + i];
    if (i == 6 && !v.isNone()) {
      args[i] = py::cast(v.toScalarType());  // a ScalarType arrives as an int: torch.dtype for Python
    } else if (v.isNone()) {
      args[i] = py::none();
    } else if (v.isTensor()) {
      args[i] = py::cast(v.toTensor());
    } else if (v.isString()) {
      args[i] = py::str(std::string(v.toStringView()));
    } else {
      args[i] = py::cast(v.toIntVector());
    }
  }
  at::Tensor result = (*fn)(*args).cast<at::Tensor>();
  torch::jit::drop(*stack, kArgs);
  stack->emplace_back(std::move(result));
}

void finish(torch::jit::Stack* stack, at::Tensor out) {
  torch::jit::drop(*stack, kArgs);
  stack->emplace_back(std::move(out));
}

void cpu_kernel(const c10::OperatorHandle&, c10::DispatchKeySet, torch::jit::Stack* stack) {
  at::Tensor out;
  if (fast(*stack, &out)) return finish(stack, std::move(out));
  call_python(g_impl, stack);
}

bool any_requires_grad(const torch::jit::Stack& s) {
  const size_t b = s.size() - kArgs;
  for (size_t i : {0, 1, 2, 4, 5})
    if (s[b + i].isTensor() && s[b + i].toTensor().requires_grad()) return true;
  return false;
}

void autograd_cpu_kernel(const c10::OperatorHandle& op, c10::DispatchKeySet ks, torch::jit::Stack* stack) {
  if (c10::GradMode::is_enabled() && any_requires_grad(*stack)) return call_python(g_grad, stack);
  const c10::DispatchKeySet below = ks & c10::after_autograd_keyset;
  if (below.remove(c10::DispatchKey::ADInplaceOrView).highestPriorityTypeId() != c10::DispatchKey::CPU)
    return op.redispatchBoxed(below, stack);
  at::Tensor out;
  if (fast(*stack, &out)) return finish(stack, std::move(out));
  call_python(g_impl, stack);
}

void register_kernels() {
  g_libs[0] = std::make_unique<torch::Library>(torch::Library::IMPL, "fp8", c10::DispatchKey::AutogradCPU,
                                               __FILE__, __LINE__);
  g_libs[0]->impl("blockwise_matmul", torch::CppFunction::makeFromBoxedFunction<&autograd_cpu_kernel>());
  g_libs[1] = std::make_unique<torch::Library>(torch::Library::IMPL, "fp8", c10::DispatchKey::CPU, __FILE__,
                                               __LINE__);
  g_libs[1]->impl("blockwise_matmul", torch::CppFunction::makeFromBoxedFunction<&cpu_kernel>());
}

// Register both kernels; once per process (cpu_native.py calls it once).
void install(uintptr_t gemm, py::object impl, py::object grad, int64_t small_m, int64_t small_weight_max_m,
             int64_t small_weight) {
  TORCH_CHECK(g_libs == nullptr, "fp8_ops_cpu: install() runs once per process");
  g_gemm = reinterpret_cast<GemmFn>(gemm);
  g_impl = new py::object(std::move(impl));
  g_grad = new py::object(std::move(grad));
  g_small_m = small_m;
  g_small_weight_max_m = small_weight_max_m;
  g_small_weight = small_weight;
  g_libs = new std::unique_ptr<torch::Library>[2];
  register_kernels();
}

// On: the kernels registered; off: deregistered, so the op's Python kernels serve every call exactly
// as in a process without this extension. Returns the previous state. Called with the GIL held (so
// calls from Python are serialized); not while another thread runs the op.
bool set_enabled(bool on) {
  TORCH_CHECK(g_libs != nullptr, "fp8_ops_cpu: set_enabled() before install()");
  const bool was = g_libs[0] != nullptr;
  if (on && !was) {
    register_kernels();
  } else if (!on && was) {
    g_libs[0].reset();
    g_libs[1].reset();
  }
  return was;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("install", &install, "register the AutogradCPU and CPU kernels of fp8::blockwise_matmul");
  m.def("set_enabled", &set_enabled, "register (True) or deregister (False) the kernels; returns the old state");
  m.def(
      "is_enabled", [] { return g_libs != nullptr && g_libs[0] != nullptr; }, "whether the kernels are registered");
  m.def(
      "forced", [](int64_t delta) { return g_forced.fetch_add(delta) + delta; },
      "add delta (+1 / -1) to the count of open use_backend contexts; returns the new count");
  m.def(
      "fast_calls", [] { return g_fast_calls.load(); }, "calls the fast path has served in this process");
}
