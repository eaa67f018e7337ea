// The chunked form's products on the CPU, each with its vjp: the attention form inside each
// chunk, the two state products at degree 2, and the scan across chunks between them. For each
// (chunk, head) the intermediate arrays
// (the c x c weights, a block of the state's features) are built in a buffer that stays in
// cache, multiplied at once by sgemm, and their cotangents folded back onto the inputs in the
// same pass; the MLX ops path writes each of them to memory and reads it back in every pass.
//
// Features follow sympow.rolled_products: for shift r = 0 .. d / 2 and position i, feature
// r * d + i is x_i x_((i + r) mod d), and D' = (d / 2 + 1) d. The chunks' state contributions
// carry the weights of sympow._rolled_weights (1 for r = 0 and, for even d, r = d / 2; 2 else).
//
// Items (chunk, head) are spread over as many threads as OpenBLAS would use, each calling a
// single-threaded sgemm (the attention form's items, one per batch and head, are split into
// row ranges of equal work where they would leave threads idle); the BLAS is the one MLX calls
// (cblas_sgemm resolves as in libmlx: an OpenBLAS loaded first, else the library MLX links).

#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <optional>
#include <thread>
#include <vector>

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/vector.h>

#include "cpu_dispatch.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"

namespace nb = nanobind;
namespace mx = mlx::core;

extern "C" void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                            const float* a, int lda, const float* b, int ldb, float beta, float* c,
                            int ldc);

namespace {

using power_retention_native::no_gpu;
using power_retention_native::run_on_cpu;

constexpr int row_major = 101, no_trans = 111, trans = 112;

// out (m x n, leading dimension ldc) = alpha op(a) op(b) + beta out, all row-major.
void gemm(bool transpose_a, bool transpose_b, int m, int n, int k, const float* a, int lda,
          const float* b, int ldb, float beta, float* out, int ldc, float alpha = 1.0f) {
  cblas_sgemm(row_major, transpose_a ? trans : no_trans, transpose_b ? trans : no_trans, m, n, k,
              alpha, a, lda, b, ldb, beta, out, ldc);
}

// OpenBLAS's thread count, where the process has OpenBLAS: its threads would run one product at a
// time, ours run one item each, so it is set to 1 while ours run and restored after.
struct BlasThreads {
  int (*get)() = nullptr;
  void (*set)(int) = nullptr;

  BlasThreads() {
    get = reinterpret_cast<int (*)()>(dlsym(RTLD_DEFAULT, "openblas_get_num_threads"));
    set = reinterpret_cast<void (*)(int)>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"));
    if (!get || !set) get = nullptr, set = nullptr;
  }
};

const BlasThreads& blas_threads() {
  static BlasThreads threads;
  return threads;
}

std::mutex blas_threads_mutex;  // two streams entering at once restore the count once

// As many threads as OpenBLAS would use (one without OpenBLAS: the reference CBLAS keeps
// global state).
int worker_threads() {
  const auto& blas = blas_threads();
  return std::max(1, blas.get ? blas.get() : 1);
}

// Runs work(item, scratch) for item in [0, items) on up to worker_threads() threads; each
// thread has its own scratch buffer of `scratch_floats`.
template <typename Work>
void for_each_item(size_t items, size_t scratch_floats, Work work) {
  if (items == 0) return;
  const auto& blas = blas_threads();
  int threads = std::min<int>(worker_threads(), static_cast<int>(items));
  auto run = [&](std::atomic<size_t>& next) {
    std::vector<float> scratch(scratch_floats);
    for (size_t item = next++; item < items; item = next++) work(item, scratch.data());
  };
  std::atomic<size_t> next{0};
  if (threads == 1) {
    run(next);
    return;
  }
  std::unique_lock<std::mutex> lock(blas_threads_mutex);
  int before = blas.get();
  blas.set(1);
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(run, std::ref(next));
  run(next);
  for (auto& thread : pool) thread.join();
  blas.set(before);
}

struct Rolled {
  int d, rows, width;  // width: the most shifts per block, so that a block fits in cache

  Rolled(int d, int m) : d(d), rows(d / 2 + 1) {
    constexpr size_t block_bytes = 512 * 1024;
    width = static_cast<int>(std::clamp<size_t>(block_bytes / (sizeof(float) * m * d), 1, rows));
  }

  int features() const { return rows * d; }

  float weight(int r) const { return r == 0 || 2 * r == d ? 1.0f : 2.0f; }

  // F (m x (r1 - r0) d): the features of shifts r0 .. r1 - 1 of the m rows of x (m x d).
  void expand(const float* x, int m, int r0, int r1, bool weighted, float* F) const {
    int cols = (r1 - r0) * d;
    for (int t = 0; t < m; ++t) {
      const float* row = x + static_cast<size_t>(t) * d;
      float* out = F + static_cast<size_t>(t) * cols;
      for (int r = r0; r < r1; ++r, out += d) {
        float w = weighted ? weight(r) : 1.0f;
        for (int i = 0; i < d - r; ++i) out[i] = w * row[i] * row[i + r];
        for (int i = d - r; i < d; ++i) out[i] = w * row[i] * row[i + r - d];
      }
    }
  }

  // dx (m x d) += the vjp of ``expand`` for the cotangent dF of its output.
  void fold(const float* x, const float* dF, int m, int r0, int r1, bool weighted, float* dx) const {
    int cols = (r1 - r0) * d;
    for (int t = 0; t < m; ++t) {
      const float* row = x + static_cast<size_t>(t) * d;
      const float* g = dF + static_cast<size_t>(t) * cols;
      float* out = dx + static_cast<size_t>(t) * d;
      for (int r = r0; r < r1; ++r, g += d) {
        float w = weighted ? weight(r) : 1.0f;
        // x_i as the left factor, then x_(i + r) as the right one.
        for (int i = 0; i < d - r; ++i) out[i] += w * g[i] * row[i + r];
        for (int i = d - r; i < d; ++i) out[i] += w * g[i] * row[i + r - d];
        for (int i = 0; i < d - r; ++i) out[i + r] += w * g[i] * row[i];
        for (int i = d - r; i < d; ++i) out[i + r - d] += w * g[i] * row[i];
      }
    }
  }
};

enum class Product {
  intra_chunk, intra_chunk_vjp, attention, attention_vjp, chunk_states, chunk_states_vjp, read_states,
  read_states_vjp, scan, scan_vjp
};

const char* product_name(Product p) {
  switch (p) {
    case Product::intra_chunk: return "IntraChunk";
    case Product::intra_chunk_vjp: return "IntraChunkVJP";
    case Product::attention: return "PowerAttention";
    case Product::attention_vjp: return "PowerAttentionVJP";
    case Product::chunk_states: return "RolledChunkStates";
    case Product::chunk_states_vjp: return "RolledChunkStatesVJP";
    case Product::read_states: return "RolledReadStates";
    case Product::read_states_vjp: return "RolledReadStatesVJP";
    case Product::scan: return "StatesEnteringChunks";
    default: return "StatesEnteringChunksVJP";
  }
}

// sum(a * b) in double, over lanes that vectorise without reordering flags.
double dot(const float* a, const float* b, size_t size) {
  constexpr size_t lanes = 8;
  double partial[lanes] = {};
  size_t whole = size - size % lanes;
  for (size_t i = 0; i < whole; i += lanes) {
    for (size_t j = 0; j < lanes; ++j) partial[j] += static_cast<double>(a[i + j]) * b[i + j];
  }
  double sum = 0.0;
  for (size_t j = 0; j < lanes; ++j) sum += partial[j];
  for (size_t i = whole; i < size; ++i) sum += static_cast<double>(a[i]) * b[i];
  return sum;
}

// s^(deg - Less), the degree a template argument where it is one of the common ones (Deg > 0),
// so that loops over a row of weights unroll the power, else read at run time (Deg = 0).
template <int Deg, int Less = 0>
inline float power(float s, int deg) {
  float p = 1.0f;
  for (int t = 0; t < (Deg ? Deg : deg) - Less; ++t) p *= s;
  return p;
}

// f(std::integral_constant<int, Deg>{}) with Deg = deg for degrees 1 to 4, else 0.
template <typename F>
auto with_degree(int deg, F f) {
  switch (deg) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 3: return f(std::integral_constant<int, 3>{});
    case 4: return f(std::integral_constant<int, 4>{});
    default: return f(std::integral_constant<int, 0>{});
  }
}

