// The small dense kernels of small_kernels.h, compiled once per instruction set: included inside a namespace
// and a target region that define kVectorBytes, the width of one SIMD register (32: AVX2; 64: AVX-512).
// No include guard: each inclusion is a separate copy.

// How a GEMM's output starts: zero, a row vector repeated on every row (a bias), a matrix laid out as the output,
// or as it is. The GEMMs' argument `from` is that row (kRow) or that matrix (kFrom).
enum class Start { kZero, kRow, kFrom, kKeep };

// `from` for the output's rows from row m on: the bias row (kRow), the matrix's row m on (kFrom).
template <typename T>
const T* from_row(Start start, const T* from, int64_t m, int64_t N) {
  return start == Start::kFrom ? from + m * N : from;
}

// Where row m of an output c [., N] starts from (but for kZero): from_row, or row m of c (kKeep).
template <typename T>
const T* start_row(Start start, const T* c, const T* from, int64_t m, int64_t N) {
  return start == Start::kKeep ? c + m * N : from_row(start, from, m, N);
}

// One SIMD register of T, Bytes wide (GCC/Clang vector extension), loaded and stored unaligned.
template <typename T, int Bytes = kVectorBytes>
struct Lanes {
  typedef T type __attribute__((vector_size(Bytes)));
  static constexpr int kCount = Bytes / sizeof(T);
  static type load(const T* p) {
    type v;
    std::memcpy(&v, p, sizeof(v));
    return v;
  }
  static void store(T* p, type v) { std::memcpy(p, &v, sizeof(v)); }
  // s in every lane. Not `type{} + s`: 0 + s is not s for s = -0, so the compiler adds before it broadcasts (an
  // extra instruction per broadcast in the GEMMs' inner loops); s - 0 is s for every s, and the broadcast folds into
  // the multiply-add's memory operand.
  static type splat(T s) { return s - type{}; }
};

// Columns [n0, n0 + R * lanes) of c [M,N] = start + A B, for A [M,K] with element (m,k) at
// a[m * am + k * ak] and B [K,N] row-major. Two rows at a time, their sums held in registers over
// the whole k loop: each piece of B loaded serves both rows. (The odd last row has its own copy of
// the loop: one template over the row count measured 10% slower, its sums not all kept in registers.)
template <typename T, int R>
void gemm_columns(T* __restrict c, const T* __restrict a, int64_t am, int64_t ak, const T* __restrict b, int64_t M,
                  int64_t K, int64_t N, int64_t n0, Start start, const T* __restrict from) {
  using L = Lanes<T>;
  using V = typename L::type;
  constexpr int kLanes = L::kCount;
  auto begin = [&](V* acc, int64_t m) {
    const T* s = start == Start::kZero ? nullptr : start_row(start, c, from, m, N) + n0;
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) acc[i] = start == Start::kZero ? V{} : L::load(s + i * kLanes);
  };
  int64_t m = 0;
  for (; m + 2 <= M; m += 2) {
    T* c0 = c + m * N + n0;
    T* c1 = c0 + N;
    V acc0[R], acc1[R];
    begin(acc0, m);
    begin(acc1, m + 1);
    const T* a0 = a + m * am;
    const T* a1 = a0 + am;
    for (int64_t k = 0; k < K; ++k) {
      const V x0 = L::splat(a0[k * ak]), x1 = L::splat(a1[k * ak]);
      const T* bk = b + k * N + n0;
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i) {
        const V y = L::load(bk + i * kLanes);
        acc0[i] += x0 * y;
        acc1[i] += x1 * y;
      }
    }
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      L::store(c0 + i * kLanes, acc0[i]);
      L::store(c1 + i * kLanes, acc1[i]);
    }
  }
  for (; m < M; ++m) {
    T* c0 = c + m * N + n0;
    V acc0[R];
    begin(acc0, m);
    const T* a0 = a + m * am;
    for (int64_t k = 0; k < K; ++k) {
      const V x0 = L::splat(a0[k * ak]);
      const T* bk = b + k * N + n0;
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i) acc0[i] += x0 * L::load(bk + i * kLanes);
    }
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) L::store(c0 + i * kLanes, acc0[i]);
  }
}

