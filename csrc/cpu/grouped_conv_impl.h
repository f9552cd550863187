// The direct kernels of grouped_conv_cpu.cpp, compiled once per instruction set: included inside a namespace
// and a target region that define kVectorBytes and Lanes (small_kernels_impl.h). No include guard: each
// inclusion is a separate copy.
//
// One task (group) t of a grouped convolution at a time, on channels-last memory:
//   x [N, H, W, G*Cin] (pixel stride xs), out and its gradient g [N, OH, OW, G*C] (pixel stride os),
//   weight [G*C, KH, KW, Cin]: task t's output channel co is the row of KK*Cin numbers at (t*C + co)*KK*Cin.
// An output pixel r (n, oh, ow) reads, for its tap q (kh, kw), the input pixel Geometry::source(r, q), or
// nothing where that tap falls in the zero padding. Every inner loop runs along channels (Cin a multiple of
// the lanes): a convolution of a few pixels a task is KK*Cin-long dot products, held in registers.

// Every loop over a task's output pixels runs block by block of this many (their maps and gradients stay in the
// core's caches while a block's taps and channels go by: many examples or large maps would stream them from
// memory once per tap and channel tile).
constexpr int64_t kRowBlock = 128;

// Calls tile(A', B', a, b) over [a_first, a_last) x [0, b_count), b outer: b in steps of B * b_unit (the rest
// b_unit at a time, B' = 1), a in steps of A (the rest one at a time, A' = 1); A' and B' as integral constants,
// the tile sizes of a register-blocked kernel.
template <int A, int B, typename Tile>
void over_tiles(int64_t a_first, int64_t a_last, int64_t b_count, int64_t b_unit, const Tile& tile) {
  using Full = std::integral_constant<int, A>;
  using One = std::integral_constant<int, 1>;
  auto along_a = [&](auto b_tile, int64_t b) {
    int64_t a = a_first;
    for (; a + A <= a_last; a += A) tile(Full{}, b_tile, a, b);
    for (; a < a_last; ++a) tile(One{}, b_tile, a, b);
  };
  int64_t b = 0;
  for (; b + B * b_unit <= b_count; b += B * b_unit) along_a(std::integral_constant<int, B>{}, b);
  for (; b < b_count; b += b_unit) along_a(One{}, b);
}

// out[r0 + i, co0 + j] = bias + sum over taps and input channels, for a tile of R pixels by J output channels:
// R*J accumulators along the input channels, summed across their lanes at the end.
template <typename T, int R, int J>
void forward_tile(const Geometry& geo, const T* __restrict x, const T* __restrict w, const T* bias, const T* zeros,
                  T* __restrict out, int64_t r0, int64_t co0) {
  using L = Lanes<T>;
  using V = typename L::type;
  constexpr int kL = L::kCount;
  V acc[R][J];
  for (int i = 0; i < R; ++i)
    for (int j = 0; j < J; ++j) acc[i][j] = V{};
  const int64_t row = geo.taps * geo.cin;  // one output channel's weights
  for (int64_t q = 0; q < geo.taps; ++q) {
    const T* src[R];
    for (int i = 0; i < R; ++i) {
      const int32_t p = geo.source(r0 + i, q);
      src[i] = p < 0 ? zeros : x + p * geo.xs;
    }
    const T* wq = w + co0 * row + q * geo.cin;
    for (int64_t c = 0; c < geo.cin; c += kL) {
      V xv[R];
      for (int i = 0; i < R; ++i) xv[i] = L::load(src[i] + c);
#pragma GCC unroll 8
      for (int j = 0; j < J; ++j) {
        const V wv = L::load(wq + j * row + c);
        for (int i = 0; i < R; ++i) acc[i][j] += xv[i] * wv;
      }
    }
  }
  for (int i = 0; i < R; ++i) {
    T* o = out + (r0 + i) * geo.os + co0;
    for (int j = 0; j < J; ++j) o[j] = lane_sum<T, kVectorBytes>(acc[i][j]) + (bias ? bias[co0 + j] : T(0));
  }
}

