// linear_relu and its backward on CUDA.
// Forward: one cuBLASLt (strided-batched) GEMM whose RELU_BIAS epilogue adds the bias and applies the ReLU
// while the tile is still in registers, so the pre-activation never reaches global memory. Where cuBLASLt
// has no such kernel (float64, an unusual precision setting, no heuristic result, a failed call) the op
// falls back to the CPU recipe: a GEMM with the bias as accumulator, then an in-place ReLU.
// Backward: one fused kernel forms gz = grad_out * (out > 0) and reduces grad_bias, then the two GEMMs.
#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cublasLt.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <climits>
#include <cstdint>
#include <optional>
#include <tuple>

#include "checks.h"
#include "kernel_common.h"

// Hands a failed cuBLASLt status back to the caller, which then takes the ATen fallback.
#define METALEARN_LT_TRY(expr)                        \
  do {                                                \
    const cublasStatus_t lt_status_ = (expr);         \
    if (lt_status_ != CUBLAS_STATUS_SUCCESS) {        \
      return lt_status_;                              \
    }                                                 \
  } while (0)

namespace metalearn_fast {
namespace {

// ---------------------------------------------------------------------------------------------------------
// Forward
// ---------------------------------------------------------------------------------------------------------

// The cap offered to the heuristic. Workspace mostly serves split-K, which layer-sized GEMMs rarely need;
// only what the chosen algorithm actually asks for is allocated (see linear_relu_lt).
constexpr uint64_t kLtMaxWorkspaceBytes = 4u << 20;

// cuBLASLt descriptors are C handles; this owns one so that every early return destroys it.
template <typename Handle, cublasStatus_t (*Destroy)(Handle)>
class LtOwner {
 public:
  LtOwner() = default;
  LtOwner(const LtOwner&) = delete;
  LtOwner& operator=(const LtOwner&) = delete;
  ~LtOwner() {
    if (handle_ != nullptr) Destroy(handle_);
  }
  Handle* out() { return &handle_; }
  Handle get() const { return handle_; }

