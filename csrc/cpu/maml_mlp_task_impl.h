// The MAML per-task kernel of cpu/maml_mlp_cpu.cpp (TaskKernel, run_tasks), compiled once per instruction
// set: included inside a namespace and target region whose small kernels (small_kernels_impl.h) are in
// scope. Its loops work on raw pointers and call no ATen code (run_tasks only hands ranges of tasks to
// at::parallel_for). No include guard: each inclusion is a separate copy.

// One thread's workspace and the meta-step of one task at a time.
template <typename T>
class TaskKernel {
 public:
  explicit TaskKernel(const Problem<T>& p) : p_(p) {
    const int64_t L = p.layers, S = p.steps, K = p.support, Q = p.query, fa = p.first_adapted;
    int64_t widest = 0;
    for (int64_t l = 0; l < L; ++l) {
      widest = std::max({widest, p.in[l], p.out[l]});
    }
    // sizes first, then one buffer carved into pieces
    std::vector<std::pair<T**, int64_t>> pieces;
    act_.assign(S * L, nullptr);
    delta_.assign(S * L, nullptr);
    probs_.assign(S, nullptr);
    w_.assign((S + 1) * L, nullptr);
    wt_.assign((S + 1) * L, nullptr);
    b_.assign((S + 1) * L, nullptr);
    g_.assign(S * L, nullptr);
    gb_.assign(S * L, nullptr);
    v_.assign(L, nullptr);
    vb_.assign(L, nullptr);
    u_.assign(L, nullptr);
    ut_.assign(L, nullptr);
    ub_.assign(L, nullptr);
    ra_.assign(L, nullptr);
    qact_.assign(L, nullptr);
    for (int64_t s = 0; s < S; ++s) {
      // the body's activations are the same at every step: step 0's serve all
      for (int64_t l = s == 0 ? 1 : fa + 1; l < L; ++l) pieces.push_back({&act_[s * L + l], K * p.in[l]});
      for (int64_t l = fa; l < L; ++l) {
        pieces.push_back({&delta_[s * L + l], K * p.out[l]});
        pieces.push_back({&g_[s * L + l], steps_in_one_pass(l) ? 0 : p.out[l] * p.in[l]});
        pieces.push_back({&gb_[s * L + l], p.out[l]});
        pieces.push_back({&w_[(s + 1) * L + l], p.out[l] * p.in[l]});
        pieces.push_back({&wt_[(s + 1) * L + l], reads_weight_rows(p.in[l]) ? 0 : p.out[l] * p.in[l]});
        pieces.push_back({&b_[(s + 1) * L + l], p.out[l]});
      }
      pieces.push_back({&probs_[s], K * p.out[L - 1]});
    }
    for (int64_t l = fa; l < L; ++l) {
      for (T** piece : {&v_[l], &u_[l]}) pieces.push_back({piece, p.out[l] * p.in[l]});
      pieces.push_back({&ut_[l], reads_weight_rows(p.in[l]) ? 0 : p.out[l] * p.in[l]});
      for (T** piece : {&vb_[l], &ub_[l]}) pieces.push_back({piece, p.out[l]});
      if (l > fa) pieces.push_back({&ra_[l], K * p.in[l]});
    }
    for (int64_t l = 1; l < L; ++l) pieces.push_back({&qact_[l], Q * p.in[l]});
    const int64_t rows = std::max(K, Q);
    for (T** piece : {&logits_, &query_probs_, &rz_, &rd_, &re_, &qd_, &qe_}) pieces.push_back({piece, rows * widest});
    int64_t total = 0;
    for (const auto& piece : pieces) total += piece.second;
    buffer_.assign(total, T(0));
    T* next = buffer_.data();
    for (const auto& [slot, size] : pieces) {
      *slot = next;
      next += size;
    }
    for (int64_t s = 1; s < S; ++s) {
      for (int64_t l = 1; l <= fa; ++l) act_[s * L + l] = act_[l];
    }
  }