// Column n of c [M,N] = start + A B, in scalars (the last N % lanes columns).
template <typename T>
void gemm_column(T* __restrict c, const T* __restrict a, int64_t am, int64_t ak, const T* __restrict b, int64_t M,
                 int64_t K, int64_t N, int64_t n, Start start, const T* __restrict from) {
  for (int64_t m = 0; m < M; ++m) {
    T sum = start == Start::kZero ? T(0) : start_row(start, c, from, m, N)[n];
    for (int64_t k = 0; k < K; ++k) sum += a[m * am + k * ak] * b[k * N + n];
    c[m * N + n] = sum;
  }
}

// Sum of a register's lanes, by halves (a chain of 16 scalar additions costs as much as the products of a tile).
template <typename T, int Bytes>
inline T lane_sum(typename Lanes<T, Bytes>::type v) {
  if constexpr (Bytes > 16) {
    typename Lanes<T, Bytes / 2>::type low, high;
    std::memcpy(&low, &v, Bytes / 2);
    std::memcpy(&high, reinterpret_cast<const char*>(&v) + Bytes / 2, Bytes / 2);
    return lane_sum<T, Bytes / 2>(low + high);
  } else {
    T s = v[0];
    for (int i = 1; i < Lanes<T, Bytes>::kCount; ++i) s += v[i];
    return s;
  }
}

// c [M] = start + A b for A [M,K] row-major: one dot product per row, in register lanes along K, then a 256-bit
// register for a tail of half a 512-bit one or more (40 = 32 + 8 floats), then scalars; the lanes summed by halves.
template <typename T>
void gemv_rows(T* __restrict c, const T* __restrict a, const T* __restrict b, int64_t M, int64_t K, Start start,
               const T* __restrict from) {
  using L = Lanes<T>;
  using H = Lanes<T, 32>;
  constexpr int kLanes = L::kCount, kHalf = H::kCount;
  const int64_t whole = K - K % kLanes;
  const bool half = kLanes > kHalf && K - whole >= kHalf;
  const int64_t scalars = whole + (half ? kHalf : 0);
  for (int64_t m = 0; m < M; ++m) {
    const T* am_ = a + m * K;
    typename L::type acc{};
    for (int64_t k = 0; k < whole; k += kLanes) acc += L::load(am_ + k) * L::load(b + k);
    T sum = lane_sum<T, kVectorBytes>(acc);
    if (half) sum += lane_sum<T, 32>(H::load(am_ + whole) * H::load(b + whole));
    for (int64_t k = scalars; k < K; ++k) sum += am_[k] * b[k];
    c[m] = (start == Start::kZero ? T(0) : start_row(start, c, from, m, 1)[0]) + sum;
  }
}

// gemm_columns with R registers per row, R = 1..8 picked at run time (R <= the template argument).
template <typename T, int R>
void gemm_columns_of(int r, T* c, const T* a, int64_t am, int64_t ak, const T* b, int64_t M, int64_t K, int64_t N,
                     int64_t n0, Start start, const T* from) {
  if constexpr (R > 1) {
    if (r < R) return gemm_columns_of<T, R - 1>(r, c, a, am, ak, b, M, K, N, n0, start, from);
  }
  gemm_columns<T, R>(c, a, am, ak, b, M, K, N, n0, start, from);
}

// The low half (a 256-bit register) of a 512-bit register's lanes.
template <typename T>
typename Lanes<T, 32>::type low_half(typename Lanes<T, 64>::type v) {
  if constexpr (sizeof(T) == 4) return __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7);
  else return __builtin_shufflevector(v, v, 0, 1, 2, 3);
}