// Task t's output channels from x (offset to its first input channel), w (to its first row) and bias (to its
// first channel, or null); out offset to its first channel.
template <typename T>
void forward_task(const Geometry& geo, const T* x, const T* w, const T* bias, const T* zeros, T* out) {
  constexpr int R = kVectorBytes == 64 ? 6 : 3, J = 4;
  // within a block of pixels, output channels outer: a tile's J weight rows stay in L1 over the block's pixels
  for (int64_t first = 0; first < geo.rows; first += kRowBlock) {
    over_tiles<R, J>(first, std::min(geo.rows, first + kRowBlock), geo.cout, 1, [&](auto rows, auto outs, int64_t r,
                                                                                     int64_t co) {
      forward_tile<T, decltype(rows)::value, decltype(outs)::value>(geo, x, w, bias, zeros, out, r, co);
    });
  }
}

// g_x[source(r0 + i, q), c0 ...] += sum over output channels co of g[r0 + i, co] w[co, q, c0 ...], for a tile of
// R pixels by NV registers of input channels at one tap (g_x zeroed before the first tap).
template <typename T, int R, int NV>
void input_grad_tile(const Geometry& geo, const T* __restrict g, const T* __restrict w, T* __restrict g_x,
                     int64_t r0, int64_t q, int64_t c0) {
  using L = Lanes<T>;
  using V = typename L::type;
  constexpr int kL = L::kCount;
  V acc[R][NV];
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = V{};
  const int64_t row = geo.taps * geo.cin;
  const T* wq = w + q * geo.cin + c0;
  for (int64_t co = 0; co < geo.cout; ++co) {
    V wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = L::load(wq + co * row + v * kL);
#pragma GCC unroll 8
    for (int i = 0; i < R; ++i) {
      const V b = L::splat(g[(r0 + i) * geo.os + co]);
      for (int v = 0; v < NV; ++v) acc[i][v] += b * wv[v];
    }
  }
  for (int i = 0; i < R; ++i) {
    const int32_t p = geo.source(r0 + i, q);
    if (p < 0) continue;
    T* dst = g_x + p * geo.xs + c0;
    for (int v = 0; v < NV; ++v) L::store(dst + v * kL, L::load(dst + v * kL) + acc[i][v]);
  }
}

template <typename T>
void input_grad_task(const Geometry& geo, const T* g, const T* w, T* g_x) {
  constexpr int R = 6, NV = kVectorBytes == 64 ? 4 : 2;
  constexpr int kL = Lanes<T>::kCount;
  for (int64_t first = 0; first < geo.rows; first += kRowBlock) {
    for (int64_t q = 0; q < geo.taps; ++q) {
      over_tiles<R, NV>(first, std::min(geo.rows, first + kRowBlock), geo.cin, kL, [&](auto rows, auto registers,
                                                                                        int64_t r, int64_t c) {
        input_grad_tile<T, decltype(rows)::value, decltype(registers)::value>(geo, g, w, g_x, r, q, c);
      });
    }
  }
}

// g_w[co0 + j, q, c0 ...] (+)= sum over output pixels r in [first, last) of g[r, co0 + j] x[source(r, q), c0 ...],
// for a tile of J output channels by NV registers of input channels at one tap (+= after the first block).
template <typename T, int J, int NV>
void weight_grad_tile(const Geometry& geo, const T* __restrict x, const T* __restrict g, T* __restrict g_w,
                      int64_t co0, int64_t q, int64_t c0, int64_t first, int64_t last) {
  using L = Lanes<T>;
  using V = typename L::type;
  constexpr int kL = L::kCount;
  const int64_t row = geo.taps * geo.cin;
  V acc[J][NV];
  for (int j = 0; j < J; ++j)
    for (int v = 0; v < NV; ++v) acc[j][v] = first ? L::load(g_w + (co0 + j) * row + q * geo.cin + c0 + v * kL) : V{};
  for (int64_t r = first; r < last; ++r) {
    const int32_t p = geo.source(r, q);
    if (p < 0) continue;
    const T* src = x + p * geo.xs + c0;
    V xv[NV];
    for (int v = 0; v < NV; ++v) xv[v] = L::load(src + v * kL);
    const T* gr = g + r * geo.os + co0;
#pragma GCC unroll 8
    for (int j = 0; j < J; ++j) {
      const V b = L::splat(gr[j]);
      for (int v = 0; v < NV; ++v) acc[j][v] += b * xv[v];
    }
  }
  for (int j = 0; j < J; ++j)
    for (int v = 0; v < NV; ++v) L::store(g_w + (co0 + j) * row + q * geo.cin + c0 + v * kL, acc[j][v]);
}