  void run(int64_t task, Share<T>& share) {
    const Problem<T>& p = p_;
    const bool mse = p.kind == LossKind::kMse;
    const Task t{p.x_support + task * p.xs_stride, p.x_query + task * p.xq_stride,
                 mse ? p.y_support + task * p.ys_stride : nullptr, mse ? p.y_query + task * p.yq_stride : nullptr,
                 mse ? nullptr : p.label_support + task * p.ys_stride,
                 mse ? nullptr : p.label_query + task * p.yq_stride};
    inner_loop(t, share);
    if (p.reptile) {
      const T share_of_task = static_cast<T>(1.0 / static_cast<double>(p.total_tasks));
      for (int64_t l = 0; l < p.layers; ++l) {
        add_scaled(share.grads[2 * l].data(), w_[p.steps * p.layers + l], share_of_task, p.out[l] * p.in[l]);
        add_scaled(share.grads[2 * l + 1].data(), b_[p.steps * p.layers + l], share_of_task, p.out[l]);
      }
      return;
    }
    // First order without rate gradients needs no sweep: the weighted query gradients add up.
    const bool sweep = !p.first_order || p.compute_lr_grad;
    if (!query_pass(t, p.steps, sweep, false, share) || !sweep) {
      for (int64_t s = p.steps - 1; s >= 1; --s) {
        if (p.weights[s - 1] != 0) query_pass(t, s, sweep, true, share);
      }
      return;
    }
    reverse_sweep(t, share);
    if (!p.compute_grad) return;
    for (int64_t l = p.first_adapted; l < p.layers; ++l) {
      add(share.grads[2 * l].data(), v_[l], p.out[l] * p.in[l]);
      add(share.grads[2 * l + 1].data(), vb_[l], p.out[l]);
    }
  }

 private:
  // One task's data in the meta-batch's arrays (targets for mse, labels for cross-entropy).
  struct Task {
    const T *xs, *xq, *ys, *yq;
    const int64_t *ls, *lq;
  };

  const T* input(const Task& t, int64_t s, int64_t l) const { return l == 0 ? t.xs : act_[s * p_.layers + l]; }

  // The support pass at each inner step, its gradient, and the SGD step to the next.
  void inner_loop(const Task& t, Share<T>& share) {
    const Problem<T>& p = p_;
    const int64_t L = p.layers, K = p.support, fa = p.first_adapted, C = p.out[L - 1];
    for (int64_t s = 0; s < p.steps; ++s) {
      for (int64_t l = s == 0 ? 0 : fa; l < L; ++l) {
        T* z = l + 1 < L ? act_[s * L + l + 1] : logits_;
        times_weight_t(z, input(t, s, l), weight(s, l), weight_t(s, l), l, K, Start::kRow, bias(s, l));
        if (l + 1 < L) relu(z, K * p.out[l]);
      }
      const double loss = loss_and_grad(p.kind, logits_, t.ys, t.ls, K, C, 1.0, delta_[s * L + L - 1], probs_[s]);
      if (p.reptile && s == 0) share.loss += loss / static_cast<double>(p.total_tasks);
      for (int64_t l = L - 1; l >= fa; --l) {
        const T* d = delta_[s * L + l];
        if (steps_in_one_pass(l)) {  // W - rate d^T a as W + (-rate d)^T a (rd_: scratch until the Hessian product)
          times_rate(rd_, d, nullptr, s, 2 * l, K * p.out[l]);
          mm_tn(w_[(s + 1) * L + l], rd_, input(t, s, l), K, p.out[l], p.in[l], Start::kFrom, weight(s, l));
        } else {
          mm_tn(g_[s * L + l], d, input(t, s, l), K, p.out[l], p.in[l], Start::kZero);
        }
        column_sums(gb_[s * L + l], d, K, p.out[l], Start::kZero);
        if (l > fa) {
          mm(delta_[s * L + l - 1], d, weight(s, l), K, p.out[l], p.in[l], Start::kZero);
          mask(delta_[s * L + l - 1], act_[s * L + l], K * p.in[l]);
        }
      }
      for (int64_t l = fa; l < L; ++l) {
        if (!steps_in_one_pass(l)) {
          times_rate(w_[(s + 1) * L + l], weight(s, l), g_[s * L + l], s, 2 * l, p.out[l] * p.in[l]);
        }
        times_rate(b_[(s + 1) * L + l], bias(s, l), gb_[s * L + l], s, 2 * l + 1, p.out[l]);
        if (!reads_weight_rows(p.in[l])) transpose(wt_[(s + 1) * L + l], w_[(s + 1) * L + l], p.out[l], p.in[l]);
      }
    }
  }