// The attention form inside each chunk (chunk.py's _intra_chunk_function): for each of the G
// query heads reading a key/value head, w_ij = s_ij^deg P_ij for j <= i and 0 above, with the
// scores s = q . k and P_ij = g_(j+1) ... g_i the gates after j (1 when not gated). Rows go in
// blocks of `block`; a block of rows [r0, r1) needs the keys before r1 only, so the products
// skip the zeros above the diagonal (about half of them for long chunks).
struct IntraChunk {
  int G, c, d, E, deg;
  bool gated;
  static constexpr int block = 64;

  // Rows [r0, r1) of one query head's weights for the vjp: W (r1 - r0 x r1) and
  // slope = s^(deg - 1) P (dw / ds = deg slope), each row in one pass. The decays come as running
  // products down the rows (row i is row i - 1 times g_i; `decay`, c floats, carries them from
  // one block to the next): after a reset gate (0), a difference of running log sums would be
  // -inf - -inf.
  void weights(const float* q, const float* k, const float* log_g, int r0, int r1, float* W, float* slope,
               float* decay) const {
    gemm(false, true, r1 - r0, r1, d, q + static_cast<size_t>(r0) * d, d, k, d, 0.0f, W, r1);
    with_degree(deg, [&](auto Deg) {
      for (int i = r0; i < r1; ++i) {
        size_t row = static_cast<size_t>(i - r0) * r1;
        weights_and_slope_row<Deg>(W + row, slope + row, decay, gated ? std::exp(log_g[i]) : 1.0f, i);
        // Written, not multiplied by a mask: a NaN or inf in a later key must not reach row i.
        std::fill(W + row + i + 1, W + row + r1, 0.0f);
      }
    });
  }

  template <int Deg>
  void weights_and_slope_row(float* __restrict w, float* __restrict slope, float* __restrict decay, float gate,
                             int i) const {
    for (int j = 0; j < i; ++j) {
      float s = w[j];
      slope[j] = power<Deg, 1>(s, deg) * decayed(decay, j, gate);
      w[j] = slope[j] * s;
    }
    if (gated) decay[i] = 1.0f;
    slope[i] = power<Deg, 1>(w[i], deg);
    w[i] *= slope[i];
  }

  // The decay from key j < i to row i, moving decay_j down to row i when gated (1 when not:
  // the branch is the same for every j, so the loops around it are split by the compiler).
  float decayed(float* decay, int j, float gate) const { return gated ? decay[j] *= gate : 1.0f; }

  // out (G c x E) = W v1, the last column (the ones column, in the op) as a dot product of each
  // row with it in the weights' own pass: a product E = e + 1 wide runs its last column through
  // sgemm's edge code, ~5% of the forward at e = 64, T = 4096. A key whose value row is not
  // finite is taken as zero in the product (a zero weight times inf is NaN, which must not reach
  // earlier rows), and the rows from the first such key on are NaN, as the recurrent form gives
  // them. With a row range, only rows [begin, end) are computed (from the keys before `end`).
  void forward(const float* q, const float* k, const float* v1, const float* log_g, float* out, float* scratch,
               int begin = 0, int end = -1) const {
    if (end < 0) end = c;
    float* W = scratch;
    float* decay = W + static_cast<size_t>(block) * c;
    float* last = decay + c;
    float* finite_values = last + c;
    int first_bad = end;
    for (int t = end - 1; t >= 0; --t) {
      const float* row = v1 + static_cast<size_t>(t) * E;
      if (!std::all_of(row, row + E, [](float x) { return std::isfinite(x); })) first_bad = t;
    }
    const float* values = v1;
    if (first_bad < end) {
      std::copy(v1, v1 + static_cast<size_t>(end) * E, finite_values);
      for (int t = first_bad; t < end; ++t) {
        float* row = finite_values + static_cast<size_t>(t) * E;
        if (!std::all_of(row, row + E, [](float x) { return std::isfinite(x); })) std::fill(row, row + E, 0.0f);
      }
      values = finite_values;
    }
    for (int t = 0; t < end; ++t) last[t] = values[static_cast<size_t>(t) * E + E - 1];
    for (int h = 0; h < G; ++h) {
      const float* qh = q + static_cast<size_t>(h) * c * d;
      float* out_h = out + static_cast<size_t>(h) * c * E;
      if (gated) decays_before(log_g, begin, decay);
      for (int r0 = begin; r0 < end; r0 += block) {
        int r1 = std::min(r0 + block, end);
        gemm(false, true, r1 - r0, r1, d, qh + static_cast<size_t>(r0) * d, d, k, d, 0.0f, W, r1);
        with_degree(deg, [&](auto Deg) {
          for (int i = r0; i < r1; ++i) {
            float* w = W + static_cast<size_t>(i - r0) * r1;
            float gate = gated ? std::exp(log_g[i]) : 1.0f;
            out_h[static_cast<size_t>(i) * E + E - 1] = weights_row<Deg>(w, decay, gate, last, i);
            std::fill(w + i + 1, w + r1, 0.0f);
          }
        });
        if (E > 1) gemm(false, false, r1 - r0, E - 1, r1, W, r1, values, E, 0.0f, out_h + static_cast<size_t>(r0) * E, E);
      }
      for (int i = std::max(first_bad, begin); i < end; ++i) {
        std::fill(out_h + static_cast<size_t>(i) * E, out_h + static_cast<size_t>(i + 1) * E,
                  std::numeric_limits<float>::quiet_NaN());
      }
    }
  }

  // decay_j for j < row (the gates after j up to row - 1), as the rows before `row` would
  // have left them: running products from the end, so that a reset (0) stays exact.
  void decays_before(const float* log_g, int row, float* decay) const {
    if (row == 0) return;
    decay[row - 1] = 1.0f;
    for (int j = row - 2; j >= 0; --j) decay[j] = decay[j + 1] * std::exp(log_g[j + 1]);
  }

