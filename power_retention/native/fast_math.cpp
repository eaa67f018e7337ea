// exp, sigmoid and logsumexp over float32 as MLX primitives for the CPU, in loops the compiler
// vectorises. MLX's CPU build for x86 evaluates exp one float at a time (about 25 ns a float on
// a Xeon), and a language model's cross-entropy and SwiGLU spend most of a training step there.
// Built and loaded by power_retention/native/__init__.py.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include <nanobind/nanobind.h>

#include "cpu_dispatch.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"

namespace nb = nanobind;
namespace mx = mlx::core;

namespace {

// e^x = 2^n e^r with n = round(x / ln 2) and |r| <= ln(2) / 2; e^r by a degree-6 polynomial
// (the Cephes coefficients, relative error about 1e-7 on that interval). 2^n is applied as two
// factors 2^(n / 2) built from exponent bits, so that n from -150 to 128 (results down to the
// subnormals, up to the largest float) needs no special case. Rounding by adding and
// subtracting 1.5 * 2^23 keeps to baseline SSE2, where floor does not vectorise. Below -103.97
// the result is 0, above 88.72 inf, and NaN stays NaN.
inline float power_of_two(int32_t n) {
  int32_t bits = (n + 127) << 23;
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
}

inline float exp_one(float x) {
  constexpr float lowest = -103.972084f, highest = 88.7228391f;
  constexpr float log2e = 1.44269504088896341f, round_shift = 12582912.0f;
  constexpr float ln2_high = 0.693359375f, ln2_low = -2.12194440e-4f;
  float clamped = x < lowest ? lowest : (x > highest ? highest : x);
  float n = (clamped * log2e + round_shift) - round_shift;
  float r = clamped - n * ln2_high - n * ln2_low;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t whole = static_cast<int32_t>(n), half = whole >> 1;
  float y = p * power_of_two(half) * power_of_two(whole - half);
  y = x < lowest ? 0.0f : y;
  y = x > highest ? std::numeric_limits<float>::infinity() : y;
  return x != x ? x : y;
}

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define WIDEST_VECTORS __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define WIDEST_VECTORS
#endif

WIDEST_VECTORS void exp_loop(const float* x, float* y, size_t size) {
  for (size_t i = 0; i < size; ++i) y[i] = exp_one(x[i]);
}

WIDEST_VECTORS void sigmoid_loop(const float* x, float* y, size_t size) {
  for (size_t i = 0; i < size; ++i) y[i] = 1.0f / (1.0f + exp_one(-x[i]));
}

// One row: max, then the sum of e^(x - max), then max + log(sum). Both reductions keep
// `lanes` partial results so that they vectorise without reordering flags. A row of -inf gives
// -inf, a row with +inf gives +inf, a NaN anywhere gives NaN.
constexpr size_t lanes = 16;

WIDEST_VECTORS float logsumexp_row(const float* x, size_t size) {
  constexpr float minus_inf = -std::numeric_limits<float>::infinity();
  float partial[lanes];
  for (size_t j = 0; j < lanes; ++j) partial[j] = minus_inf;
  size_t whole = size - size % lanes;
  for (size_t i = 0; i < whole; i += lanes) {
    for (size_t j = 0; j < lanes; ++j) partial[j] = x[i + j] > partial[j] ? x[i + j] : partial[j];
  }
  float top = minus_inf;
  for (size_t j = 0; j < lanes; ++j) top = partial[j] > top ? partial[j] : top;
  for (size_t i = whole; i < size; ++i) top = x[i] > top ? x[i] : top;
  if (std::isinf(top)) {
    bool nan = false;
    for (size_t i = 0; i < size; ++i) nan |= x[i] != x[i];
    return nan ? std::numeric_limits<float>::quiet_NaN() : top;
  }
  // The sum in double: over a 50,257-token vocabulary float partial sums drifted by 3e-6.
  double sums[lanes] = {};
  for (size_t i = 0; i < whole; i += lanes) {
    for (size_t j = 0; j < lanes; ++j) sums[j] += exp_one(x[i + j] - top);
  }
  double sum = 0.0;
  for (size_t j = 0; j < lanes; ++j) sum += sums[j];
  for (size_t i = whole; i < size; ++i) sum += exp_one(x[i] - top);
  return top + static_cast<float>(std::log(sum));
}

enum class Kind { exp, sigmoid };

mx::array elementwise(const mx::array& x, Kind kind, mx::StreamOrDevice s);
mx::array logsumexp_last(const mx::array& x, mx::StreamOrDevice s);

void check_input(const mx::array& x, const char* name) {
  if (x.dtype() != mx::float32) {
    throw std::invalid_argument(std::string(name) + ": expected float32");
  }
}

// One input, one output: the shape of every primitive here.
template <typename Loop>
void run_unary_on_cpu(mx::Stream stream, const mx::array& x, mx::array& out, Loop loop) {
  std::vector<mx::array> outputs{out};  // the same array: its data is set through either handle
  power_retention_native::run_on_cpu(stream, {x}, outputs,
                                     [loop](auto& in, auto& out) { loop(in[0], out[0]); });
}

class Elementwise : public mx::UnaryPrimitive {
 public:
  Elementwise(mx::Stream stream, Kind kind) : mx::UnaryPrimitive(stream), kind_(kind) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    auto loop = kind_ == Kind::exp ? exp_loop : sigmoid_loop;
    run_unary_on_cpu(stream(), inputs[0], out, [loop](const mx::array& x, mx::array& out) {
      loop(x.data<float>(), out.data<float>(), x.size());
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override { power_retention_native::no_gpu(); }

  std::vector<mx::array> vjp(const std::vector<mx::array>&, const std::vector<mx::array>& cotangents,
                             const std::vector<int>&, const std::vector<mx::array>& outputs) override {
    return {mx::multiply(cotangents[0], derivative(outputs[0]), stream())};
  }

  std::vector<mx::array> jvp(const std::vector<mx::array>& primals, const std::vector<mx::array>& tangents,
                             const std::vector<int>&) override {
    return {mx::multiply(tangents[0], derivative(elementwise(primals[0], kind_, stream())), stream())};
  }

  std::pair<std::vector<mx::array>, std::vector<int>> vmap(const std::vector<mx::array>& inputs,
                                                           const std::vector<int>& axes) override {
    return {{elementwise(inputs[0], kind_, stream())}, axes};
  }

  const char* name() const override { return kind_ == Kind::exp ? "FastExp" : "FastSigmoid"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    return kind_ == static_cast<const Elementwise&>(other).kind_;
  }

 private:
  Kind kind_;

  // From the output y: exp' = y, sigmoid' = y (1 - y).
  mx::array derivative(const mx::array& y) {
    if (kind_ == Kind::exp) return y;
    return mx::multiply(y, mx::subtract(mx::array(1.0f), y, stream()), stream());
  }
};

class LogSumExpLast : public mx::UnaryPrimitive {
 public:
  explicit LogSumExpLast(mx::Stream stream) : mx::UnaryPrimitive(stream) {}

  void eval_cpu(const std::vector<mx::array>& inputs, mx::array& out) override {
    run_unary_on_cpu(stream(), inputs[0], out, [](const mx::array& x, mx::array& out) {
      size_t width = x.shape().back();
      const float* in = x.data<float>();
      float* result = out.data<float>();
      // An empty row sums to 0, whose log is -inf.
      for (size_t row = 0; row < out.size(); ++row) {
        result[row] = width ? logsumexp_row(in + row * width, width) : -std::numeric_limits<float>::infinity();
      }
    });
  }

  void eval_gpu(const std::vector<mx::array>&, mx::array&) override { power_retention_native::no_gpu(); }

  // d logsumexp / dx = softmax(x) = e^(x - logsumexp(x)), recomputed rather than kept.
  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>&, const std::vector<mx::array>& outputs) override {
    auto softmax = elementwise(mx::subtract(primals[0], mx::expand_dims(outputs[0], -1, stream()), stream()),
                               Kind::exp, stream());
    return {mx::multiply(mx::expand_dims(cotangents[0], -1, stream()), softmax, stream())};
  }

  std::vector<mx::array> jvp(const std::vector<mx::array>& primals, const std::vector<mx::array>& tangents,
                             const std::vector<int>&) override {
    auto lse = logsumexp_last(primals[0], stream());
    auto softmax = elementwise(mx::subtract(primals[0], mx::expand_dims(lse, -1, stream()), stream()),
                               Kind::exp, stream());
    return {mx::sum(mx::multiply(softmax, tangents[0], stream()), -1, false, stream())};
  }

  std::pair<std::vector<mx::array>, std::vector<int>> vmap(const std::vector<mx::array>& inputs,
                                                           const std::vector<int>& axes) override {
    int axis = axes[0];
    auto x = inputs[0];
    if (axis == x.ndim() - 1) {  // keep the mapped axis off the reduced one
      x = mx::moveaxis(x, axis, 0, stream());
      axis = 0;
    }
    return {{logsumexp_last(x, stream())}, {axis}};
  }

  const char* name() const override { return "FastLogSumExp"; }

  bool is_equivalent(const mx::Primitive&) const override { return true; }
};

mx::array elementwise(const mx::array& x, Kind kind, mx::StreamOrDevice s) {
  check_input(x, kind == Kind::exp ? "exp" : "sigmoid");
  auto stream = mx::to_stream(s);
  auto contiguous = mx::contiguous(x, false, stream);
  return mx::array(x.shape(), mx::float32, std::make_shared<Elementwise>(stream, kind), {contiguous});
}

mx::array logsumexp_last(const mx::array& x, mx::StreamOrDevice s) {
  check_input(x, "logsumexp");
  if (x.ndim() == 0) throw std::invalid_argument("logsumexp: expected at least one axis");
  auto stream = mx::to_stream(s);
  auto contiguous = mx::contiguous(x, false, stream);
  auto shape = x.shape();
  shape.pop_back();
  return mx::array(shape, mx::float32, std::make_shared<LogSumExpLast>(stream), {contiguous});
}

}  // namespace

void register_chunked(nb::module_& m);  // chunked.cpp

NB_MODULE(_fast_math, m) {
  m.doc() = "Vectorised exp, sigmoid and last-axis logsumexp for float32 on MLX's CPU.";
  m.def("exp", [](const mx::array& x) { return elementwise(x, Kind::exp, {}); }, nb::arg("x"));
  m.def("sigmoid", [](const mx::array& x) { return elementwise(x, Kind::sigmoid, {}); }, nb::arg("x"));
  m.def("logsumexp", [](const mx::array& x) { return logsumexp_last(x, {}); }, nb::arg("x"));
  register_chunked(m);
}