 private:
  Handle handle_ = nullptr;
};

using LtMatmulDesc = LtOwner<cublasLtMatmulDesc_t, &cublasLtMatmulDescDestroy>;
using LtLayout = LtOwner<cublasLtMatrixLayout_t, &cublasLtMatrixLayoutDestroy>;
using LtPreference = LtOwner<cublasLtMatmulPreference_t, &cublasLtMatmulPreferenceDestroy>;

// The attribute setters take (pointer, size); these keep the value's type and its size together.
template <typename T>
cublasStatus_t set_attr(const LtMatmulDesc& d, cublasLtMatmulDescAttributes_t attr, const T& value) {
  return cublasLtMatmulDescSetAttribute(d.get(), attr, &value, sizeof(value));
}
template <typename T>
cublasStatus_t set_attr(const LtLayout& l, cublasLtMatrixLayoutAttribute_t attr, const T& value) {
  return cublasLtMatrixLayoutSetAttribute(l.get(), attr, &value, sizeof(value));
}
template <typename T>
cublasStatus_t set_attr(const LtPreference& p, cublasLtMatmulPreferenceAttributes_t attr, const T& value) {
  return cublasLtMatmulPreferenceSetAttribute(p.get(), attr, &value, sizeof(value));
}

// The heuristic assumes 256-byte aligned operands unless told otherwise, and would then pick vectorised
// kernels that fault on a tensor that is a view at an odd offset. Every batch starts at base + t * stride,
// so the stride's alignment counts as much as the base pointer's.
uint32_t operand_alignment(const void* ptr, int64_t batch_stride_elems, int64_t elem_size, bool batched) {
  uint64_t bits = reinterpret_cast<uintptr_t>(ptr);
  if (batched) bits |= static_cast<uint64_t>(batch_stride_elems * elem_size);
  uint32_t alignment = 256;
  while (alignment > 1 && (bits % alignment) != 0) alignment /= 2;
  return alignment;
}

// The compute type ATen itself would pick for this dtype; nullopt where the requested precision mode has
// no float-accumulating cuBLASLt equivalent here, so ATen must run it to give the numbers it would give.
std::optional<cublasComputeType_t> lt_compute_type(at::ScalarType dtype) {
  auto& ctx = at::globalContext();
  switch (dtype) {
    case at::kFloat: {
      const auto precision = ctx.float32Precision(at::Float32Backend::CUDA, at::Float32Op::MATMUL);
      if (precision == at::Float32Precision::TF32) return CUBLAS_COMPUTE_32F_FAST_TF32;
      if (precision == at::Float32Precision::BF16) return std::nullopt;
      return CUBLAS_COMPUTE_32F;
    }
    case at::kHalf:
      if (ctx.allowFP16AccumulationCuBLAS()) return std::nullopt;
      return CUBLAS_COMPUTE_32F;
    case at::kBFloat16:
      return CUBLAS_COMPUTE_32F;
    default:
      // float64 has no RELU_BIAS guarantee in cuBLASLt; ATen's DGEMM is the reliable path.
      return std::nullopt;
  }
}

cudaDataType_t lt_data_type(at::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf:
      return CUDA_R_16F;
    case at::kBFloat16:
      return CUDA_R_16BF;
    default:
      return CUDA_R_32F;
  }
}

// torch.backends.cuda.matmul.allow_{fp16,bf16}_reduced_precision_reduction: split-K partial sums may be
// kept in the output type (INPLACE, OUTPUT_TYPE) only where the user allows it, as in ATen's GEMMs.
uint32_t lt_reduction_mask(at::ScalarType dtype) {
  at::CuBLASReductionOption option = at::CuBLASReductionOption::AllowReducedPrecisionWithSplitK;
  if (dtype == at::kHalf) option = at::globalContext().allowFP16ReductionCuBLAS();
  if (dtype == at::kBFloat16) option = at::globalContext().allowBF16ReductionCuBLAS();
  switch (option) {
    case at::CuBLASReductionOption::DisallowReducedPrecisionAllowSplitK:
      return CUBLASLT_REDUCTION_SCHEME_NONE | CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
    case at::CuBLASReductionOption::DisallowReducedPrecisionDisallowSplitK:
      return CUBLASLT_REDUCTION_SCHEME_NONE;
    default:
      return CUBLASLT_REDUCTION_SCHEME_MASK;
  }
}

// out = relu(x @ weight^T + bias) through cuBLASLt; x, weight, bias contiguous, out fresh and contiguous.
// cuBLAS is column-major, so the row-major out [N,O] is computed as its column-major twin out^T [O,N]:
//   out^T = weight * x^T, with weight stored as column-major [I,O] (op T) and x as column-major [I,N] (op N).
// The bias then runs along the rows of that [O,N] result (length m = O), which is what RELU_BIAS adds.
// Returns CUBLAS_STATUS_NOT_SUPPORTED where the heuristic has no algorithm; out is untouched on failure.
cublasStatus_t linear_relu_lt(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, at::Tensor& out,
                              cublasComputeType_t compute_type) {
  const bool batched = x.dim() == 3;
  const int64_t batch = batched ? x.size(0) : 1;
  const int64_t m = weight.size(-2);  // O
  const int64_t n = x.size(-2);       // N
  const int64_t k = x.size(-1);       // I
  if (batch > INT32_MAX) return CUBLAS_STATUS_NOT_SUPPORTED;  // CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT is int32
  const cudaDataType_t data_type = lt_data_type(x.scalar_type());
  const int64_t elem_size = x.element_size();

  LtMatmulDesc desc;
  METALEARN_LT_TRY(cublasLtMatmulDescCreate(desc.out(), compute_type, CUDA_R_32F));
  METALEARN_LT_TRY(set_attr(desc, CUBLASLT_MATMUL_DESC_TRANSA, static_cast<int32_t>(CUBLAS_OP_T)));
  METALEARN_LT_TRY(set_attr(desc, CUBLASLT_MATMUL_DESC_TRANSB, static_cast<int32_t>(CUBLAS_OP_N)));
  METALEARN_LT_TRY(set_attr(desc, CUBLASLT_MATMUL_DESC_EPILOGUE, static_cast<uint32_t>(CUBLASLT_EPILOGUE_RELU_BIAS)));
  // Set before the heuristic query: it reads the pointer's value to judge the bias alignment.
  METALEARN_LT_TRY(set_attr(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias.const_data_ptr()));
  if (batched) METALEARN_LT_TRY(set_attr(desc, CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE, m));

  // Layouts describe the matrices as stored (before the transpose op), column-major.
  LtLayout a_layout, b_layout, d_layout;
  METALEARN_LT_TRY(cublasLtMatrixLayoutCreate(a_layout.out(), data_type, k, m, k));  // weight
  METALEARN_LT_TRY(cublasLtMatrixLayoutCreate(b_layout.out(), data_type, k, n, k));  // x
  METALEARN_LT_TRY(cublasLtMatrixLayoutCreate(d_layout.out(), data_type, m, n, m));  // out (also C, unread)
  if (batched) {
    const int32_t count = static_cast<int32_t>(batch);
    METALEARN_LT_TRY(set_attr(a_layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, count));
    METALEARN_LT_TRY(set_attr(a_layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, m * k));
    METALEARN_LT_TRY(set_attr(b_layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, count));
    METALEARN_LT_TRY(set_attr(b_layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, n * k));
    METALEARN_LT_TRY(set_attr(d_layout, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, count));
    METALEARN_LT_TRY(set_attr(d_layout, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, m * n));
  }

  LtPreference preference;
  METALEARN_LT_TRY(cublasLtMatmulPreferenceCreate(preference.out()));
  METALEARN_LT_TRY(set_attr(preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, kLtMaxWorkspaceBytes));
  METALEARN_LT_TRY(set_attr(preference, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, lt_reduction_mask(x.scalar_type())));
  const uint32_t align_a = operand_alignment(weight.const_data_ptr(), m * k, elem_size, batched);
  const uint32_t align_b = operand_alignment(x.const_data_ptr(), n * k, elem_size, batched);
  const uint32_t align_d = operand_alignment(out.const_data_ptr(), m * n, elem_size, batched);
  METALEARN_LT_TRY(set_attr(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, align_a));
  METALEARN_LT_TRY(set_attr(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, align_b));
  METALEARN_LT_TRY(set_attr(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, align_d));
  METALEARN_LT_TRY(set_attr(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, align_d));

  cublasLtHandle_t handle = at::cuda::getCurrentCUDABlasLtHandle();
  cublasLtMatmulHeuristicResult_t heuristic = {};
  int returned = 0;
  METALEARN_LT_TRY(cublasLtMatmulAlgoGetHeuristic(handle, desc.get(), a_layout.get(), b_layout.get(), d_layout.get(),
                                                  d_layout.get(), preference.get(), 1, &heuristic, &returned));
  if (returned == 0 || heuristic.state != CUBLAS_STATUS_SUCCESS) return CUBLAS_STATUS_NOT_SUPPORTED;

  // Only the chosen algorithm's real need is allocated (usually none); the caching allocator makes this cheap
  // and ties the buffer's reuse to this stream, so freeing it at scope exit is safe.
  at::Tensor workspace;
  void* workspace_ptr = nullptr;
  if (heuristic.workspaceSize > 0) {
    workspace = at::empty({static_cast<int64_t>(heuristic.workspaceSize)}, x.options().dtype(at::kByte));
    workspace_ptr = workspace.mutable_data_ptr();
  }
  const float alpha = 1.0f;
  const float beta = 0.0f;
  return cublasLtMatmul(handle, desc.get(), &alpha, weight.const_data_ptr(), a_layout.get(), x.const_data_ptr(),
                        b_layout.get(), &beta, out.const_data_ptr(), d_layout.get(), out.mutable_data_ptr(),
                        d_layout.get(), &heuristic.algo, workspace_ptr, heuristic.workspaceSize,
                        at::cuda::getCurrentCUDAStream());
}

at::Tensor linear_relu_aten(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  at::Tensor out = x.dim() == 2 ? at::addmm(bias, x, weight.t())
                                : at::baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2));
  return out.relu_();
}