// AVX-512: Rows rows of columns [n0, n0 + R * lanes + Half * half a register) of c = start + A B in one pass,
// R 512-bit registers and (Half) one 256-bit register per row (40 floats: 32 + 8), so that each element of A,
// broadcast once (its low half serves the 256-bit register), serves the whole width. c, a: the block's first row.
template <typename T, int R, bool Half, int Rows>
void gemm_wide_rows(T* __restrict c, const T* __restrict a, int64_t am, int64_t ak, const T* __restrict b, int64_t K,
                    int64_t N, int64_t n0, Start start, const T* __restrict from) {
  using L = Lanes<T>;
  using H = Lanes<T, 32>;
  using V = typename L::type;
  using W = typename H::type;
  constexpr int kLanes = L::kCount;
  constexpr int kFull = R > 0 ? R : 1;
  const int64_t tail = n0 + R * kLanes;
  V acc[Rows][kFull];
  W half[Rows];
#pragma GCC unroll 8
  for (int j = 0; j < Rows; ++j) {
    const T* s = start == Start::kZero ? nullptr : start_row(start, c, from, j, N);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) acc[j][i] = start == Start::kZero ? V{} : L::load(s + n0 + i * kLanes);
    if constexpr (Half) half[j] = start == Start::kZero ? W{} : H::load(s + tail);
  }
  for (int64_t k = 0; k < K; ++k) {
    const T* bk = b + k * N;
    V y[kFull];
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) y[i] = L::load(bk + n0 + i * kLanes);
    W y_half{};
    if constexpr (Half) y_half = H::load(bk + tail);
#pragma GCC unroll 8
    for (int j = 0; j < Rows; ++j) {
      const V x = L::splat(a[j * am + k * ak]);
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i) acc[j][i] += x * y[i];
      if constexpr (Half) half[j] += low_half<T>(x) * y_half;
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < Rows; ++j) {
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) L::store(c + j * N + n0 + i * kLanes, acc[j][i]);
    if constexpr (Half) H::store(c + j * N + tail, half[j]);
  }
}

// The most rows of one gemm_wide_rows block: their sums in at most 24 of AVX-512's 32 registers (the rest hold
// B's row and the broadcast), at most 8.
template <int R, bool Half>
constexpr int kMostRows = std::min(8, 24 / std::max(1, R + (Half ? 1 : 0)));

// gemm_wide_rows with `rows` rows (1..kMostRows) picked at run time.
template <typename T, int R, bool Half, int Rows = kMostRows<R, Half>>
void gemm_wide_block(int rows, T* c, const T* a, int64_t am, int64_t ak, const T* b, int64_t K, int64_t N, int64_t n0,
                     Start start, const T* from) {
  if constexpr (Rows > 1) {
    if (rows < Rows) return gemm_wide_block<T, R, Half, Rows - 1>(rows, c, a, am, ak, b, K, N, n0, start, from);
  }
  gemm_wide_rows<T, R, Half, Rows>(c, a, am, ak, b, K, N, n0, start, from);
}

// gemm_wide_rows over all M rows, in as few blocks as the registers allow, of sizes differing by at most one (10
// rows: 5 + 5, not 4 + 4 + 2).
template <typename T, int R, bool Half>
void gemm_wide(T* c, const T* a, int64_t am, int64_t ak, const T* b, int64_t M, int64_t K, int64_t N, int64_t n0,
               Start start, const T* from) {
  constexpr int64_t kMost = kMostRows<R, Half>;
  const int64_t blocks = (M + kMost - 1) / kMost;
  // one division per call (one per block cost 0.5 us of the sinusoid's 7 us task: the GEMMs are that small)
  const int64_t rows_each = M / blocks, longer = M % blocks;
  for (int64_t i = 0, m = 0; i < blocks; ++i) {
    const int rows = static_cast<int>(rows_each + (i < longer ? 1 : 0));
    gemm_wide_block<T, R, Half>(rows, c + m * N, a + m * am, am, ak, b, K, N, n0, start, from_row(start, from, m, N));
    m += rows;
  }
}

// gemm_wide with r = 0..R full registers picked at run time.
template <typename T, int R>
void gemm_wide_of(int r, bool half, T* c, const T* a, int64_t am, int64_t ak, const T* b, int64_t M, int64_t K,
                  int64_t N, int64_t n0, Start start, const T* from) {
  if constexpr (R > 0) {
    if (r < R) return gemm_wide_of<T, R - 1>(r, half, c, a, am, ak, b, M, K, N, n0, start, from);
  }
  if (half) return gemm_wide<T, R, true>(c, a, am, ak, b, M, K, N, n0, start, from);
  gemm_wide<T, R, false>(c, a, am, ak, b, M, K, N, n0, start, from);
}