template <typename T>
void weight_grad_task(const Geometry& geo, const T* x, const T* g, T* g_w) {
  constexpr int J = 6, NV = kVectorBytes == 64 ? 4 : 2;
  constexpr int kL = Lanes<T>::kCount;
  for (int64_t first = 0; first < geo.rows; first += kRowBlock) {
    const int64_t last = std::min(geo.rows, first + kRowBlock);
    for (int64_t q = 0; q < geo.taps; ++q) {
      over_tiles<J, NV>(0, geo.cout, geo.cin, kL, [&](auto outs, auto registers, int64_t co, int64_t c) {
        weight_grad_tile<T, decltype(outs)::value, decltype(registers)::value>(geo, x, g, g_w, co, q, c, first, last);
      });
    }
  }
}

// The lanes of one register of T: the channel counts these kernels take are multiples of it.
template <typename T>
constexpr int64_t lanes() {
  return Lanes<T>::kCount;
}

// ---- few input channels (conv4's first block: 1 or 3), the output channels a multiple of the lanes: the same
// convolution along the output channels, over the KK*Cin numbers a pixel reads ----

// out[r0 + i, co0 ...] = bias + sum over k of x's k-th number of pixel r0 + i times wt[k, co0 ...], for a tile of R
// pixels by NV registers of output channels; wt [KK*Cin, C] is the task's weights transposed.
template <typename T, int R, int NV>
void forward_narrow_tile(const Geometry& geo, const T* __restrict x, const T* __restrict wt, const T* bias,
                         const T* zeros, T* __restrict out, int64_t r0, int64_t co0) {
  using L = Lanes<T>;
  using V = typename L::type;
  constexpr int kL = L::kCount;
  V acc[R][NV];
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < NV; ++v) acc[i][v] = bias ? L::load(bias + co0 + v * kL) : V{};
  for (int64_t q = 0; q < geo.taps; ++q) {
    const T* src[R];
    for (int i = 0; i < R; ++i) {
      const int32_t p = geo.source(r0 + i, q);
      src[i] = p < 0 ? zeros : x + p * geo.xs;
    }
    for (int64_t c = 0; c < geo.cin; ++c) {
      V wv[NV];
      for (int v = 0; v < NV; ++v) wv[v] = L::load(wt + (q * geo.cin + c) * geo.cout + co0 + v * kL);
#pragma GCC unroll 8
      for (int i = 0; i < R; ++i) {
        const V b = L::splat(src[i][c]);
        for (int v = 0; v < NV; ++v) acc[i][v] += b * wv[v];
      }
    }
  }
  for (int i = 0; i < R; ++i)
    for (int v = 0; v < NV; ++v) L::store(out + (r0 + i) * geo.os + co0 + v * kL, acc[i][v]);
}

template <typename T>
void forward_narrow_task(const Geometry& geo, const T* x, const T* wt, const T* bias, const T* zeros, T* out) {
  constexpr int R = 6, NV = kVectorBytes == 64 ? 4 : 2;
  constexpr int kL = Lanes<T>::kCount;
  for (int64_t first = 0; first < geo.rows; first += kRowBlock) {
    over_tiles<R, NV>(first, std::min(geo.rows, first + kRowBlock), geo.cout, kL, [&](auto rows, auto registers,
                                                                                       int64_t r, int64_t co) {
      forward_narrow_tile<T, decltype(rows)::value, decltype(registers)::value>(geo, x, wt, bias, zeros, out, r, co);
    });
  }
}