  // The query pass at inner step `step`'s weights, its weighted loss (the task's share of the mean) and its
  // gradient: per task into v for the adapted layers when the sweep follows (added to v when accumulate), summed
  // into the share otherwise. False when no gradient is wanted.
  bool query_pass(const Task& t, int64_t step, bool sweep, bool accumulate, Share<T>& share) {
    const Problem<T>& p = p_;
    const int64_t L = p.layers, S = step, Q = p.query, fa = p.first_adapted, C = p.out[L - 1];
    for (int64_t l = 0; l < L; ++l) {
      T* z = l + 1 < L ? qact_[l + 1] : logits_;
      times_weight_t(z, l == 0 ? t.xq : qact_[l], weight(S, l), weight_t(S, l), l, Q, Start::kRow, bias(S, l));
      if (l + 1 < L) relu(z, Q * p.out[l]);
    }
    T* qd = qd_;
    T* qe = qe_;
    const double scale = p.weights[step - 1] / static_cast<double>(p.total_tasks);
    share.loss += loss_and_grad(p.kind, logits_, t.yq, t.lq, Q, C, scale, qd, query_probs_);
    if (!p.compute_grad && !p.compute_lr_grad) return false;
    const int64_t query_stop = p.compute_grad ? 0 : fa;
    for (int64_t l = L - 1; l >= query_stop; --l) {
      const T* a = l == 0 ? t.xq : qact_[l];
      const bool per_task = sweep && l >= fa;
      const Start start = per_task && !accumulate ? Start::kZero : Start::kKeep;
      mm_tn(per_task ? v_[l] : share.grads[2 * l].data(), qd, a, Q, p.out[l], p.in[l], start);
      column_sums(per_task ? vb_[l] : share.grads[2 * l + 1].data(), qd, Q, p.out[l], start);
      if (l > query_stop) {
        mm(qe, qd, weight(S, l), Q, p.out[l], p.in[l], Start::kZero);
        mask(qe, qact_[l], Q * p.in[l]);
        std::swap(qd, qe);
      }
    }
    return true;
  }

  // The reverse sweep over the inner steps: rate gradients, and v_s = v_{s+1} - H_s (lr * v_{s+1}) by a tangent
  // forward and backward pass (the body's share of H u goes straight into the share's gradients), plus the
  // weighted query gradient at step s's weights under a multi-step loss.
  void reverse_sweep(const Task& t, Share<T>& share) {
    const Problem<T>& p = p_;
    const int64_t L = p.layers, fa = p.first_adapted;
    for (int64_t s = p.steps - 1; s >= 0; --s) {
      if (p.compute_lr_grad) {
        // d lr -= g_s * v_{s+1}, summed to the rate's shape
        for (int64_t l = fa; l < L; ++l) {
          rate_grad(share, 2 * l, s, g_[s * L + l], v_[l], p.out[l] * p.in[l]);
          rate_grad(share, 2 * l + 1, s, gb_[s * L + l], vb_[l], p.out[l]);
        }
      }
      // the Hessian term at step 0 only feeds the parameters' gradient
      if (!p.first_order && (s > 0 || p.compute_grad)) hessian_step(t, s, share);
      if (s > 0 && p.weights[s - 1] != 0) query_pass(t, s, true, true, share);
    }
  }