  // Row i of the forward's weights in one pass, scores s in w: the decays move down a row
  // (decay_j *= gate for j < i, decay_i = 1), w_j = s_j^deg decay_j for j <= i; returns
  // sum_j w_j last_j, in lanes (so that the loop vectorises without reordering flags).
  template <int Deg>
  float weights_row(float* __restrict w, float* __restrict decay, float gate, const float* __restrict last,
                    int i) const {
    constexpr int lanes = 16;
    float partial[lanes] = {};
    int whole = i - i % lanes;
    auto entry = [&](int j, float& sum) { sum += (w[j] = power<Deg>(w[j], deg) * decayed(decay, j, gate)) * last[j]; };
    for (int j = 0; j < whole; j += lanes) {
      for (int l = 0; l < lanes; ++l) entry(j + l, partial[l]);
    }
    for (int j = whole; j < i; ++j) entry(j, partial[0]);
    if (gated) decay[i] = 1.0f;
    w[i] = power<Deg>(w[i], deg);
    float sum = w[i] * last[i];
    for (int l = 0; l < lanes; ++l) sum += partial[l];
    return sum;
  }

  size_t forward_scratch() const { return static_cast<size_t>(block) * c + 2 * c + static_cast<size_t>(c) * E; }

  // The weights are recomputed (one product of the block's queries with its keys) rather than
  // kept from the forward. Unlike the forward's, these products keep v1's last column: taking it
  // in the pass over each row was measured ~10% slower here (two more arrays streamed per row,
  // against sgemm's edge code on one of five products). With a row range, only those rows' part
  // of each cotangent: dq of rows [begin, end), and dk, dv1 and d_log_g over the keys before
  // `end`, for the caller to sum over the ranges.
  void vjp(const float* q, const float* k, const float* v1, const float* log_g, const float* d_out, float* dq,
           float* dk, float* dv1, float* d_log_g, float* scratch, int begin = 0, int end = -1) const {
    if (end < 0) end = c;
    size_t tile = static_cast<size_t>(block) * c;
    float *W = scratch, *slope = W + tile, *dW = slope + tile, *decay = dW + tile, *d_l = decay + c;
    std::fill(dk, dk + static_cast<size_t>(end) * d, 0.0f);
    std::fill(dv1, dv1 + static_cast<size_t>(end) * E, 0.0f);
    std::fill(d_l, d_l + end, 0.0f);
    for (int h = 0; h < G; ++h) {
      const float* qh = q + static_cast<size_t>(h) * c * d;
      const float* d_out_h = d_out + static_cast<size_t>(h) * c * E;
      if (gated) decays_before(log_g, begin, decay);
      for (int r0 = begin; r0 < end; r0 += block) {
        int r1 = std::min(r0 + block, end), rows = r1 - r0;
        const float* d_out_rows = d_out_h + static_cast<size_t>(r0) * E;
        weights(qh, k, log_g, r0, r1, W, slope, decay);
        gemm(false, true, rows, r1, E, d_out_rows, E, v1, E, 0.0f, dW, r1);   // dW = d_out v1^T
        gemm(true, false, r1, E, rows, W, r1, d_out_rows, E, 1.0f, dv1, E);  // dv1 += W^T d_out
        for (int i = r0; i < r1; ++i) {
          size_t row = static_cast<size_t>(i - r0) * r1;
          d_l[i] += scores_cotangent_row(dW + row, W + row, slope + row, d_l, i + 1);
          std::fill(dW + row + i + 1, dW + row + r1, 0.0f);
        }
        float scale = static_cast<float>(deg);
        gemm(false, false, rows, d, r1, dW, r1, k, d, 0.0f, dq + (static_cast<size_t>(h) * c + r0) * d, d, scale);
        gemm(true, false, r1, d, rows, dW, r1, qh + static_cast<size_t>(r0) * d, d, 1.0f, dk, d, scale);
      }
    }
    if (gated) {
      float after = 0.0f;
      for (int t = end - 1; t >= 0; --t) d_log_g[t] = after += d_l[t];
    }
  }

  // Row i of the weights' cotangent dW (n = i + 1 entries): takes dW_ij W_ij from d_l[j] when
  // gated (dw_ij / dl_i = w_ij and dw_ij / dl_j = -w_ij for the running sums l of log_g) and
  // returns their sum (for d_l[i]); leaves dW_ij slope_ij, the scores' cotangent over deg.
  float scores_cotangent_row(float* __restrict dW, const float* __restrict W, const float* __restrict slope,
                             float* __restrict d_l, int n) const {
    constexpr int lanes = 16;
    float partial[lanes] = {};
    int whole = n - n % lanes;
    auto entry = [&](int j, float& through_sum) {
      if (gated) {
        float through = dW[j] * W[j];
        d_l[j] -= through;
        through_sum += through;
      }
      dW[j] *= slope[j];
    };
    for (int j = 0; j < whole; j += lanes) {
      for (int l = 0; l < lanes; ++l) entry(j + l, partial[l]);
    }
    for (int j = whole; j < n; ++j) entry(j, partial[0]);
    float sum = 0.0f;
    for (int l = 0; l < lanes; ++l) sum += partial[l];
    return sum;
  }

  size_t vjp_scratch() const { return 3 * static_cast<size_t>(block) * c + 2 * static_cast<size_t>(c); }
};

// `rows` rows of `width` floats, `from_row` floats apart, to rows `to_row` apart.
void copy_rows(const float* from, size_t from_row, float* to, size_t to_row, int rows, int width) {
  for (int t = 0; t < rows; ++t) std::copy(from + t * from_row, from + t * from_row + width, to + t * to_row);
}

// The attention form in the op's own layout, q (B, T, H G, d), k (B, T, H, d), v (B, T, H, e),
// log_g (B, T, H): IntraChunk over the whole sequence (c = T) for each item (batch, key/value
// head). An item's rows lie between the other heads' rows there; they are copied out into
// IntraChunk's layout (the values with their column of ones), and the output back, divided by
// the weight sums when normalised: no chunk-major copy of the whole arrays is ever made. The vjp
// turns the output's cotangent into that of [numerator | sums] (normalize.py's backward: it
// needs y and the sums, which the forward returns) and copies the cotangents back the same way.
struct SequenceAttention {
  IntraChunk intra;  // c = T, E = e + 1
  int H;
  bool normalize;

  int e() const { return intra.E - 1; }
  size_t query_rows() const { return static_cast<size_t>(intra.G) * intra.c; }
  // Floats between consecutive positions of q (y: e instead of d), k (v: e), log_g and the sums.
  size_t q_row(int width) const { return static_cast<size_t>(H) * intra.G * width; }
  size_t k_row(int width) const { return static_cast<size_t>(H) * width; }
  // Where item (b, h) starts in an array with `per_head` floats a position for each key/value head.
  size_t start(size_t item, size_t per_head) const {
    return (item / H) * intra.c * H * per_head + (item % H) * per_head;
  }

  // The item's q (G, c, d), k (c, d), values with ones (c, E) and log gates (c), contiguous:
  // q's rows [begin, end) and the others' rows before `end`, what rows [begin, end) read.
  void gather(size_t item, const float* q, const float* k, const float* v, const float* log_g, float* q1,
              float* k1, float* v1, float* g1, int begin, int end) const {
    int G = intra.G, c = intra.c, d = intra.d, E = intra.E;
    for (int h = 0; h < G; ++h) {
      copy_rows(q + start(item, static_cast<size_t>(G) * d) + h * d + begin * q_row(d), q_row(d),
                q1 + (static_cast<size_t>(h) * c + begin) * d, d, end - begin, d);
    }
    copy_rows(k + start(item, d), k_row(d), k1, d, end, d);
    copy_rows(v + start(item, e()), k_row(e()), v1, E, end, e());
    for (int t = 0; t < end; ++t) v1[static_cast<size_t>(t) * E + e()] = 1.0f;
    if (log_g) copy_rows(log_g + start(item, 1), H, g1, 1, end, 1);
  }