at::Tensor linear_relu_cuda(const at::Tensor& x_in, const at::Tensor& weight_in, const at::Tensor& bias_in) {
  check_linear_relu_args(x_in, weight_in, bias_in);
  const c10::cuda::CUDAGuard device_guard(x_in.device());
  const std::optional<cublasComputeType_t> compute_type = lt_compute_type(x_in.scalar_type());
  if (!compute_type) return linear_relu_aten(x_in, weight_in, bias_in);

  const at::Tensor x = x_in.contiguous();
  const at::Tensor weight = weight_in.contiguous();
  const at::Tensor bias = bias_in.contiguous();
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = weight.size(-2);
  at::Tensor out = at::empty(out_sizes, x.options());
  const cublasStatus_t status = linear_relu_lt(x, weight, bias, out, *compute_type);
  if (status == CUBLAS_STATUS_SUCCESS) return out;
  if (status != CUBLAS_STATUS_NOT_SUPPORTED) {
    TORCH_WARN_ONCE("linear_relu: cuBLASLt failed (", cublasLtGetStatusName(status), ": ",
                    cublasLtGetStatusString(status), "); using the unfused GEMM + ReLU instead");
  }
  return linear_relu_aten(x, weight, bias);
}

// ---------------------------------------------------------------------------------------------------------
// Backward
// ---------------------------------------------------------------------------------------------------------