  // v_s = v_{s+1} - H_s (lr * v_{s+1}), the body's share of -H (lr * v) into the share's gradients: the product
  // runs along the direction u = -lr * v, so that its passes add their terms straight into v and the share.
  void hessian_step(const Task& t, int64_t s, Share<T>& share) {
    const Problem<T>& p = p_;
    const int64_t L = p.layers, K = p.support, fa = p.first_adapted, C = p.out[L - 1];
    const int64_t hessian_stop = p.compute_grad ? 0 : fa;
    // direction u = -lr * v on the adapted layers
    for (int64_t l = fa; l < L; ++l) {
      times_rate(u_[l], v_[l], nullptr, s, 2 * l, p.out[l] * p.in[l]);
      times_rate(ub_[l], vb_[l], nullptr, s, 2 * l + 1, p.out[l]);
      if (!reads_weight_rows(p.in[l])) transpose(ut_[l], u_[l], p.out[l], p.in[l]);
    }
    // tangent forward: r z_l = a_l U_l^T + ub_l + r a_l W_l^T, r a_{l+1} = r z_l masked
    for (int64_t l = fa; l < L; ++l) {
      T* rz = l + 1 < L ? ra_[l + 1] : rz_;
      times_weight_t(rz, input(t, s, l), u_[l], ut_[l], l, K, Start::kRow, ub_[l]);
      if (l > fa) times_weight_t(rz, ra_[l], weight(s, l), weight_t(s, l), l, K, Start::kKeep);
      if (l + 1 < L) mask(rz, act_[s * L + l + 1], K * p.out[l]);
    }
    T* rd = rd_;
    T* re = re_;
    loss_hessian_times(p.kind, rz_, probs_[s], K, C, rd);
    // tangent backward: H u = (rd_l^T a_l + d_l^T r a_l, sum rd_l) per layer, added to v (the body's: to the share)
    for (int64_t l = L - 1; l >= hessian_stop; --l) {
      const bool adapted = l >= fa;
      T* weight_sum = adapted ? v_[l] : share.grads[2 * l].data();
      mm_tn(weight_sum, rd, input(t, s, l), K, p.out[l], p.in[l], Start::kKeep);
      if (l > fa) mm_tn(weight_sum, delta_[s * L + l], ra_[l], K, p.out[l], p.in[l], Start::kKeep);
      column_sums(adapted ? vb_[l] : share.grads[2 * l + 1].data(), rd, K, p.out[l], Start::kKeep);
      if (l > hessian_stop) {
        mm(re, rd, weight(s, l), K, p.out[l], p.in[l], Start::kZero);
        if (adapted) mm(re, delta_[s * L + l], u_[l], K, p.out[l], p.in[l], Start::kKeep);
        mask(re, act_[s * L + l], K * p.in[l]);
        std::swap(rd, re);
      }
    }
  }

  // z [rows, out] = start + x [rows, in] W^T for layer l's weight W [out, in], given as it is and as W^T (w_t:
  // unread, and not made, where the layer reads W's rows, reads_weight_rows).
  void times_weight_t(T* z, const T* x, const T* w, const T* w_t, int64_t l, int64_t rows, Start start,
                      const T* row = nullptr) const {
    if (reads_weight_rows(p_.in[l])) return mm_nt(z, x, w, rows, p_.in[l], p_.out[l], start, row);
    mm(z, x, w_t, rows, p_.in[l], p_.out[l], start, row);
  }

  // Whether the inner step makes layer l's new weight in the pass of its gradient (one rate for all its elements,
  // and no rate gradient to read the gradient later): the gradient, as large as the weight, is never stored.
  bool steps_in_one_pass(int64_t l) const { return !p_.compute_lr_grad && !p_.rate_per_element[2 * l]; }

  // The layer's parameters at inner step s (step 0 and the body: the meta-parameters).
  bool own(int64_t s, int64_t l) const { return s > 0 && l >= p_.first_adapted; }
  const T* weight(int64_t s, int64_t l) const { return own(s, l) ? w_[s * p_.layers + l] : p_.weight[l]; }
  const T* weight_t(int64_t s, int64_t l) const { return own(s, l) ? wt_[s * p_.layers + l] : p_.weight_t[l]; }
  const T* bias(int64_t s, int64_t l) const { return own(s, l) ? b_[s * p_.layers + l] : p_.bias[l]; }