  // How `items` items go to `threads` threads: whole while every thread gets one, and the
  // rest (fewer than the threads, which would leave threads idle) split into ceil(threads /
  // rest) row ranges each, of equal work (row i reads i + 1 keys: bounds at c sqrt(p / parts),
  // on whole row blocks). In the vjp a range's key cotangents need a buffer of their own,
  // c (d + E + 1) floats, until its item's ranges are summed: fewer than 2 threads of them.
  struct Plan {
    struct Task {
      size_t item;
      int begin, end;
    };
    std::vector<Task> tasks;  // the whole items, then the split items' ranges
    size_t whole;             // items [0, whole) and tasks [0, whole) are whole
    std::vector<size_t> ranges_of;  // split item whole + i: tasks [ranges_of[i], ranges_of[i + 1])
  };

  Plan plan(size_t items, size_t threads) const {
    int c = intra.c, block = IntraChunk::block;
    Plan plan;
    size_t rest = items % threads;
    plan.whole = items - rest;
    for (size_t item = 0; item < plan.whole; ++item) plan.tasks.push_back({item, 0, c});
    plan.ranges_of.push_back(plan.tasks.size());
    size_t parts = rest ? (threads + rest - 1) / rest : 1;
    for (size_t item = plan.whole; item < items; ++item) {
      int begin = 0;
      for (size_t p = 1; p <= parts; ++p) {
        int bound = p == parts ? c
                               : static_cast<int>(std::lround(c * std::sqrt(static_cast<double>(p) / parts) / block)) *
                                     block;
        int end = std::clamp(bound, begin, c);
        if (end > begin) plan.tasks.push_back({item, begin, end});
        begin = end;
      }
      plan.ranges_of.push_back(plan.tasks.size());
    }
    return plan;
  }

  size_t forward_scratch() const {
    size_t c = intra.c;
    return query_rows() * (intra.d + intra.E) + c * (intra.d + intra.E + 1) + intra.forward_scratch();
  }

  // Rows [begin, end) of the item's output.
  void forward(size_t item, const float* q, const float* k, const float* v, const float* log_g, float* y,
               float* sums, float* scratch, int begin, int end) const {
    int G = intra.G, c = intra.c, E = intra.E;
    float *q1 = scratch, *k1 = q1 + query_rows() * intra.d, *v1 = k1 + static_cast<size_t>(c) * intra.d;
    float *g1 = v1 + static_cast<size_t>(c) * E, *out1 = g1 + c;
    gather(item, q, k, v, log_g, q1, k1, v1, g1, begin, end);
    intra.forward(q1, k1, v1, log_g ? g1 : nullptr, out1, out1 + query_rows() * E, begin, end);
    for (int h = 0; h < G; ++h) {
      float* y_h = y + start(item, static_cast<size_t>(G) * e()) + h * e();
      float* sums_h = sums + start(item, G) + h;
      for (int t = begin; t < end; ++t) {
        const float* row = out1 + (static_cast<size_t>(h) * c + t) * E;
        float sum = row[e()];
        sums_h[t * q_row(1)] = sum;
        // No epsilon: a zero sum means every weight is zero, and then so is the numerator.
        float factor = normalize ? 1.0f / (sum == 0.0f ? 1.0f : sum) : 1.0f;
        float* to = y_h + t * q_row(e());
        for (int j = 0; j < e(); ++j) to[j] = factor * row[j];
      }
    }
  }

  size_t vjp_scratch() const {
    size_t c = intra.c;
    return 2 * (query_rows() * (intra.d + intra.E) + c * (intra.d + intra.E + 1)) + intra.vjp_scratch();
  }

  // The cotangents of an item's keys (c x d), values with their ones column (c x E) and log
  // gates (c), contiguous.
  struct KeyCotangents {
    const float *dk, *dv1, *d_log_g;
  };

  // Rows [begin, end) of the item: writes their dq and returns their part of the keys', values'
  // and log gates' cotangents (over the keys before `end`; left in `scratch`).
  KeyCotangents vjp(size_t item, const float* q, const float* k, const float* v, const float* log_g,
                    const float* y, const float* sums, const float* dy, float* dq, float* scratch, int begin,
                    int end) const {
    int G = intra.G, c = intra.c, d = intra.d, E = intra.E;
    size_t inputs = query_rows() * (d + E) + static_cast<size_t>(c) * (d + E + 1);
    float *q1 = scratch, *k1 = q1 + query_rows() * d, *v1 = k1 + static_cast<size_t>(c) * d;
    float *g1 = v1 + static_cast<size_t>(c) * E, *d_out1 = g1 + c;
    float *dq1 = scratch + inputs, *dk1 = dq1 + query_rows() * d, *dv1 = dk1 + static_cast<size_t>(c) * d;
    float* dg1 = dv1 + static_cast<size_t>(c) * E;
    gather(item, q, k, v, log_g, q1, k1, v1, g1, begin, end);
    for (int h = 0; h < G; ++h) {
      size_t at = start(item, static_cast<size_t>(G) * e()) + h * e();
      const float* sums_h = sums + start(item, G) + h;
      for (int t = begin; t < end; ++t) {
        const float *dy_t = dy + at + t * q_row(e()), *y_t = y + at + t * q_row(e());
        float* row = d_out1 + (static_cast<size_t>(h) * c + t) * E;
        float sum = sums_h[t * q_row(1)];
        // Only 1 / sum, never 1 / sum^2 (normalize.py says why); no gradient where the sum is
        // below the smallest normal float (or NaN).
        float inverse = !normalize ? 1.0f : sum >= std::numeric_limits<float>::min() ? 1.0f / sum : 0.0f;
        for (int j = 0; j < e(); ++j) row[j] = inverse * dy_t[j];
        row[e()] = normalize ? -static_cast<float>(dot(dy_t, y_t, e())) * inverse : 0.0f;
      }
    }
    intra.vjp(q1, k1, v1, log_g ? g1 : nullptr, d_out1, dq1, dk1, dv1, dg1, dg1 + c, begin, end);
    for (int h = 0; h < G; ++h) {
      copy_rows(dq1 + (static_cast<size_t>(h) * c + begin) * d, d,
                dq + start(item, static_cast<size_t>(G) * d) + h * d + begin * q_row(d), q_row(d), end - begin, d);
    }
    return {dk1, dv1, dg1};
  }

  // Writes an item's key cotangents into dk, dv (without the ones column) and d_log_g (or
  // nullptr) in the op's layout.
  void scatter(size_t item, KeyCotangents from, float* dk, float* dv, float* d_log_g) const {
    int c = intra.c, d = intra.d;
    copy_rows(from.dk, d, dk + start(item, d), k_row(d), c, d);
    copy_rows(from.dv1, intra.E, dv + start(item, e()), k_row(e()), c, e());
    if (d_log_g) copy_rows(from.d_log_g, 1, d_log_g + start(item, 1), H, c, 1);
  }
};