// g_wt[k0 + j, co0 ...] (+)= sum over output pixels r in [first, last) of x's (k0 + j)-th number of pixel r times
// g[r, co0 ...], for a tile of J of a pixel's KK*Cin numbers by NV registers of output channels (g_wt [KK*Cin,
// C]: the weight gradient transposed; += after the first block).
template <typename T, int J, int NV>
void weight_grad_narrow_tile(const Geometry& geo, const T* __restrict x, const T* __restrict g, T* __restrict g_wt,
                             int64_t k0, int64_t co0, int64_t first, int64_t last) {
  using L = Lanes<T>;
  using V = typename L::type;
  constexpr int kL = L::kCount;
  V acc[J][NV];
  for (int j = 0; j < J; ++j)
    for (int v = 0; v < NV; ++v) acc[j][v] = first ? L::load(g_wt + (k0 + j) * geo.cout + co0 + v * kL) : V{};
  int64_t tap[J], channel[J];  // of each of the tile's numbers
  for (int j = 0; j < J; ++j) {
    tap[j] = (k0 + j) / geo.cin;
    channel[j] = k0 + j - tap[j] * geo.cin;
  }
  for (int64_t r = first; r < last; ++r) {
    V gv[NV];
    for (int v = 0; v < NV; ++v) gv[v] = L::load(g + r * geo.os + co0 + v * kL);
#pragma GCC unroll 8
    for (int j = 0; j < J; ++j) {
      const int32_t p = geo.source(r, tap[j]);
      if (p < 0) continue;
      const V b = L::splat(x[p * geo.xs + channel[j]]);
      for (int v = 0; v < NV; ++v) acc[j][v] += b * gv[v];
    }
  }
  for (int j = 0; j < J; ++j)
    for (int v = 0; v < NV; ++v) L::store(g_wt + (k0 + j) * geo.cout + co0 + v * kL, acc[j][v]);
}

template <typename T>
void weight_grad_narrow_task(const Geometry& geo, const T* x, const T* g, T* g_wt) {
  constexpr int J = kVectorBytes == 64 ? 6 : 2, NV = 4;
  constexpr int kL = Lanes<T>::kCount;
  const int64_t ks = geo.taps * geo.cin;
  for (int64_t first = 0; first < geo.rows; first += kRowBlock) {
    const int64_t last = std::min(geo.rows, first + kRowBlock);
    over_tiles<J, NV>(0, ks, geo.cout, kL, [&](auto numbers, auto registers, int64_t k, int64_t co) {
      weight_grad_narrow_tile<T, decltype(numbers)::value, decltype(registers)::value>(geo, x, g, g_wt, k, co, first,
                                                                                       last);
    });
  }
}

// ---- one task (group) of a call: x, g, out and g_x offset to the task's first channel, w and g_w to its first
// row ----

// Whether the input channels take the kernels along them (else the narrow ones, along the output channels, on
// the task's weights transposed).
template <typename T>
bool along_inputs(const Geometry& geo) {
  return geo.cin % Lanes<T>::kCount == 0;
}

template <typename T>
void forward_one(const Geometry& geo, const T* x, const T* w, const T* bias, const T* zeros, T* out) {
  if (along_inputs<T>(geo)) return forward_task(geo, x, w, bias, zeros, out);
  std::vector<T> wt(geo.taps * geo.cin * geo.cout);
  transpose(wt.data(), w, geo.cout, geo.taps * geo.cin);
  forward_narrow_task(geo, x, wt.data(), bias, zeros, out);
}

template <typename T>
void backward_one(const Geometry& geo, const T* g, const T* x, const T* w, T* g_x, T* g_w) {
  if (g_x) input_grad_task(geo, g, w, g_x);
  if (!g_w) return;
  if (along_inputs<T>(geo)) return weight_grad_task(geo, x, g, g_w);
  std::vector<T> g_wt(geo.taps * geo.cin * geo.cout);
  weight_grad_narrow_task(geo, x, g, g_wt.data());
  transpose(g_w, g_wt.data(), geo.taps * geo.cin, geo.cout);
}