// c [M,N] = start + A B (A as in gemm_columns). Up to 8 registers wide, the whole width is one
// tile; wider, tiles of four registers; then the last N % lanes columns one by one. A single
// column (a layer of width one) is a matrix-vector product, taken along whichever side of A is
// contiguous.
template <typename T>
void gemm(T* c, const T* a, int64_t am, int64_t ak, const T* b, int64_t M, int64_t K, int64_t N, Start start,
          const T* from = nullptr) {
  if (N == 1 && ak == 1) return gemv_rows(c, a, b, M, K, start, from);
  if (N == 1 && am == 1 && start != Start::kRow) return gemm(c, b, 0, 1, a, 1, K, M, start, from);  // c^T = b^T A^T
  constexpr int kLanes = Lanes<T>::kCount;
  const int64_t registers = N / kLanes;
  int64_t n0 = 0;
  if constexpr (kVectorBytes == 64) {
    // tiles four 512-bit registers wide (gemm_wide's row blocks); then the rest of the width (up to five registers
    // and a 256-bit one) in one pass; then the last columns one by one
    constexpr int kHalf = 32 / sizeof(T);
    if (registers > 5) {
      for (; n0 + 4 * kLanes <= N; n0 += 4 * kLanes) gemm_wide<T, 4, false>(c, a, am, ak, b, M, K, N, n0, start, from);
    }
    const int64_t rest = (N - n0) / kLanes;
    const bool half = N - n0 - rest * kLanes >= kHalf;
    if (rest + half > 0) {
      gemm_wide_of<T, 5>(static_cast<int>(rest), half, c, a, am, ak, b, M, K, N, n0, start, from);
      n0 += rest * kLanes + half * kHalf;
    }
    for (; n0 < N; ++n0) gemm_column(c, a, am, ak, b, M, K, N, n0, start, from);
    return;
  }
  if (registers > 8) {
    for (; n0 + 4 * kLanes <= N; n0 += 4 * kLanes) gemm_columns<T, 4>(c, a, am, ak, b, M, K, N, n0, start, from);
  }
  if (n0 + kLanes <= N) {
    const int r = static_cast<int>((N - n0) / kLanes);
    gemm_columns_of<T, 8>(r, c, a, am, ak, b, M, K, N, n0, start, from);
    n0 += r * kLanes;
  }
  for (; n0 < N; ++n0) gemm_column(c, a, am, ak, b, M, K, N, n0, start, from);
}

// c [M,N] = start + A B for A [M,K] row-major.
template <typename T>
void mm(T* c, const T* a, const T* b, int64_t M, int64_t K, int64_t N, Start start, const T* from = nullptr) {
  gemm(c, a, K, 1, b, M, K, N, start, from);
}

// c [M,N] = start + A^T B for A [R,M] and B [R,N] row-major (a weight's gradient d^T a).
template <typename T>
void mm_tn(T* c, const T* a, const T* b, int64_t R, int64_t M, int64_t N, Start start, const T* from = nullptr) {
  gemm(c, a, 1, M, b, M, R, N, start, from);
}

// Rows [0, MB) of c [M,N] by its columns [0, NB) = start + A B^T for A [., K] and B [., K] row-major (c, a, b,
// from: the block's first row and column): MB x NB dot products along K in register lanes, each piece of a row of
// A loaded serving NB rows of B and the other way round; then each sum across its lanes, and the last K % lanes
// terms in scalars.
template <typename T, int MB, int NB>
void dot_block(T* __restrict c, const T* __restrict a, const T* __restrict b, int64_t K, int64_t N, Start start,
               const T* __restrict from) {
  using L = Lanes<T>;
  using V = typename L::type;
  constexpr int kLanes = L::kCount;
  V acc[MB][NB] = {};
  int64_t k = 0;
  for (; k + kLanes <= K; k += kLanes) {
    V y[NB];
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) y[j] = L::load(b + j * K + k);
#pragma GCC unroll 4
    for (int i = 0; i < MB; ++i) {
      const V x = L::load(a + i * K + k);
#pragma GCC unroll 4
      for (int j = 0; j < NB; ++j) acc[i][j] += x * y[j];
    }
  }