// The states entering each chunk (chunk.py's _stacked_states_entering_chunks): for each item
// (batch, head), S_0 = the initial state and S_(i + 1) = decay_i S_i + contribution_i over P
// floats; the entering states S_0 .. S_(n - 1) stacked, and the final S_n. Slices of P go to
// the threads, each running through the chunks with its slice in cache.
struct Scan {
  static constexpr size_t slice = 4096;
  size_t n, items, P;

  size_t slices() const { return (P + slice - 1) / slice; }

  template <typename Work>
  void for_each_slice(Work work) const {
    for_each_item(items * slices(), 0, [&](size_t task, float*) {
      size_t start = (task % slices()) * slice;
      work(task, task / slices(), start, std::min(slice, P - start));
    });
  }

  // contributions (n, items, P), decay (n, items), initial (items, P) -> entering (n, items, P), final (items, P)
  void forward(const float* contributions, const float* decay, const float* initial, float* entering,
               float* final) const {
    for_each_slice([&](size_t, size_t item, size_t start, size_t size) {
      std::copy(initial + item * P + start, initial + item * P + start + size, entering + item * P + start);
      for (size_t i = 0; i < n; ++i) {
        size_t at = (i * items + item) * P + start;
        float* next = i + 1 < n ? entering + at + items * P : final + item * P + start;
        float g = decay[i * items + item];
        for (size_t x = 0; x < size; ++x) next[x] = g * entering[at + x] + contributions[at + x];
      }
    });
  }

  // The cotangents of both outputs -> those of the three inputs.
  void vjp(const float* entering, const float* decay, const float* d_entering, const float* d_final,
           float* d_contributions, float* d_decay, float* d_initial) const {
    std::vector<double> partial(items * slices() * n);  // sum(d S_(i + 1) * S_i) per slice
    for_each_slice([&](size_t task, size_t item, size_t start, size_t size) {
      // d_contributions_i = d S_(i + 1): the final state's cotangent for the last chunk, then
      // d S_i = decay_i d S_(i + 1) + d entering_i, written straight into the chunk before.
      float* last = d_contributions + ((n - 1) * items + item) * P + start;
      std::copy(d_final + item * P + start, d_final + item * P + start + size, last);
      for (size_t i = n; i-- > 0;) {
        size_t at = (i * items + item) * P + start;
        const float* d_next = d_contributions + at;
        partial[task * n + i] = dot(d_next, entering + at, size);
        float* d_here = i > 0 ? d_contributions + at - items * P : d_initial + item * P + start;
        float g = decay[i * items + item];
        for (size_t x = 0; x < size; ++x) d_here[x] = g * d_next[x] + d_entering[at + x];
      }
    });
    for (size_t item = 0; item < items; ++item) {
      for (size_t i = 0; i < n; ++i) {
        double sum = 0.0;
        for (size_t part = 0; part < slices(); ++part) sum += partial[(item * slices() + part) * n + i];
        d_decay[i * items + item] = static_cast<float>(sum);
      }
    }
  }
};

// Shapes, leading axes flattened to N items:
//   intra_chunk       q (N, G, c, d), k (N, c, d), v1 (N, c, E)[, log_g (N, c)] -> out (N, G, c, E)
//   intra_chunk_vjp   q, k, v1[, log_g], d_out                -> dq, dk, dv1[, d_log_g]
void evaluate_intra_chunk(Product product, int deg, const std::vector<mx::array>& in, std::vector<mx::array>& out) {
  const auto& k_shape = in[1].shape();
  int c = k_shape[k_shape.size() - 2], d = k_shape.back();
  IntraChunk intra{static_cast<int>(in[0].shape()[in[0].ndim() - 3]), c, d, static_cast<int>(in[2].shape().back()),
                   deg, product == Product::intra_chunk ? in.size() == 4 : in.size() == 5};
  size_t items = in[1].size() / (static_cast<size_t>(c) * d);
  size_t q_size = static_cast<size_t>(intra.G) * c * d, k_size = static_cast<size_t>(c) * d;
  size_t v_size = static_cast<size_t>(c) * intra.E, out_size = intra.G * v_size;
  const float *q = in[0].data<float>(), *k = in[1].data<float>(), *v1 = in[2].data<float>();
  const float* log_g = intra.gated ? in[3].data<float>() : nullptr;
  if (product == Product::intra_chunk) {
    float* y = out[0].data<float>();
    for_each_item(items, intra.forward_scratch(), [&](size_t item, float* scratch) {
      intra.forward(q + item * q_size, k + item * k_size, v1 + item * v_size, log_g ? log_g + item * c : nullptr,
                    y + item * out_size, scratch);
    });
    return;
  }
  const float* d_out = in.back().data<float>();
  float *dq = out[0].data<float>(), *dk = out[1].data<float>(), *dv1 = out[2].data<float>();
  float* d_log_g = intra.gated ? out[3].data<float>() : nullptr;
  for_each_item(items, intra.vjp_scratch(), [&](size_t item, float* scratch) {
    intra.vjp(q + item * q_size, k + item * k_size, v1 + item * v_size, log_g ? log_g + item * c : nullptr,
              d_out + item * out_size, dq + item * q_size, dk + item * k_size, dv1 + item * v_size,
              d_log_g ? d_log_g + item * c : nullptr, scratch);
  });
}

// Shapes (the op's layout, one item per batch and key/value head):
//   attention       q (B, T, H G, d), k (B, T, H, d), v (B, T, H, e)[, log_g (B, T, H)]
//                                                      -> y (B, T, H G, e), sums (B, T, H G)
//   attention_vjp   q, k, v[, log_g], y, sums, dy      -> dq, dk, dv[, d_log_g]
void evaluate_attention(Product product, int deg, bool normalize, const std::vector<mx::array>& in,
                        std::vector<mx::array>& out) {
  bool forward = product == Product::attention;
  const auto& k_shape = in[1].shape();
  int B = k_shape[0], T = k_shape[1], H = k_shape[2], d = k_shape[3];
  SequenceAttention attention{{static_cast<int>(in[0].shape(2)) / H, T, d, static_cast<int>(in[2].shape(3)) + 1, deg,
                               in.size() == (forward ? 4u : 7u)},
                              H, normalize};
  const float *q = in[0].data<float>(), *k = in[1].data<float>(), *v = in[2].data<float>();
  const float* log_g = attention.intra.gated ? in[3].data<float>() : nullptr;
  size_t items = static_cast<size_t>(B) * H;
  auto plan = attention.plan(items, worker_threads());
  if (forward) {
    float *y = out[0].data<float>(), *sums = out[1].data<float>();
    for_each_item(plan.tasks.size(), attention.forward_scratch(), [&](size_t i, float* scratch) {
      auto task = plan.tasks[i];
      attention.forward(task.item, q, k, v, log_g, y, sums, scratch, task.begin, task.end);
    });
    return;
  }
  size_t n = in.size();
  const float *y = in[n - 3].data<float>(), *sums = in[n - 2].data<float>(), *dy = in[n - 1].data<float>();
  float *dq = out[0].data<float>(), *dk = out[1].data<float>(), *dv = out[2].data<float>();
  float* d_log_g = log_g ? out[3].data<float>() : nullptr;
  int E = attention.intra.E;
  size_t per_range = static_cast<size_t>(T) * (d + E + 1);
  // The ranges' key cotangents: dk (T x d), dv1 (T x E), d_log_g (T), 0 past each range's end.
  std::vector<float> ranges((plan.tasks.size() - plan.whole) * per_range, 0.0f);
  for_each_item(plan.tasks.size(), attention.vjp_scratch(), [&](size_t i, float* scratch) {
    auto task = plan.tasks[i];
    auto keys = attention.vjp(task.item, q, k, v, log_g, y, sums, dy, dq, scratch, task.begin, task.end);
    if (i < plan.whole) {
      attention.scatter(task.item, keys, dk, dv, d_log_g);
      return;
    }
    float* to = ranges.data() + (i - plan.whole) * per_range;
    std::copy(keys.dk, keys.dk + static_cast<size_t>(task.end) * d, to);
    std::copy(keys.dv1, keys.dv1 + static_cast<size_t>(task.end) * E, to + static_cast<size_t>(T) * d);
    if (log_g) std::copy(keys.d_log_g, keys.d_log_g + task.end, to + static_cast<size_t>(T) * (d + E));
  });
  for_each_item(plan.ranges_of.size() - 1, 0, [&](size_t split, float*) {
    float* sum = ranges.data() + (plan.ranges_of[split] - plan.whole) * per_range;
    for (size_t i = plan.ranges_of[split] + 1; i < plan.ranges_of[split + 1]; ++i) {
      const float* add = ranges.data() + (i - plan.whole) * per_range;
      for (size_t x = 0; x < per_range; ++x) sum[x] += add[x];
    }
    attention.scatter(plan.whole + split, {sum, sum + static_cast<size_t>(T) * d, sum + static_cast<size_t>(T) * (d + E)},
                      dk, dv, d_log_g);
  });
}

