// C++17 shim of the subset of the Metal Shading Language that MLX custom
// kernel bodies use, plus the cooperative "GPU" runtime (fibers) that the
// generated runner uses.  Everything runs on ONE OS thread: the threads of a
// threadgroup are ucontext fibers, so a barrier or a simd collective is a
// point where the fiber yields to the scheduler (see run_threadgroup).  That
// makes the interleaving fully controlled (forward / reverse / random order)
// and lets us detect early returns and lane-divergent collectives exactly.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <type_traits>
#include <unistd.h>
#include <ucontext.h>
#include <vector>

// The C++17 type traits the shim uses, spelled so that it also compiles as C++14 (the
// language-version check compiles kernels at C++14, as Metal 3.1 is based on it).
namespace emu_traits {
template <class T> constexpr bool is_arithmetic_v = std::is_arithmetic<T>::value;
template <class A, class B> constexpr bool is_same_v = std::is_same<A, B>::value;
}  // namespace emu_traits

namespace emu {

// ---------------------------------------------------------------- errors
struct uint3_ { unsigned x, y, z; };
// Position of the thread currently executing (for error messages).
inline uint3_ g_cur_pos{0, 0, 0};
inline bool g_in_kernel = false;

// Errors end the process: the Python side reads the "EMU_ERROR:" line.  This
// is simpler and safer than unwinding through suspended fibers.
[[noreturn]] inline void fail(const char* msg) {
  if (g_in_kernel)
    std::fprintf(stderr, "EMU_ERROR: %s [thread_position_in_grid=(%u,%u,%u)]\n",
                 msg, g_cur_pos.x, g_cur_pos.y, g_cur_pos.z);
  else
    std::fprintf(stderr, "EMU_ERROR: %s\n", msg);
  std::fflush(stderr);
  _exit(3);
}

// ---------------------------------------------------------------- scalars
// g++ >= 12 supports _Float16 in C++ on x86-64: real IEEE binary16 with
// round-to-nearest-even conversions and arithmetic rounded per operation. clang before 15
// has no _Float16 on x86; EMU_SYNTAX_ONLY (the clang syntax check, which never runs the
// code) then stands float in for it.
#if defined(EMU_SYNTAX_ONLY) && !defined(__FLT16_MAX__)
struct half {  // a distinct type, so the half overloads below stay distinct
  float value;
  half() = default;
  half(float x) : value(x) {}
  operator float() const { return value; }
};
#else
using half = _Float16;
#endif

// bfloat16: storage is the top 16 bits of a float; conversion from float
// rounds to nearest even (NaN kept quiet); arithmetic happens in float and is
// rounded back on assignment, like Metal's bfloat.
struct bfloat {
  uint16_t bits;
  bfloat() = default;
  static uint16_t round(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);  // NaN
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
    return uint16_t(u >> 16);
  }
  template <class T, class = std::enable_if_t<emu_traits::is_arithmetic_v<T> ||
                                              emu_traits::is_same_v<T, half>>>
  bfloat(T v) : bits(round(float(v))) {}
  operator float() const {
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
}  // namespace emu

#ifdef EMU_ADDRESS_SPACES
// The address-space check compiles and never runs, and clang calls no member function (a
// conversion) of a class object in another address space, as a `device half` element is.
// Two built-in floating types stand in for half and bfloat there, distinct from float and
// from each other, so that their overloads and conversions are checked all the same.
using half = long double;
using bfloat = __float128;
#else
using half = emu::half;
using bfloat = emu::bfloat;
#endif
using float16_t = half;    // MLX's get_type_string names
using bfloat16_t = bfloat;
using uint = unsigned int;
using ushort = unsigned short;
using uchar = unsigned char;
using ulong = unsigned long;

// ---------------------------------------------------------------- vectors
// vec<T, N> (N = 2, 3, 4) as Metal has it: components .x .y .z .w and .r .g .b .a;
// swizzles of 2 to 4 letters of one spelling (`v.zyx`, `c.bgra`), read as a vector and
// assigned component-wise; []; + - * / (and += ...) with vectors, swizzles and scalars;
// Metal's constructors; Metal's sizes and alignments (sizeof(float3) == 16).
//
// C++ has no properties, so every swizzle is a data member: the components share an
// anonymous union with one emu::swizzle<T, N, I...> per name, an object laid over the whole
// vector that knows which indices it stands for.  Reading a union member other than the
// one last written is type punning that g++ and clang define (as are the anonymous structs
// that give .x and .r).  Not modelled: swizzling a swizzle (`v.xy.x`: write
// `float2(v.xy).x`); `auto s = v.xy;` keeps a proxy holding a copy of the whole vector.
template <class T, int N> struct vec;

namespace emu {
template <int... I> constexpr bool distinct() {
  const int idx[] = {I...};
  for (unsigned i = 0; i < sizeof...(I); ++i)
    for (unsigned j = i + 1; j < sizeof...(I); ++j)
      if (idx[i] == idx[j]) return false;
  return true;
}

template <class T, int N, int... I> struct swizzle {
  using vector = vec<T, sizeof...(I)>;
  T e[N];  // the whole vector
  swizzle() = default;  // trivial, as a union member must be
  swizzle(const swizzle&) = default;  // stays trivial; declared since operator= is
  operator vector() const { return vector(e[I]...); }
  T operator[](int k) const { const int idx[] = {I...}; return e[idx[k]]; }
  swizzle& operator=(const vector& v) {
    static_assert(distinct<I...>(), "Metal: a swizzle that is assigned to may not repeat a component");
    int k = 0;
    ((e[I] = v[k++]), ...);
    return *this;
  }
  // User-provided, or `v.xy = w.xy` would copy all of w.
  swizzle& operator=(const swizzle& s) { return *this = vector(s); }
};

// vec_of<A>: the vec a vector or swizzle reads as (no type otherwise, for SFINAE);
// width_v<A>: its number of components; 1 for a scalar, 0 for anything else.
template <class A> struct vec_traits { static constexpr int width = 0; };
template <class T, int N> struct vec_traits<vec<T, N>> {
  using type = vec<T, N>;
  static constexpr int width = N;
};
template <class T, int N, int... I> struct vec_traits<swizzle<T, N, I...>> {
  using type = vec<T, sizeof...(I)>;
  static constexpr int width = sizeof...(I);
};
template <class S> constexpr bool is_scalar_v =
    emu_traits::is_arithmetic_v<S> || emu_traits::is_same_v<S, half> || emu_traits::is_same_v<S, bfloat>;
template <class A> using vec_of = typename vec_traits<std::decay_t<A>>::type;
template <class A> constexpr int width_v =
    is_scalar_v<std::decay_t<A>> ? 1 : vec_traits<std::decay_t<A>>::width;

// Whether scalars and vectors A... have N components in all (a constructor's arguments).
template <int N, class... A> constexpr bool fills_v = ((width_v<A> > 0) && ...) && (width_v<A> + ...) == N;

// Stores one constructor argument's components from e[k] on.
template <class T, class A> void put_components(T* e, int& k, const A& a) {
  if constexpr (is_scalar_v<A>) {
    e[k++] = T(a);
  } else {
    const vec_of<A> v = a;
    for (int j = 0; j < width_v<A>; ++j) e[k++] = T(v[j]);
  }
}

// EMU_SWIZZLES(n, a, b, c, d) declares every 2-, 3- and 4-letter swizzle spelled with the
// first n of the letters a b c d.  A macro is not expanded again inside its own expansion,
// so each letter position has its own macro: EMU_Nk extends the k-letter name p (indices
// ...) by each letter; EMU_IF drops the letters c and d where the vector lacks them.
#define EMU_IF(n, i, ...) EMU_IF_##n##i(__VA_ARGS__)
#define EMU_IF_22(...)
#define EMU_IF_23(...)
#define EMU_IF_32(...) __VA_ARGS__
#define EMU_IF_33(...)
#define EMU_IF_42(...) __VA_ARGS__
#define EMU_IF_43(...) __VA_ARGS__
#define EMU_SW(n, p, ...) ::emu::swizzle<T, n, __VA_ARGS__> p;
#define EMU_SWIZZLES(n, a, b, c, d)                                                       \
  EMU_N1(n, a, b, c, d, a, 0) EMU_N1(n, a, b, c, d, b, 1)                                 \
  EMU_IF(n, 2, EMU_N1(n, a, b, c, d, c, 2)) EMU_IF(n, 3, EMU_N1(n, a, b, c, d, d, 3))
#define EMU_N1(n, a, b, c, d, p, ...)                                                     \
  EMU_N2(n, a, b, c, d, p##a, __VA_ARGS__, 0) EMU_N2(n, a, b, c, d, p##b, __VA_ARGS__, 1) \
  EMU_IF(n, 2, EMU_N2(n, a, b, c, d, p##c, __VA_ARGS__, 2))                               \
  EMU_IF(n, 3, EMU_N2(n, a, b, c, d, p##d, __VA_ARGS__, 3))
#define EMU_N2(n, a, b, c, d, p, ...) EMU_SW(n, p, __VA_ARGS__)                           \
  EMU_N3(n, a, b, c, d, p##a, __VA_ARGS__, 0) EMU_N3(n, a, b, c, d, p##b, __VA_ARGS__, 1) \
  EMU_IF(n, 2, EMU_N3(n, a, b, c, d, p##c, __VA_ARGS__, 2))                               \
  EMU_IF(n, 3, EMU_N3(n, a, b, c, d, p##d, __VA_ARGS__, 3))
#define EMU_N3(n, a, b, c, d, p, ...) EMU_SW(n, p, __VA_ARGS__)                           \
  EMU_SW(n, p##a, __VA_ARGS__, 0) EMU_SW(n, p##b, __VA_ARGS__, 1)                         \
  EMU_IF(n, 2, EMU_SW(n, p##c, __VA_ARGS__, 2)) EMU_IF(n, 3, EMU_SW(n, p##d, __VA_ARGS__, 3))

// The storage of vec<T, n>: the union, aligned as Metal aligns vectors (a 3-vector as a 4-vector).
#define EMU_UNPAREN(...) __VA_ARGS__
template <class T, int N> struct vec_storage;
#define EMU_VEC_STORAGE(n, xyzw, rgba)                                                 \
  template <class T> struct alignas(sizeof(T) * (n == 3 ? 4 : n)) vec_storage<T, n> { \
    union {                                                                            \
      T e[n];                                                                          \
      struct { T EMU_UNPAREN xyzw; };                                                  \
      struct { T EMU_UNPAREN rgba; };                                                  \
      EMU_SWIZZLES(n, x, y, z, w)                                                      \
      EMU_SWIZZLES(n, r, g, b, a)                                                      \
    };                                                                                 \
  };
EMU_VEC_STORAGE(2, (x, y), (r, g))
EMU_VEC_STORAGE(3, (x, y, z), (r, g, b))
EMU_VEC_STORAGE(4, (x, y, z, w), (r, g, b, a))
#undef EMU_VEC_STORAGE
#undef EMU_UNPAREN
#undef EMU_SWIZZLES
#undef EMU_N1
#undef EMU_N2
#undef EMU_N3
#undef EMU_SW
#undef EMU_IF
#undef EMU_IF_22
#undef EMU_IF_23
#undef EMU_IF_32
#undef EMU_IF_33
#undef EMU_IF_42
#undef EMU_IF_43
}  // namespace emu

template <class T, int N> struct vec : emu::vec_storage<T, N> {
  using value_type = T;
  vec() = default;
  vec(const vec&) = default;
  // The union's assignment is deleted (the swizzles have their own), so copy by component.
  vec& operator=(const vec& o) {
    for (int i = 0; i < N; ++i) this->e[i] = o.e[i];
    return *this;
  }
  // Metal converts a scalar to a vector implicitly, replicating it.
  template <class S, std::enable_if_t<emu::is_scalar_v<S>, int> = 0> vec(const S& s) {
    for (int i = 0; i < N; ++i) this->e[i] = T(s);
  }
  // From a vector of another element type: explicit, as in Metal.
  template <class A, std::enable_if_t<emu::vec_traits<A>::width == N, int> = 0>
  explicit vec(const A& v) {
    int k = 0;
    emu::put_components(this->e, k, v);
  }
  // From scalars and vectors with N components in all: float4(v.xy, 0.0f, 1.0f).
  template <class A, class B, class... C, std::enable_if_t<emu::fills_v<N, A, B, C...>, int> = 0>
  vec(const A& a, const B& b, const C&... c) {
    int k = 0;
    emu::put_components(this->e, k, a);
    emu::put_components(this->e, k, b);
    (emu::put_components(this->e, k, c), ...);
  }
  T& operator[](int i) { return this->e[i]; }
  const T& operator[](int i) const { return this->e[i]; }
};

// Operators live in emu so that argument-dependent lookup finds them for swizzles (emu::)
// and vectors (whose base is in emu::) from any namespace.  The scalar operand is a
// non-deduced value_type, so `v * 2` converts the 2 as Metal does.
namespace emu {
#define EMU_VEC_OP(op)                                                                          \
  template <class A, class B, class V = vec_of<A>, std::enable_if_t<emu_traits::is_same_v<V, vec_of<B>>, int> = 0> \
  V operator op(const A& a, const B& b) {                                                       \
    V r = a;                                                                                    \
    const V s = b;                                                                              \
    for (int i = 0; i < width_v<V>; ++i) r[i] = r[i] op s[i];                                   \
    return r;                                                                                   \
  }                                                                                             \
  template <class A, class V = vec_of<A>> V operator op(const A& a, const typename V::value_type& s) { \
    V r = a;                                                                                    \
    for (int i = 0; i < width_v<V>; ++i) r[i] = r[i] op s;                                      \
    return r;                                                                                   \
  }                                                                                             \
  template <class A, class V = vec_of<A>> V operator op(const typename V::value_type& s, const A& a) { \
    V r = a;                                                                                    \
    for (int i = 0; i < width_v<V>; ++i) r[i] = s op r[i];                                      \
    return r;                                                                                   \
  }                                                                                             \
  template <class A, class B, class = vec_of<A>>                                                \
  auto operator op##=(A& a, const B& b)->decltype(a = a op b) { return a = a op b; }
EMU_VEC_OP(+) EMU_VEC_OP(-) EMU_VEC_OP(*) EMU_VEC_OP(/)
#undef EMU_VEC_OP
template <class A, class V = vec_of<A>> V operator-(const A& a) {
  V r = a;
  for (int i = 0; i < width_v<V>; ++i) r[i] = -r[i];
  return r;
}
}  // namespace emu

using float2 = vec<float, 2>; using float3 = vec<float, 3>; using float4 = vec<float, 4>;
using half2 = vec<half, 2>; using half3 = vec<half, 3>; using half4 = vec<half, 4>;
using bfloat2 = vec<bfloat, 2>; using bfloat3 = vec<bfloat, 3>; using bfloat4 = vec<bfloat, 4>;
using uint2 = vec<uint, 2>; using uint3 = vec<uint, 3>; using uint4 = vec<uint, 4>;
using int2 = vec<int, 2>; using int3 = vec<int, 3>; using int4 = vec<int, 4>;

// ---------------------------------------------------------------- metal::
namespace metal {
#define EMU_UNARY(name, expr)                                  \
  inline float name(float x) { return expr; }                  \
  inline half name(half x) { return half(name(float(x))); }    \
  inline bfloat name(bfloat x) { return bfloat(name(float(x))); }
EMU_UNARY(exp, std::exp(x)) EMU_UNARY(exp2, std::exp2(x)) EMU_UNARY(log, std::log(x))
EMU_UNARY(log2, std::log2(x)) EMU_UNARY(sqrt, std::sqrt(x)) EMU_UNARY(rsqrt, 1.0f / std::sqrt(x))
EMU_UNARY(tanh, std::tanh(x)) EMU_UNARY(floor, std::floor(x)) EMU_UNARY(ceil, std::ceil(x))
EMU_UNARY(sin, std::sin(x)) EMU_UNARY(cos, std::cos(x))
#undef EMU_UNARY
inline float abs(float x) { return std::fabs(x); }
inline half abs(half x) { return x < half(0) ? half(-x) : x; }
inline int abs(int x) { return x < 0 ? -x : x; }
template <class T> T max(T a, T b) { return a > b ? a : b; }  // Metal fmax NaN rules not modelled
template <class T> T min(T a, T b) { return a < b ? a : b; }
template <class T> T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
inline float fma(float a, float b, float c) { return std::fma(a, b, c); }
inline float pow(float a, float b) { return std::pow(a, b); }
template <class T> T select(T a, T b, bool c) { return c ? b : a; }
template <class T> bool isnan(T x) { return std::isnan(float(x)); }
template <class T> bool isinf(T x) { return std::isinf(float(x)); }
// Geometric functions.  Templates over any vector or swizzle (a template does not deduce
// vec<T, N> through a swizzle's conversion); dot accumulates in order, in T.
template <class A, class B, class V = emu::vec_of<A>,
          std::enable_if_t<emu_traits::is_same_v<V, emu::vec_of<B>>, int> = 0>
typename V::value_type dot(const A& a, const B& b) {
  const V x = a, y = b;
  typename V::value_type s = x[0] * y[0];
  for (int i = 1; i < emu::width_v<V>; ++i) s = s + x[i] * y[i];
  return s;
}
template <class A, class V = emu::vec_of<A>> typename V::value_type length(const A& a) {
  return metal::sqrt(metal::dot(a, a));
}
template <class A, class V = emu::vec_of<A>> V normalize(const A& a) {
  const V v = a;
  return v / metal::length(v);
}
// fast:: and precise:: are the same functions here (CPU libm accuracy).
namespace fast { using metal::exp; using metal::exp2; using metal::log; using metal::sqrt;
  using metal::rsqrt; using metal::tanh; using metal::max; using metal::min; using metal::abs;
  using metal::length; using metal::normalize; }
namespace precise { using metal::exp; using metal::exp2; using metal::log; using metal::sqrt;
  using metal::rsqrt; using metal::tanh; using metal::max; using metal::min; using metal::abs;
  using metal::length; using metal::normalize; }

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };
enum memory_order { memory_order_relaxed };
template <class T> struct atomic { T v; };
}  // namespace metal
using namespace metal;

// ---------------------------------------------------------------- runtime
namespace emu {

// Checked device/constant pointer: every element access is checked against
// the buffer it came from; the error names the buffer and the index.
template <class T> struct ptr {
  T* base; long long len; long long off; const char* name;
  template <class I> T& operator[](I i) const { return at((long long)i); }
  T& operator*() const { return at(0); }
  T* operator->() const { return &at(0); }
  T& at(long long i) const {
    long long k = off + i;
    if (k < 0 || k >= len) {
      char m[256];
      std::snprintf(m, sizeof m, "out-of-bounds access to buffer '%s' at index %lld (size %lld)", name, k, len);
      fail(m);
    }
    return base[k];
  }
  template <class I> ptr operator+(I i) const { return {base, len, off + (long long)i, name}; }
  template <class I> ptr operator-(I i) const { return {base, len, off - (long long)i, name}; }
  template <class I> ptr& operator+=(I i) { off += (long long)i; return *this; }
  ptr& operator++() { ++off; return *this; }
  // Escape hatch so `const device T* p = buf + k;` in a body still compiles;
  // accesses through such raw pointers are NOT checked.
  operator T*() const { return base + off; }
  operator ptr<const T>() const { return {base, len, off, name}; }
};

enum State { RUNNABLE, AT_BARRIER, AT_SIMD, FINISHED };
struct Fiber;
using Resolver = void (*)(Fiber** lanes, int n);
struct Fiber {
  ucontext_t ctx;
  char* stack = nullptr;
  State state = FINISHED;
  unsigned lin = 0;             // thread_index_in_threadgroup
  uint3_ pos{};                 // thread_position_in_grid
  // simd collective request: op name (for matching), input/output addresses
  const char* op = nullptr; const void* in = nullptr; void* out = nullptr;
  unsigned arg = 0; Resolver resolve = nullptr;
};

inline ucontext_t g_sched_ctx;
inline Fiber* g_cur = nullptr;

inline void yield_to_scheduler(State s) {
  g_cur->state = s;
  swapcontext(&g_cur->ctx, &g_sched_ctx);
  g_cur_pos = g_cur->pos;  // we were resumed; g_cur was set by the scheduler
}
}  // namespace emu

inline void threadgroup_barrier(metal::mem_flags = metal::mem_flags::mem_threadgroup) {
  emu::yield_to_scheduler(emu::AT_BARRIER);
}
inline void simdgroup_barrier(metal::mem_flags = metal::mem_flags::mem_none) {}

namespace emu {
// A simd collective parks the lane with its request; once every lane of the
// simdgroup is parked on the same op, the scheduler calls `resolve` once for
// the whole simdgroup, which writes each lane's result.
template <class T> T collective(const char* op, T x, unsigned arg, Resolver r) {
  T result{};
  g_cur->op = op; g_cur->in = &x; g_cur->out = &result; g_cur->arg = arg; g_cur->resolve = r;
  yield_to_scheduler(AT_SIMD);
  return result;
}
template <class T> const T& IN(Fiber* f) { return *static_cast<const T*>(f->in); }
template <class T> T& OUT(Fiber* f) { return *static_cast<T*>(f->out); }
template <class T> void r_sum(Fiber** l, int n) { T s = IN<T>(l[0]); for (int i = 1; i < n; ++i) s = s + IN<T>(l[i]); for (int i = 0; i < n; ++i) OUT<T>(l[i]) = s; }
template <class T> void r_max(Fiber** l, int n) { T s = IN<T>(l[0]); for (int i = 1; i < n; ++i) s = metal::max(s, IN<T>(l[i])); for (int i = 0; i < n; ++i) OUT<T>(l[i]) = s; }
template <class T> void r_min(Fiber** l, int n) { T s = IN<T>(l[0]); for (int i = 1; i < n; ++i) s = metal::min(s, IN<T>(l[i])); for (int i = 0; i < n; ++i) OUT<T>(l[i]) = s; }
template <class T> void r_prefix_excl(Fiber** l, int n) { T s = T(0); for (int i = 0; i < n; ++i) { OUT<T>(l[i]) = s; s = s + IN<T>(l[i]); } }
inline void check_lane(unsigned src, int n) {
  if (src >= (unsigned)n) fail("simd shuffle/broadcast reads a lane that does not exist");
}
template <class T> void r_shuffle(Fiber** l, int n) { for (int i = 0; i < n; ++i) { check_lane(l[i]->arg, n); OUT<T>(l[i]) = IN<T>(l[l[i]->arg]); } }
template <class T> void r_down(Fiber** l, int n) { for (int i = 0; i < n; ++i) { unsigned s = i + l[i]->arg; OUT<T>(l[i]) = IN<T>(l[s < (unsigned)n ? s : i]); } }
template <class T> void r_up(Fiber** l, int n) { for (int i = 0; i < n; ++i) { int s = i - (int)l[i]->arg; OUT<T>(l[i]) = IN<T>(l[s >= 0 ? s : i]); } }
template <class T> void r_xor(Fiber** l, int n) { for (int i = 0; i < n; ++i) { unsigned s = i ^ l[i]->arg; OUT<T>(l[i]) = IN<T>(l[s < (unsigned)n ? s : i]); } }
}  // namespace emu

template <class T> T simd_sum(T x) { return emu::collective("simd_sum", x, 0, emu::r_sum<T>); }
template <class T> T simd_max(T x) { return emu::collective("simd_max", x, 0, emu::r_max<T>); }
template <class T> T simd_min(T x) { return emu::collective("simd_min", x, 0, emu::r_min<T>); }
template <class T> T simd_prefix_exclusive_sum(T x) { return emu::collective("simd_prefix_exclusive_sum", x, 0, emu::r_prefix_excl<T>); }
template <class T> T simd_shuffle(T x, ushort lane) { return emu::collective("simd_shuffle", x, lane, emu::r_shuffle<T>); }
template <class T> T simd_broadcast(T x, ushort lane) { return emu::collective("simd_broadcast", x, lane, emu::r_shuffle<T>); }
template <class T> T simd_shuffle_down(T x, ushort d) { return emu::collective("simd_shuffle_down", x, d, emu::r_down<T>); }
template <class T> T simd_shuffle_up(T x, ushort d) { return emu::collective("simd_shuffle_up", x, d, emu::r_up<T>); }
template <class T> T simd_shuffle_xor(T x, ushort m) { return emu::collective("simd_shuffle_xor", x, m, emu::r_xor<T>); }

// Atomics: fibers never run concurrently, so a plain read-modify-write is atomic.
template <class T, class U> T atomic_fetch_add_explicit(metal::atomic<T>* a, U v, metal::memory_order) { T o = a->v; a->v = o + T(v); return o; }
template <class T, class U> void atomic_store_explicit(metal::atomic<T>* a, U v, metal::memory_order) { a->v = T(v); }
template <class T> T atomic_load_explicit(metal::atomic<T>* a, metal::memory_order) { return a->v; }

namespace emu {
// threadgroup variables are rewritten (by the Python generator) to
// `static thread_local` + tg_poison(&var, sizeof var): the first thread of each
// threadgroup that reaches the declaration fills it with 0xFF bytes (NaN for
// every float type, -1 / UINT_MAX for integers), like uninitialised GPU memory.
// The threadgroup variables' sizes add up as a kernel declares them; past Apple's limit
// (every Apple GPU: 32 KiB) the kernel would not compile into a pipeline there.
constexpr size_t MAX_THREADGROUP_MEMORY = 32 * 1024;
constexpr unsigned MAX_THREADS_PER_THREADGROUP = 1024;
inline unsigned g_tg_generation = 0;
inline size_t g_tg_bytes = 0;
struct Poisoned { void* p; unsigned gen; };
inline std::vector<Poisoned> g_poisoned;
inline void tg_poison(void* p, size_t n) {
  for (auto& e : g_poisoned)
    if (e.p == p) { if (e.gen != g_tg_generation) { std::memset(p, 0xFF, n); e.gen = g_tg_generation; } return; }
  g_tg_bytes += n;
  if (g_tg_bytes > MAX_THREADGROUP_MEMORY) {
    char msg[160];
    std::snprintf(msg, sizeof msg, "threadgroup memory of %zu bytes: Apple GPUs allow at most %zu",
                  g_tg_bytes, MAX_THREADGROUP_MEMORY);
    fail(msg);
  }
  std::memset(p, 0xFF, n);
  g_poisoned.push_back({p, g_tg_generation});
}

// Per-thread attribute values handed to the generated launcher.
struct ThreadAttrs {
  uint3 thread_position_in_grid, thread_position_in_threadgroup, threadgroup_position_in_grid,
      threads_per_threadgroup, dispatch_threads_per_threadgroup, threadgroups_per_grid,
      threads_per_grid, grid_size, grid_origin;
  uint thread_index_in_threadgroup, thread_index_in_simdgroup, simdgroup_index_in_threadgroup,
      simdgroups_per_threadgroup, dispatch_simdgroups_per_threadgroup, threads_per_simdgroup,
      thread_execution_width, thread_index_in_quadgroup, quadgroup_index_in_threadgroup,
      quadgroups_per_threadgroup, dispatch_quadgroups_per_threadgroup;
};
constexpr unsigned SIMD = 32;
constexpr size_t STACK = 256 * 1024;
using LaunchFn = void (*)(const ThreadAttrs&);
inline LaunchFn g_launch;
inline std::vector<ThreadAttrs> g_attrs;

inline void trampoline(int i) {
  g_cur_pos = {g_attrs[i].thread_position_in_grid.x, g_attrs[i].thread_position_in_grid.y,
               g_attrs[i].thread_position_in_grid.z};
  g_launch(g_attrs[i]);
  g_cur->state = FINISHED;
  swapcontext(&g_cur->ctx, &g_sched_ctx);
}

enum Order { FORWARD, REVERSE, RANDOM };

// Run every thread of one threadgroup to completion, interleaving at barriers
// and simd collectives in the requested order.
inline void run_threadgroup(std::vector<Fiber>& fibers, int n, Order order, std::mt19937& rng) {
  std::vector<int> idx(n);
  for (int i = 0; i < n; ++i) {
    Fiber& f = fibers[i];
    if (!f.stack) f.stack = static_cast<char*>(std::malloc(STACK));
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack; f.ctx.uc_stack.ss_size = STACK; f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, (void (*)())trampoline, 1, i);
    f.state = RUNNABLE; f.pos = {g_attrs[i].thread_position_in_grid.x, g_attrs[i].thread_position_in_grid.y,
                                 g_attrs[i].thread_position_in_grid.z};
    idx[i] = i;
  }
  if (order == REVERSE) std::reverse(idx.begin(), idx.end());
  for (;;) {
    if (order == RANDOM) std::shuffle(idx.begin(), idx.end(), rng);
    for (int i : idx)
      while (fibers[i].state == RUNNABLE) {
        g_cur = &fibers[i]; g_cur_pos = fibers[i].pos;
        swapcontext(&g_sched_ctx, &fibers[i].ctx);
      }
    // Everyone is parked or finished.  First resolve complete simd collectives.
    bool progress = false, all_done = true;
    for (int s0 = 0; s0 < n; s0 += SIMD) {
      int m = std::min<int>(SIMD, n - s0);
      Fiber* lanes[SIMD];
      int at_simd = 0;
      for (int j = 0; j < m; ++j) { lanes[j] = &fibers[s0 + j]; at_simd += lanes[j]->state == AT_SIMD; }
      for (int j = 0; j < m; ++j) all_done &= lanes[j]->state == FINISHED;
      if (at_simd == 0) continue;
      g_cur_pos = lanes[0]->pos;
      for (int j = 0; j < m; ++j) {
        if (lanes[j]->state != AT_SIMD || std::strcmp(lanes[j]->op, lanes[0]->op) != 0) {
          for (int k = 0; k < m; ++k) if (lanes[k]->state == AT_SIMD) { g_cur_pos = lanes[k]->pos; break; }
          char msg[256];
          std::snprintf(msg, sizeof msg, "lane-divergent simd collective: %d of %d lanes of simdgroup %d called %s",
                        at_simd, m, s0 / (int)SIMD, lanes[0]->state == AT_SIMD ? lanes[0]->op : "a simd op");
          fail(msg);
        }
      }
      lanes[0]->resolve(lanes, m);
      for (int j = 0; j < m; ++j) lanes[j]->state = RUNNABLE;
      progress = true;
    }
    if (progress) continue;
    if (all_done) return;
    // Then a barrier: legal only if every thread of the group is waiting at it.
    int finished = 0, waiting = -1;
    for (int i = 0; i < n; ++i) {
      if (fibers[i].state == FINISHED) ++finished; else waiting = i;
    }
    if (finished) {
      g_cur_pos = fibers[waiting].pos;
      char msg[256];
      std::snprintf(msg, sizeof msg, "threadgroup_barrier deadlock: %d of %d threads returned while others wait at a barrier",
                    finished, n);
      fail(msg);
    }
    for (int i = 0; i < n; ++i) fibers[i].state = RUNNABLE;
  }
}

// Run the grid: threadgroups in the requested order, threads as fibers.
inline void run_grid(LaunchFn launch, const unsigned grid[3], const unsigned tg_in[3], Order order, unsigned seed) {
  g_launch = launch;
  unsigned tg[3], ngroups[3];
  for (int d = 0; d < 3; ++d) {
    tg[d] = std::min(tg_in[d], grid[d]);  // MLX clamps the group to the grid
    if (tg[d] == 0) fail("empty grid or threadgroup");
    ngroups[d] = (grid[d] + tg[d] - 1) / tg[d];
  }
  // Every Apple GPU runs at most 1024 threads in a threadgroup (fewer for a kernel that
  // uses many registers): a larger dispatch fails there.
  if (tg[0] * tg[1] * tg[2] > MAX_THREADS_PER_THREADGROUP) {
    char msg[160];
    std::snprintf(msg, sizeof msg, "threadgroup of %u x %u x %u threads: Apple GPUs allow at most %u",
                  tg[0], tg[1], tg[2], MAX_THREADS_PER_THREADGROUP);
    fail(msg);
  }
  std::vector<uint3> groups;
  for (unsigned z = 0; z < ngroups[2]; ++z)
    for (unsigned y = 0; y < ngroups[1]; ++y)
      for (unsigned x = 0; x < ngroups[0]; ++x) groups.push_back(uint3(x, y, z));
  std::mt19937 rng(seed);
  if (order == REVERSE) std::reverse(groups.begin(), groups.end());
  if (order == RANDOM) std::shuffle(groups.begin(), groups.end(), rng);
  std::vector<Fiber> fibers(tg[0] * tg[1] * tg[2]);
  g_in_kernel = true;
  for (const uint3& g : groups) {
    ++g_tg_generation;
    // Non-uniform dispatch: edge groups are smaller (threads_per_threadgroup).
    uint3 sz(std::min(tg[0], grid[0] - g.x * tg[0]), std::min(tg[1], grid[1] - g.y * tg[1]),
             std::min(tg[2], grid[2] - g.z * tg[2]));
    unsigned n = sz.x * sz.y * sz.z;
    g_attrs.assign(n, ThreadAttrs{});
    for (unsigned z = 0; z < sz.z; ++z)
      for (unsigned y = 0; y < sz.y; ++y)
        for (unsigned x = 0; x < sz.x; ++x) {
          unsigned lin = x + sz.x * (y + sz.y * z);
          ThreadAttrs& a = g_attrs[lin];
          a.thread_position_in_threadgroup = uint3(x, y, z);
          a.threadgroup_position_in_grid = g;
          a.thread_position_in_grid = uint3(g.x * tg[0] + x, g.y * tg[1] + y, g.z * tg[2] + z);
          a.threads_per_threadgroup = sz;
          a.dispatch_threads_per_threadgroup = uint3(tg[0], tg[1], tg[2]);
          a.threadgroups_per_grid = uint3(ngroups[0], ngroups[1], ngroups[2]);
          a.threads_per_grid = a.grid_size = uint3(grid[0], grid[1], grid[2]);
          a.grid_origin = uint3(0u);
          a.thread_index_in_threadgroup = lin;
          a.thread_index_in_simdgroup = lin % SIMD;
          a.simdgroup_index_in_threadgroup = lin / SIMD;
          a.simdgroups_per_threadgroup = (n + SIMD - 1) / SIMD;
          a.dispatch_simdgroups_per_threadgroup = (tg[0] * tg[1] * tg[2] + SIMD - 1) / SIMD;
          a.threads_per_simdgroup = a.thread_execution_width = SIMD;
          a.thread_index_in_quadgroup = lin % 4;
          a.quadgroup_index_in_threadgroup = lin / 4;
          a.quadgroups_per_threadgroup = (n + 3) / 4;
          a.dispatch_quadgroups_per_threadgroup = (tg[0] * tg[1] * tg[2] + 3) / 4;
        }
    run_threadgroup(fibers, n, order, rng);
  }
  g_in_kernel = false;
}
}  // namespace emu

// Metal address-space keywords carry no meaning on the CPU.  Defined last so
// that the standard headers above are not affected.  The address-space check
// (EMU_ADDRESS_SPACES, clang only) makes them distinct pointer types, as Apple's
// compiler has them: no pointer converts from one to another.
#ifdef EMU_ADDRESS_SPACES
#define device __attribute__((address_space(1)))
#define constant __attribute__((address_space(2)))
#define threadgroup __attribute__((address_space(3)))
#else
#define device
#define constant
#define threadgroup
#endif
#define thread
#define METAL_FUNC inline