#pragma GCC unroll 4
  for (int i = 0; i < MB; ++i) {
#pragma GCC unroll 4
    for (int j = 0; j < NB; ++j) {
      T sum = lane_sum<T, kVectorBytes>(acc[i][j]);
      for (int64_t r = k; r < K; ++r) sum += a[i * K + r] * b[j * K + r];
      T& out = c[i * N + j];
      out = (start == Start::kZero ? T(0) : start_row(start, c, from, i, N)[j]) + sum;
    }
  }
}

// dot_block with mb <= MB rows and nb <= NB columns picked at run time.
template <typename T, int MB, int NB>
void dot_block_of(int mb, int nb, T* c, const T* a, const T* b, int64_t K, int64_t N, Start start, const T* from) {
  if constexpr (MB > 1) {
    if (mb < MB) return dot_block_of<T, MB - 1, NB>(mb, nb, c, a, b, K, N, start, from);
  }
  if constexpr (NB > 1) {
    if (nb < NB) return dot_block_of<T, MB, NB - 1>(mb, nb, c, a, b, K, N, start, from);
  }
  dot_block<T, MB, NB>(c, a, b, K, N, start, from);
}

// c [M,N] = start + A B^T for A [M,K] and B [N,K] row-major: a layer's z = x W^T read from W as it is, in dot
// products along K (for long rows, where transposing W would cost more than the sums across lanes). Blocks of B's
// rows outside, of A's inside: each piece of B (the weight, the larger) comes from memory once.
template <typename T>
void mm_nt(T* c, const T* a, const T* b, int64_t M, int64_t K, int64_t N, Start start, const T* from = nullptr) {
  constexpr int64_t kBlock = kVectorBytes == 64 ? 4 : 3;  // 16 or 9 sums in registers, with B's and A's pieces
  for (int64_t n = 0; n < N; n += kBlock) {
    const int nb = static_cast<int>(std::min(kBlock, N - n));
    for (int64_t m = 0; m < M; m += kBlock) {
      const int mb = static_cast<int>(std::min(kBlock, M - m));
      dot_block_of<T, kBlock, kBlock>(mb, nb, c + m * N + n, a + m * K, b + n * K, K, N, start,
                                      from == nullptr ? nullptr : from_row(start, from, m, N) + n);
    }
  }
}