// Shapes, leading axes flattened to N items:
//   chunk_states      k (N, c, d), v1 (N, c, E)              -> S (N, E, D')   weighted
//   chunk_states_vjp  k, v1, dS (N, E, D')                   -> dk, dv1
//   read_states       q (N, M, d), entering (N, E, D')       -> reads (N, M, E)
//   read_states_vjp   q, entering, d_reads (N, M, E)         -> dq, d_entering
void evaluate_state_product(Product product, const std::vector<mx::array>& in, std::vector<mx::array>& out) {
  const auto& x_shape = in[0].shape();
  int d = x_shape.back(), m = x_shape[x_shape.size() - 2];
  size_t items = in[0].size() / (static_cast<size_t>(m) * d);
  Rolled rolled(d, m);
  int D = rolled.features();
  bool chunk = product == Product::chunk_states || product == Product::chunk_states_vjp;
  int E = chunk ? in[1].shape().back() : in[1].shape()[in[1].ndim() - 2];
  bool weighted = chunk;
  const float* x = in[0].data<float>();
  const float* other = in[1].data<float>();  // v1, or the entering states
  const float* cotangent = in.size() > 2 ? in[2].data<float>() : nullptr;
  float* result = out[0].data<float>();
  float* second = out.size() > 1 ? out[1].data<float>() : nullptr;
  size_t block_floats = static_cast<size_t>(m) * rolled.width * d;
  bool vjp = cotangent != nullptr;
  if (vjp) std::memset(result, 0, out[0].nbytes());  // dx accumulates over blocks

  for_each_item(items, vjp ? 2 * block_floats : block_floats, [&](size_t item, float* scratch) {
    const float* xi = x + item * m * d;
    size_t state_offset = item * static_cast<size_t>(E) * D;
    float* F = scratch;
    float* dF = scratch + block_floats;
    for (int r0 = 0; r0 < rolled.rows; r0 += rolled.width) {
      int r1 = std::min(r0 + rolled.width, rolled.rows), cols = (r1 - r0) * d, col = r0 * d;
      float beta = r0 == 0 ? 0.0f : 1.0f;
      rolled.expand(xi, m, r0, r1, weighted, F);
      switch (product) {
        case Product::chunk_states:  // S[:, block] = v1^T F
          gemm(true, false, E, cols, m, other + item * m * E, E, F, cols, 0.0f,
               result + state_offset + col, D);
          break;
        case Product::chunk_states_vjp: {
          const float* v1 = other + item * m * E;
          const float* dS = cotangent + state_offset + col;
          gemm(false, true, m, E, cols, F, cols, dS, D, beta, second + item * m * E, E);  // dv1 += F dS^T
          gemm(false, false, m, cols, E, v1, E, dS, D, 0.0f, dF, cols);                     // dF = v1 dS
          rolled.fold(xi, dF, m, r0, r1, weighted, result + item * m * d);
          break;
        }
        case Product::read_states:  // reads += F entering[:, block]^T
          gemm(false, true, m, E, cols, F, cols, other + state_offset + col, D, beta,
               result + item * m * E, E);
          break;
        case Product::read_states_vjp: {
          const float* d_reads = cotangent + item * m * E;
          gemm(true, false, E, cols, m, d_reads, E, F, cols, 0.0f, second + state_offset + col, D);
          gemm(false, false, m, cols, E, d_reads, E, other + state_offset + col, D, 0.0f, dF, cols);
          rolled.fold(xi, dF, m, r0, r1, weighted, result + item * m * d);
          break;
        }
      }
    }
  });
}

// Shapes: contributions (n, ..., P...) with the same items as decay (n, ...) and initial
// (..., P...).
//   scan       contributions, decay, initial                       -> entering, final
//   scan_vjp   entering, decay, d_entering, d_final               -> d_contributions, d_decay, d_initial
void evaluate_scan(Product product, const std::vector<mx::array>& in, std::vector<mx::array>& out) {
  size_t n = in[0].shape()[0], items = in[1].size() / n;
  Scan scan{n, items, in[0].size() / (n * items)};
  if (product == Product::scan) {
    scan.forward(in[0].data<float>(), in[1].data<float>(), in[2].data<float>(), out[0].data<float>(),
                 out[1].data<float>());
  } else {
    scan.vjp(in[0].data<float>(), in[1].data<float>(), in[2].data<float>(), in[3].data<float>(),
             out[0].data<float>(), out[1].data<float>(), out[2].data<float>());
  }
}

std::vector<mx::array> product(Product kind, std::vector<mx::array> inputs, int deg, bool normalize,
                               mx::Stream stream);

class ChunkedProduct : public mx::Primitive {
 public:
  ChunkedProduct(mx::Stream stream, Product product, int deg, bool normalize)
      : mx::Primitive(stream), product_(product), deg_(deg), normalize_(normalize) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    run_on_cpu(stream(), inputs, outputs, [product = product_, deg = deg_, normalize = normalize_](auto& in, auto& out) {
      switch (product) {
        case Product::intra_chunk:
        case Product::intra_chunk_vjp: evaluate_intra_chunk(product, deg, in, out); break;
        case Product::attention:
        case Product::attention_vjp: evaluate_attention(product, deg, normalize, in, out); break;
        case Product::scan:
        case Product::scan_vjp: evaluate_scan(product, in, out); break;
        default: evaluate_state_product(product, in, out);
      }
    });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override { no_gpu(); }

  const char* name() const override { return product_name(product_); }

