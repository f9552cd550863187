// The optimizer loops of cpu/optimizer_cpu.h, compiled once per instruction set: included inside a namespace (and,
// but for the portable copy, a target region). No include guard: each inclusion is a separate copy.

// Adam on elements [begin, end): Coupled adds weight decay to the gradient (Adam), Decoupled decays the
// parameter (AdamW), SmallWeight picks torch's lerp formula for 1 - beta1 < 0.5.
template <typename T, bool Maximize, bool Coupled, bool Decoupled, bool SmallWeight>
void adam(T* __restrict param, const T* __restrict grad_in, T* __restrict exp_avg, T* __restrict exp_avg_sq,
          int64_t begin, int64_t end, const ParamUpdate& u, double step) {
  const T weight_decay = static_cast<T>(u.weight_decay), decay = static_cast<T>(1 - u.lr * u.weight_decay);
  const T weight = static_cast<T>(1 - u.beta1), beta2 = static_cast<T>(u.beta2);
  const T one_minus_beta2 = static_cast<T>(1 - u.beta2);
  const auto [step_size, bias_correction2_sqrt] = adam_step_size(u, step);
  const T neg_step_size = static_cast<T>(-step_size), correction = static_cast<T>(bias_correction2_sqrt);
  const T eps = static_cast<T>(u.eps);
  for (int64_t i = begin; i < end; ++i) {
    T p = param[i];
    T g = Maximize ? -grad_in[i] : grad_in[i];
    if constexpr (Decoupled) p = p * decay;
    if constexpr (Coupled) g = g + weight_decay * p;
    const T m = exp_avg[i];
    // torch's lerp: self + w (end - self) for |w| < 0.5, else end - (end - self)(1 - w)
    const T m_new = SmallWeight ? m + weight * (g - m) : g - (g - m) * (T(1) - weight);
    const T v_new = exp_avg_sq[i] * beta2 + one_minus_beta2 * g * g;
    exp_avg[i] = m_new;
    exp_avg_sq[i] = v_new;
    param[i] = p + neg_step_size * m_new / (std::sqrt(v_new) / correction + eps);
  }
}

// SGD on elements [begin, end): Momentum keeps a buffer (History: it holds one, else the gradient
// starts it), Nesterov looks ahead along it.
template <typename T, bool Maximize, bool Decay, bool Momentum, bool History, bool Nesterov>
void sgd(T* __restrict param, const T* __restrict grad_in, T* __restrict buffer, int64_t begin, int64_t end,
         const ParamUpdate& u) {
  const T weight_decay = static_cast<T>(u.weight_decay), momentum = static_cast<T>(u.momentum);
  const T keep = static_cast<T>(1 - u.dampening), neg_lr = static_cast<T>(-u.lr);
  for (int64_t i = begin; i < end; ++i) {
    const T p = param[i];
    T g = Maximize ? -grad_in[i] : grad_in[i];
    if constexpr (Decay) g = g + weight_decay * p;
    if constexpr (Momentum) {
      const T b = History ? buffer[i] * momentum + keep * g : g;
      buffer[i] = b;
      g = Nesterov ? g + momentum * b : b;
    }
    param[i] = p + neg_lr * g;
  }
}

// optimizer_cpu.h's update_tensor in this copy's instruction set: the loop of the update's options.
template <typename T>
void update_tensor(OptimizerKind kind, const ParamUpdate& u, T* param, const T* grad, T* state1, T* state2,
                   int64_t begin, int64_t end, double step) {
  const bool decay = u.weight_decay != 0;
  if (kind == OptimizerKind::kAdam) {
    const bool small = 1 - u.beta1 < 0.5;
    const bool coupled = decay && !u.decoupled_weight_decay, decoupled = decay && u.decoupled_weight_decay;
    // the 16 combinations of (maximize, coupled, decoupled, small), each a branch-free loop
    using Loop = void (*)(T*, const T*, T*, T*, int64_t, int64_t, const ParamUpdate&, double);
    static constexpr Loop loops[16] = {
        adam<T, false, false, false, false>, adam<T, false, false, false, true>, adam<T, false, false, true, false>,
        adam<T, false, false, true, true>,   adam<T, false, true, false, false>, adam<T, false, true, false, true>,
        adam<T, false, true, true, false>,   adam<T, false, true, true, true>,   adam<T, true, false, false, false>,
        adam<T, true, false, false, true>,   adam<T, true, false, true, false>,  adam<T, true, false, true, true>,
        adam<T, true, true, false, false>,   adam<T, true, true, false, true>,   adam<T, true, true, true, false>,
        adam<T, true, true, true, true>};
    loops[8 * u.maximize + 4 * coupled + 2 * decoupled + small](param, grad, state1, state2, begin, end, u, step);
    return;
  }
  const bool momentum = u.momentum != 0;
  using Loop = void (*)(T*, const T*, T*, int64_t, int64_t, const ParamUpdate&);
  // (maximize, decay, momentum, history, nesterov); without momentum, history and nesterov do not apply
  static constexpr Loop loops[32] = {
      sgd<T, 0, 0, 0, 0, 0>, sgd<T, 0, 0, 0, 0, 0>, sgd<T, 0, 0, 0, 0, 0>, sgd<T, 0, 0, 0, 0, 0>,
      sgd<T, 0, 0, 1, 0, 0>, sgd<T, 0, 0, 1, 0, 1>, sgd<T, 0, 0, 1, 1, 0>, sgd<T, 0, 0, 1, 1, 1>,
      sgd<T, 0, 1, 0, 0, 0>, sgd<T, 0, 1, 0, 0, 0>, sgd<T, 0, 1, 0, 0, 0>, sgd<T, 0, 1, 0, 0, 0>,
      sgd<T, 0, 1, 1, 0, 0>, sgd<T, 0, 1, 1, 0, 1>, sgd<T, 0, 1, 1, 1, 0>, sgd<T, 0, 1, 1, 1, 1>,
      sgd<T, 1, 0, 0, 0, 0>, sgd<T, 1, 0, 0, 0, 0>, sgd<T, 1, 0, 0, 0, 0>, sgd<T, 1, 0, 0, 0, 0>,
      sgd<T, 1, 0, 1, 0, 0>, sgd<T, 1, 0, 1, 0, 1>, sgd<T, 1, 0, 1, 1, 0>, sgd<T, 1, 0, 1, 1, 1>,
      sgd<T, 1, 1, 0, 0, 0>, sgd<T, 1, 1, 0, 0, 0>, sgd<T, 1, 1, 0, 0, 0>, sgd<T, 1, 1, 0, 0, 0>,
      sgd<T, 1, 1, 1, 0, 0>, sgd<T, 1, 1, 1, 0, 1>, sgd<T, 1, 1, 1, 1, 0>, sgd<T, 1, 1, 1, 1, 1>};
  const int index = 16 * u.maximize + 8 * decay + 4 * momentum + 2 * u.has_buffer + u.nesterov;
  loops[index](param, grad, state1, begin, end, u);
}