// One 8x8 float tile (4x4 double) of transpose: rows of `in` (stride in_stride) into columns of `out`, in
// registers: eight loads, three rounds of shuffles, eight stores.
inline void transpose_tile(float* __restrict out, int64_t out_stride, const float* __restrict in, int64_t in_stride) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(in + i * in_stride);
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xee);
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xee);
  }
  for (int i = 0; i < 4; ++i) {
    _mm256_storeu_ps(out + i * out_stride, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
    _mm256_storeu_ps(out + (i + 4) * out_stride, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
  }
}

inline void transpose_tile(double* __restrict out, int64_t out_stride, const double* __restrict in,
                           int64_t in_stride) {
  __m256d r[4], t[4];
  for (int i = 0; i < 4; ++i) r[i] = _mm256_loadu_pd(in + i * in_stride);
  for (int i = 0; i < 4; i += 2) {
    t[i] = _mm256_unpacklo_pd(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_pd(r[i], r[i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    _mm256_storeu_pd(out + i * out_stride, _mm256_permute2f128_pd(t[i], t[i + 2], 0x20));
    _mm256_storeu_pd(out + (i + 2) * out_stride, _mm256_permute2f128_pd(t[i], t[i + 2], 0x31));
  }
}

// out [cols, rows] = in [rows, cols]^T: whole tiles in registers (transpose_tile; element by element, a 40x40
// transpose took a tenth of the sinusoid's per-task meta-step), the edges element by element.
template <typename T>
void transpose(T* __restrict out, const T* __restrict in, int64_t rows, int64_t cols) {
  constexpr int64_t kTile = 32 / sizeof(T);
  const int64_t whole_rows = rows - rows % kTile, whole_cols = cols - cols % kTile;
  for (int64_t r0 = 0; r0 < whole_rows; r0 += kTile) {
    for (int64_t c0 = 0; c0 < whole_cols; c0 += kTile) {
      transpose_tile(out + c0 * rows + r0, rows, in + r0 * cols + c0, cols);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = r < whole_rows ? whole_cols : 0; c < cols; ++c) out[c * rows + r] = in[r * cols + c];
  }
}

// out[n] (+)= sum over rows of d [R,N]
template <typename T>
void column_sums(T* __restrict out, const T* __restrict d, int64_t R, int64_t N, Start start) {
  if (start == Start::kZero) std::fill(out, out + N, T(0));
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t n = 0; n < N; ++n) out[n] += d[r * N + n];
  }
}

// sum_i a[i] * b[i] in kLanes independent partial sums, added in a fixed order: the loop vectorizes (one
// running sum would chain every addition to the one before), and the result is the same on every call.
template <typename T>
T dot(const T* __restrict a, const T* __restrict b, int64_t n) {
  constexpr int64_t kLanes = 16;
  T partial[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int64_t j = 0; j < kLanes; ++j) partial[j] += a[i + j] * b[i + j];
  }
  T total = 0;
  for (int64_t j = 0; j < kLanes; ++j) total += partial[j];
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

// x = 0 where the ReLU output a is not positive (its derivative)
template <typename T>
void mask(T* __restrict x, const T* __restrict a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = a[i] > T(0) ? x[i] : T(0);
}

template <typename T>
void relu(T* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = x[i] > T(0) ? x[i] : T(0);
}

// One task's loss: sets d = dLoss/dz for its logits z [R,C] (loss = scale * the task's mean loss),
// keeps the softmax in probs (cross-entropy), and returns the loss.
template <typename T>
double loss_and_grad(LossKind kind, const T* z, const T* y, const int64_t* labels, int64_t R, int64_t C, double scale,
                     T* d, T* probs) {
  double value = 0;
  if (kind == LossKind::kMse) {
    const T factor = static_cast<T>(2.0 * scale / static_cast<double>(R * C));
    for (int64_t i = 0; i < R * C; ++i) {
      const T diff = z[i] - y[i];
      value += static_cast<double>(diff) * diff;
      d[i] = diff * factor;
    }
    return value * scale / static_cast<double>(R * C);
  }
  const T factor = static_cast<T>(scale / static_cast<double>(R));
  for (int64_t r = 0; r < R; ++r) {
    const T* zr = z + r * C;
    T* pr = probs + r * C;
    const T top = *std::max_element(zr, zr + C);
    T total = 0;
    for (int64_t c = 0; c < C; ++c) total += pr[c] = std::exp(zr[c] - top);
    value -= static_cast<double>(zr[labels[r]] - top - std::log(total));
    for (int64_t c = 0; c < C; ++c) {
      pr[c] /= total;
      d[r * C + c] = (pr[c] - (c == labels[r] ? T(1) : T(0))) * factor;
    }
  }
  return value * scale / static_cast<double>(R);
}

// The loss Hessian (w.r.t. the logits, scale 1) applied to a tangent rz [R,C].
template <typename T>
void loss_hessian_times(LossKind kind, const T* rz, const T* probs, int64_t R, int64_t C, T* out) {
  if (kind == LossKind::kMse) {
    const T factor = static_cast<T>(2.0 / static_cast<double>(R * C));
    for (int64_t i = 0; i < R * C; ++i) out[i] = rz[i] * factor;
    return;
  }
  const T factor = static_cast<T>(1.0 / static_cast<double>(R));
  for (int64_t r = 0; r < R; ++r) {
    const T* p = probs + r * C;
    const T* x = rz + r * C;
    T dot = 0;
    for (int64_t c = 0; c < C; ++c) dot += p[c] * x[c];
    for (int64_t c = 0; c < C; ++c) out[r * C + c] = p[c] * (x[c] - dot) * factor;
  }
}