  // The mapped axis becomes the first item axis of every input (an unmapped input is broadcast
  // along it): after the chunk axis in the scan's stacked arrays (all its inputs but the last),
  // and merged into the batch axis in the op's (B, T, H, d) layout.
  std::pair<std::vector<mx::array>, std::vector<int>> vmap(const std::vector<mx::array>& inputs,
                                                           const std::vector<int>& axes) override {
    bool scan = product_ == Product::scan || product_ == Product::scan_vjp;
    bool sequence = product_ == Product::attention || product_ == Product::attention_vjp;
    int size = 1;
    for (size_t i = 0; i < inputs.size(); ++i) {
      if (axes[i] >= 0) size = inputs[i].shape(axes[i]);
    }
    std::vector<mx::array> moved;
    for (size_t i = 0; i < inputs.size(); ++i) {
      int to = scan && i + 1 < inputs.size() ? 1 : 0;
      mx::array x = inputs[i];
      if (axes[i] < 0) {
        x = mx::expand_dims(x, to, stream());
        auto shape = x.shape();
        shape[to] = size;
        x = mx::broadcast_to(x, shape, stream());
      } else {
        x = mx::moveaxis(x, axes[i], to, stream());
      }
      moved.push_back(sequence ? mx::flatten(x, 0, 1, stream()) : x);
    }
    auto outputs = product(product_, moved, deg_, normalize_, stream());
    std::vector<int> out_axes;
    for (size_t o = 0; o < outputs.size(); ++o) {
      if (sequence) {
        auto shape = outputs[o].shape();
        shape[0] /= size;
        shape.insert(shape.begin(), size);
        outputs[o] = mx::reshape(outputs[o], shape, stream());
      }
      out_axes.push_back(scan && o + 1 < outputs.size() ? 1 : 0);
    }
    return {outputs, out_axes};
  }

  bool is_equivalent(const mx::Primitive& other) const override {
    const auto& that = static_cast<const ChunkedProduct&>(other);
    return product_ == that.product_ && deg_ == that.deg_ && normalize_ == that.normalize_;
  }

 private:
  Product product_;
  int deg_;          // the attention products' degree (the state products are degree 2)
  bool normalize_;   // the attention form's output divided by its weight sums
};

void check(const mx::array& x, int ndim, const char* name) {
  if (x.dtype() != mx::float32) throw std::invalid_argument(std::string(name) + ": expected float32");
  if (x.ndim() < ndim) {
    throw std::invalid_argument(std::string(name) + ": expected at least " + std::to_string(ndim) + " axes");
  }
  if (x.size() == 0) throw std::invalid_argument(std::string(name) + ": expected no empty axis");
}

// The same leading axes (items) and, with `same_rows`, the same second last axis too.
void check_same_items(const mx::array& a, const mx::array& b, const char* name, bool same_rows = false) {
  int last = same_rows ? 1 : 2;
  if (a.ndim() != b.ndim() ||
      !std::equal(a.shape().begin(), a.shape().end() - last, b.shape().begin(), b.shape().end() - last)) {
    throw std::invalid_argument(std::string(name) + (same_rows ? ": leading axes or rows differ" : ": leading axes differ"));
  }
}

mx::Shape with_last_two(mx::Shape shape, int rows, int cols) {
  shape[shape.size() - 2] = rows;
  shape.back() = cols;
  return shape;
}

int rolled_features(const mx::array& x) {
  int d = x.shape().back();
  return (d / 2 + 1) * d;
}

mx::Shape attention_output(const mx::array& q, const mx::array& v) {
  return {q.shape(0), q.shape(1), q.shape(2), v.shape(3)};
}

// The outputs' shapes of each product, from its (checked) inputs.
std::vector<mx::Shape> output_shapes(Product kind, const std::vector<mx::array>& in) {
  switch (kind) {
    case Product::intra_chunk: return {with_last_two(in[0].shape(), in[0].shape(in[0].ndim() - 2), in[2].shape().back())};
    case Product::attention: return {attention_output(in[0], in[2]), {in[0].shape(0), in[0].shape(1), in[0].shape(2)}};
    case Product::intra_chunk_vjp:
    case Product::attention_vjp: {
      std::vector<mx::Shape> shapes{in[0].shape(), in[1].shape(), in[2].shape()};
      size_t gated_inputs = kind == Product::intra_chunk_vjp ? 5 : 7;
      if (in.size() == gated_inputs) shapes.push_back(in[3].shape());
      return shapes;
    }
    case Product::chunk_states: return {with_last_two(in[0].shape(), in[1].shape().back(), rolled_features(in[0]))};
    case Product::read_states:
      return {with_last_two(in[0].shape(), in[0].shape(in[0].ndim() - 2), in[1].shape(in[1].ndim() - 2))};
    case Product::chunk_states_vjp:
    case Product::read_states_vjp: return {in[0].shape(), in[1].shape()};
    case Product::scan: return {in[0].shape(), in[2].shape()};
    default: return {in[0].shape(), in[1].shape(), in[3].shape()};  // scan_vjp
  }
}

std::vector<mx::array> product(Product kind, std::vector<mx::array> inputs, int deg, bool normalize,
                               mx::Stream stream) {
  for (auto& x : inputs) x = mx::contiguous(x, false, stream);
  auto shapes = output_shapes(kind, inputs);
  std::vector<mx::Dtype> dtypes(shapes.size(), mx::float32);
  return mx::array::make_arrays(std::move(shapes), dtypes, std::make_shared<ChunkedProduct>(stream, kind, deg, normalize),
                                inputs);
}

std::vector<mx::array> product(Product kind, std::vector<mx::array> inputs, int deg = 2, bool normalize = false) {
  return product(kind, std::move(inputs), deg, normalize, mx::to_stream({}));
}

void check_state(const mx::array& x, const mx::array& state, const char* name) {
  check(state, 2, name);
  check_same_items(x, state, name);
  if (state.shape().back() != rolled_features(x)) {
    throw std::invalid_argument(std::string(name) + ": expected " + std::to_string(rolled_features(x)) +
                                " rolled features on the last axis");
  }
}

}  // namespace

// q (..., G, c, d), k (..., c, d), v1 (..., c, E), log_g (..., c) or None, deg >= 1.
std::vector<mx::array> intra_chunk_inputs(const mx::array& q, const mx::array& k, const mx::array& v1,
                                          const std::optional<mx::array>& log_g, int deg) {
  check(q, 3, "q"), check(k, 2, "k"), check(v1, 2, "v1"), check_same_items(k, v1, "v1", true);
  if (deg < 1) throw std::invalid_argument("deg: expected an integer >= 1");
  bool same = q.ndim() == k.ndim() + 1 && q.shape()[q.ndim() - 2] == k.shape()[k.ndim() - 2] &&
              q.shape().back() == k.shape().back() &&
              std::equal(k.shape().begin(), k.shape().end() - 2, q.shape().begin());
  if (!same) throw std::invalid_argument("q: expected (..., G, c, d) for k (..., c, d)");
  std::vector<mx::array> inputs{q, k, v1};
  if (log_g) {
    check(*log_g, 1, "log_g");
    if (!std::equal(k.shape().begin(), k.shape().end() - 1, log_g->shape().begin(), log_g->shape().end())) {
      throw std::invalid_argument("log_g: expected k's shape without its last axis");
    }
    inputs.push_back(*log_g);
  }
  return inputs;
}