  // out = x - rate * g (the SGD step at inner step s), or out = -rate * x (the direction of a Hessian product, g
  // null)
  void times_rate(T* __restrict out, const T* __restrict x, const T* __restrict g, int64_t s, int64_t param,
                  int64_t n) const {
    const T* rate = p_.rate[param] + s * p_.rate_step_stride;
    if (p_.rate_per_element[param]) {
      if (g == nullptr) {
        for (int64_t i = 0; i < n; ++i) out[i] = -rate[i] * x[i];
      } else {
        for (int64_t i = 0; i < n; ++i) out[i] = x[i] - rate[i] * g[i];
      }
      return;
    }
    const T r = rate[0];  // one number: a loop that vectorizes (a stride of 0 made it gather)
    if (g == nullptr) {
      for (int64_t i = 0; i < n; ++i) out[i] = -r * x[i];
    } else {
      for (int64_t i = 0; i < n; ++i) out[i] = x[i] - r * g[i];
    }
  }
  void rate_grad(Share<T>& share, int64_t param, int64_t s, const T* g, const T* v, int64_t n) const {
    T* out = share.lr_grads[p_.rate_slot[param]].data() + s * p_.rate_step_stride;
    if (p_.rate_per_element[param]) {
      for (int64_t i = 0; i < n; ++i) out[i] -= g[i] * v[i];
      return;
    }
    out[0] -= dot(g, v, n);
  }
  static void add(T* __restrict out, const T* __restrict x, int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[i] += x[i];
  }
  static void add_scaled(T* __restrict out, const T* __restrict x, T scale, int64_t n) {
    for (int64_t i = 0; i < n; ++i) out[i] += scale * x[i];
  }

  const Problem<T>& p_;
  std::vector<T> buffer_;
  // [s * layers + l]; w_, wt_, b_ from step 1 on, for the adapted layers
  std::vector<T*> act_, delta_, g_, gb_, w_, wt_, b_;
  std::vector<T*> probs_;                       // per step
  std::vector<T*> v_, vb_, u_, ut_, ub_, ra_, qact_;  // per layer
  T *logits_ = nullptr, *query_probs_ = nullptr, *rz_ = nullptr, *rd_ = nullptr, *re_ = nullptr, *qd_ = nullptr,
    *qe_ = nullptr;
};

// Runs the tasks of the meta-batch its Problem points to in contiguous ranges, one per thread, and adds up their
// shares; made once for any number of runs (a meta-step each: the Problem's pointers move between them), each
// range's workspace and share kept from run to run. The thread that first runs a range makes them (its cache,
// and its memory on a NUMA machine, holds them).
template <typename T>
class TaskRunner {
 public:
  TaskRunner(const Problem<T>& p, int64_t tasks, at::TensorList params, at::TensorList lr)
      : p_(p), tasks_(tasks), ranges_(std::min<int64_t>(tasks, at::get_num_threads())), shares_(ranges_),
        kernels_(ranges_) {
    for (const auto& t : params) sizes_.push_back(p.compute_grad ? t.numel() : 0);
    for (const auto& t : lr) lr_sizes_.push_back(p.compute_lr_grad ? t.numel() : 0);
  }

  // The meta-batch's loss and gradients: the first range's share, the others added to it. last: the run after
  // which the workspaces are let go, each in the thread that used it (as a call of one meta-step would).
  const Share<T>& run(bool last) {
    at::parallel_for(0, ranges_, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        Share<T>& share = shares_[r];
        if (!kernels_[r]) {
          kernels_[r] = std::make_unique<TaskKernel<T>>(p_);
          for (int64_t n : sizes_) share.grads.emplace_back(n, T(0));
          for (int64_t n : lr_sizes_) share.lr_grads.emplace_back(n, T(0));
        } else {
          for (auto& g : share.grads) std::fill(g.begin(), g.end(), T(0));
          for (auto& g : share.lr_grads) std::fill(g.begin(), g.end(), T(0));
        }
        share.loss = 0;
        for (int64_t t = r * tasks_ / ranges_; t < (r + 1) * tasks_ / ranges_; ++t) kernels_[r]->run(t, share);
        if (last) kernels_[r].reset();
      }
    });
    Share<T>& total = shares_[0];
    for (int64_t r = 1; r < ranges_; ++r) {
      total.loss += shares_[r].loss;
      for (size_t i = 0; i < total.grads.size(); ++i) {
        for (size_t e = 0; e < total.grads[i].size(); ++e) total.grads[i][e] += shares_[r].grads[i][e];
      }
      for (size_t i = 0; i < total.lr_grads.size(); ++i) {
        for (size_t e = 0; e < total.lr_grads[i].size(); ++e) total.lr_grads[i][e] += shares_[r].lr_grads[i][e];
      }
    }
    return total;
  }

 private:
  const Problem<T>& p_;
  const int64_t tasks_, ranges_;
  std::vector<int64_t> sizes_, lr_sizes_;  // of each share's gradients
  std::vector<Share<T>> shares_;
  std::vector<std::unique_ptr<TaskKernel<T>>> kernels_;
};