constexpr int kMaskThreads = 256;

// gz = out > 0 ? grad_out : 0 for tensors viewed as [tasks, rows, cols], and per-(task, column) sums of gz.
// A block is blockDim.x consecutive columns by blockDim.y row lanes: a warp reads whole runs of a row, so the
// loads and stores coalesce, and each column's rows are summed without atomics, in a fixed order. Blocks
// loop over tasks (gridDim.y is capped at 65535); blockIdx.z picks a slice of rows when there are too few
// (task, column tile) pairs to fill the GPU, and those slices write partial sums that a second kernel adds.
// gz == nullptr: only grad_bias is wanted. bias_partial [splits, tasks, cols] is used when gridDim.z > 1,
// grad_bias [tasks, cols] otherwise; both null: no reduction.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kMaskThreads)
    relu_mask_bias_grad_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ out,
                               scalar_t* __restrict__ gz, acc_t* __restrict__ bias_partial,
                               scalar_t* __restrict__ grad_bias, int64_t tasks, int64_t rows, int64_t cols,
                               int64_t rows_per_split) {
  __shared__ acc_t sums[kMaskThreads];
  const int lane_x = threadIdx.x;
  const int lane_y = threadIdx.y;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + lane_x;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.z) * rows_per_split;
  const int64_t row_end = row_begin + rows_per_split < rows ? row_begin + rows_per_split : rows;
  const bool reduce = bias_partial != nullptr || grad_bias != nullptr;

  for (int64_t t = blockIdx.y; t < tasks; t += gridDim.y) {
    acc_t acc = acc_t(0);
    if (col < cols) {
      for (int64_t n = row_begin + lane_y; n < row_end; n += blockDim.y) {
        const int64_t i = (t * rows + n) * cols + col;
        const scalar_t v = static_cast<acc_t>(out[i]) > acc_t(0) ? grad_out[i] : scalar_t(0);
        if (gz != nullptr) gz[i] = v;
        acc += static_cast<acc_t>(v);
      }
    }
    if (!reduce) continue;  // uniform over the block, so no thread skips a barrier another one waits at

    sums[lane_y * blockDim.x + lane_x] = acc;
    __syncthreads();
    for (int stride = static_cast<int>(blockDim.y) / 2; stride > 0; stride /= 2) {  // blockDim.y is a power of two
      if (lane_y < stride) sums[lane_y * blockDim.x + lane_x] += sums[(lane_y + stride) * blockDim.x + lane_x];
      __syncthreads();
    }
    if (lane_y == 0 && col < cols) {
      if (bias_partial != nullptr) {
        bias_partial[(static_cast<int64_t>(blockIdx.z) * tasks + t) * cols + col] = sums[lane_x];
      } else {
        grad_bias[t * cols + col] = static_cast<scalar_t>(sums[lane_x]);
      }
    }
    __syncthreads();  // the next task reuses sums
  }
}