// q (B, T, H G, d), k (B, T, H, d), v (B, T, H, e), log_g (B, T, H) or None, deg >= 1.
std::vector<mx::array> attention_inputs(const mx::array& q, const mx::array& k, const mx::array& v,
                                        const std::optional<mx::array>& log_g, int deg) {
  for (auto [x, name] : {std::pair{&q, "q"}, {&k, "k"}, {&v, "v"}}) {
    check(*x, 4, name);
    if (x->ndim() != 4) throw std::invalid_argument(std::string(name) + ": expected 4 axes (B, T, H, width)");
  }
  if (deg < 1) throw std::invalid_argument("deg: expected an integer >= 1");
  if (k.shape(0) != q.shape(0) || k.shape(1) != q.shape(1) || k.shape(3) != q.shape(3) || q.shape(2) % k.shape(2)) {
    throw std::invalid_argument("k: expected (B, T, H, d) with q's B, T and d, and H dividing q's heads");
  }
  if (v.shape(0) != k.shape(0) || v.shape(1) != k.shape(1) || v.shape(2) != k.shape(2)) {
    throw std::invalid_argument("v: expected (B, T, H, e) with k's B, T and H");
  }
  std::vector<mx::array> inputs{q, k, v};
  if (log_g) {
    check(*log_g, 3, "log_g");
    if (log_g->shape() != mx::Shape{k.shape(0), k.shape(1), k.shape(2)}) {
      throw std::invalid_argument("log_g: expected (B, T, H), k's shape without its last axis");
    }
    inputs.push_back(*log_g);
  }
  return inputs;
}

void check_scan(const mx::array& stacked, const mx::array& decay, const mx::array& state) {
  check(stacked, 2, "contributions"), check(decay, 1, "decay"), check(state, 1, "initial");
  size_t n = stacked.shape()[0];
  if (decay.ndim() == 0 || static_cast<size_t>(decay.shape()[0]) != n || state.size() * n != stacked.size() ||
      decay.size() == 0 || state.size() % (decay.size() / n)) {
    throw std::invalid_argument("states_entering_chunks: expected contributions (n, ...), decay (n, items) and "
                                "a state (items, ...) with the contributions' size over n");
  }
}

void register_chunked(nb::module_& m) {
  m.def("states_entering_chunks", [](const mx::array& contributions, const mx::array& decay,
                                     const mx::array& initial) {
    check_scan(contributions, decay, initial);
    return product(Product::scan, {contributions, decay, initial});
  }, nb::arg("contributions"), nb::arg("decay"), nb::arg("initial"));
  m.def("states_entering_chunks_vjp", [](const mx::array& entering, const mx::array& decay,
                                         const mx::array& d_entering, const mx::array& d_final) {
    check_scan(entering, decay, d_final);
    if (d_entering.shape() != entering.shape()) throw std::invalid_argument("d_entering: expected entering's shape");
    return product(Product::scan_vjp, {entering, decay, d_entering, d_final});
  }, nb::arg("entering"), nb::arg("decay"), nb::arg("d_entering"), nb::arg("d_final"));
  m.def("intra_chunk", [](const mx::array& q, const mx::array& k, const mx::array& v1,
                          const std::optional<mx::array>& log_g, int deg) {
    return product(Product::intra_chunk, intra_chunk_inputs(q, k, v1, log_g, deg), deg)[0];
  }, nb::arg("q"), nb::arg("k"), nb::arg("v1"), nb::arg("log_g").none(), nb::arg("deg"));
  m.def("intra_chunk_vjp", [](const mx::array& q, const mx::array& k, const mx::array& v1,
                              const std::optional<mx::array>& log_g, int deg, const mx::array& d_out) {
    auto inputs = intra_chunk_inputs(q, k, v1, log_g, deg);
    check(d_out, 3, "d_out");
    if (d_out.shape() != output_shapes(Product::intra_chunk, inputs)[0]) {
      throw std::invalid_argument("d_out: expected the output's shape");
    }
    inputs.push_back(d_out);
    return product(Product::intra_chunk_vjp, inputs, deg);
  }, nb::arg("q"), nb::arg("k"), nb::arg("v1"), nb::arg("log_g").none(), nb::arg("deg"), nb::arg("d_out"));
  m.def("attention", [](const mx::array& q, const mx::array& k, const mx::array& v,
                        const std::optional<mx::array>& log_g, int deg, bool normalize) {
    return product(Product::attention, attention_inputs(q, k, v, log_g, deg), deg, normalize);
  }, nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("log_g").none(), nb::arg("deg"), nb::arg("normalize"));
  m.def("attention_vjp", [](const mx::array& q, const mx::array& k, const mx::array& v,
                            const std::optional<mx::array>& log_g, int deg, bool normalize, const mx::array& y,
                            const mx::array& sums, const mx::array& dy) {
    auto inputs = attention_inputs(q, k, v, log_g, deg);
    check(y, 4, "y"), check(sums, 3, "sums"), check(dy, 4, "dy");
    if (y.shape() != attention_output(q, v)) throw std::invalid_argument("y: expected the output's shape");
    if (dy.shape() != y.shape()) throw std::invalid_argument("dy: expected the output's shape");
    if (sums.shape() != mx::Shape{q.shape(0), q.shape(1), q.shape(2)}) {
      throw std::invalid_argument("sums: expected (B, T, Hq), q's shape without its last axis");
    }
    inputs.insert(inputs.end(), {y, sums, dy});
    return product(Product::attention_vjp, inputs, deg, normalize);
  }, nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("log_g").none(), nb::arg("deg"), nb::arg("normalize"),
     nb::arg("y"), nb::arg("sums"), nb::arg("dy"));
  m.def("rolled_chunk_states", [](const mx::array& k, const mx::array& v1) {
    check(k, 2, "k"), check(v1, 2, "v1"), check_same_items(k, v1, "v1", true);
    return product(Product::chunk_states, {k, v1})[0];
  }, nb::arg("k"), nb::arg("v1"));
  m.def("rolled_chunk_states_vjp", [](const mx::array& k, const mx::array& v1, const mx::array& d_states) {
    check(k, 2, "k"), check(v1, 2, "v1"), check_same_items(k, v1, "v1", true), check_state(k, d_states, "d_states");
    if (d_states.shape()[d_states.ndim() - 2] != v1.shape().back()) {
      throw std::invalid_argument("d_states: expected v1's last axis as its second last");
    }
    return product(Product::chunk_states_vjp, {k, v1, d_states});
  }, nb::arg("k"), nb::arg("v1"), nb::arg("d_states"));
  m.def("rolled_read_states", [](const mx::array& q, const mx::array& entering) {
    check(q, 2, "q"), check_state(q, entering, "entering");
    return product(Product::read_states, {q, entering})[0];
  }, nb::arg("q"), nb::arg("entering"));
  m.def("rolled_read_states_vjp", [](const mx::array& q, const mx::array& entering, const mx::array& d_reads) {
    check(q, 2, "q"), check_state(q, entering, "entering"), check(d_reads, 2, "d_reads");
    check_same_items(q, d_reads, "d_reads");
    if (d_reads.shape() != output_shapes(Product::read_states, {q, entering})[0]) {
      throw std::invalid_argument("d_reads: expected the reads' shape");
    }
    return product(Product::read_states_vjp, {q, entering, d_reads});
  }, nb::arg("q"), nb::arg("entering"), nb::arg("d_reads"));
}