// grad_bias[i] = sum over row slices s of partial[s][i], in slice order so the result is deterministic.
template <typename scalar_t, typename acc_t>
__global__ void sum_bias_partials_kernel(const acc_t* __restrict__ partial, scalar_t* __restrict__ grad_bias,
                                         int64_t splits, int64_t count) {
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += step) {
    acc_t total = acc_t(0);
    for (int64_t s = 0; s < splits; ++s) total += partial[s * count + i];
    grad_bias[i] = static_cast<scalar_t>(total);
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename scalar_t>
void relu_mask_and_bias_grad(const at::Tensor& grad_out, const at::Tensor& out, at::Tensor* gz, at::Tensor* grad_bias,
                             int64_t tasks, int64_t rows, int64_t cols) {
  using acc_t = at::opmath_type<scalar_t>;
  // A narrow layer (O = 1 for a regression head, 40 in the sinusoid MLP) would leave most of a 32-wide
  // tile idle; narrowing the tile to the layer and widening it in rows keeps the lanes busy.
  int block_x = 1;
  while (block_x < 32 && block_x < cols) block_x *= 2;
  const dim3 block(block_x, kMaskThreads / block_x);

  const int64_t col_tiles = ceil_div(cols, block_x);
  TORCH_CHECK(col_tiles <= INT32_MAX, "linear_relu_backward: too many output features (", cols, ")");
  const int64_t grid_y = std::min<int64_t>(tasks, 65535);

  // Rows are split only when (task, column tile) pairs cannot fill the GPU and each slice still gives every
  // row lane a few rows, so the extra partial-sum pass stays small next to the main one.
  constexpr int64_t kMinRowsPerLane = 4;
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t target_blocks = 4 * sms;
  int64_t splits = 1;
  if (col_tiles * grid_y < target_blocks) {
    const int64_t max_splits = std::max<int64_t>(1, rows / (block.y * kMinRowsPerLane));
    splits = std::min({ceil_div(target_blocks, col_tiles * grid_y), max_splits, int64_t{65535}});
  }
  const int64_t rows_per_split = ceil_div(rows, splits);
  splits = ceil_div(rows, rows_per_split);
  const dim3 grid(static_cast<unsigned>(col_tiles), static_cast<unsigned>(grid_y), static_cast<unsigned>(splits));

  at::Tensor partial;
  acc_t* partial_ptr = nullptr;
  scalar_t* grad_bias_ptr = nullptr;
  if (grad_bias != nullptr) {
    if (splits > 1) {
      partial = at::empty({splits, tasks, cols}, out.options().dtype(c10::CppTypeToScalarType<acc_t>::value));
      partial_ptr = partial.mutable_data_ptr<acc_t>();
    } else {
      grad_bias_ptr = grad_bias->mutable_data_ptr<scalar_t>();
    }
  }
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  relu_mask_bias_grad_kernel<scalar_t, acc_t><<<grid, block, 0, stream>>>(
      grad_out.const_data_ptr<scalar_t>(), out.const_data_ptr<scalar_t>(),
      gz != nullptr ? gz->mutable_data_ptr<scalar_t>() : nullptr, partial_ptr, grad_bias_ptr, tasks, rows, cols,
      rows_per_split);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  if (partial_ptr != nullptr) {
    const int64_t count = tasks * cols;
    constexpr int kThreads = 256;
    const int64_t blocks = std::min<int64_t>(ceil_div(count, kThreads), 8 * sms);
    sum_bias_partials_kernel<scalar_t, acc_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        partial_ptr, grad_bias->mutable_data_ptr<scalar_t>(), splits, count);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::tuple<std::optional<at::Tensor>, std::optional<at::Tensor>, std::optional<at::Tensor>> linear_relu_backward_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& out_in,
    std::array<bool, 3> output_mask) {
  check_linear_relu_backward_args(grad_out_in, x, weight, out_in);
  const c10::cuda::CUDAGuard device_guard(x.device());
  ReluBackwardPass pass = prepare_relu_backward(grad_out_in, out_in, output_mask);
  if (!pass.has_work()) return {std::nullopt, std::nullopt, std::nullopt};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pass.out.scalar_type(), "linear_relu_backward_cuda", [&] {
    relu_mask_and_bias_grad<scalar_t>(pass.grad_out, pass.out, pass.gz.defined() ? &pass.gz : nullptr,
                                      pass.grad_bias ? &*pass.grad_bias : nullptr, pass.tasks, pass.rows, pass.cols);
  });
  auto [grad_x, grad_weight] = input_and_weight_grads(pass.gz, x, weight, output_mask);
  return {grad_x, grad_weight, pass.grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(metalearn_fast, CUDA, m) {
  m.impl("linear_relu", &linear_relu_cuda);
  m.impl("linear_relu_backward", &linear_relu_backward_cuda);
}

}  // namespace metalearn_fast

#undef METALEARN_LT_TRY
