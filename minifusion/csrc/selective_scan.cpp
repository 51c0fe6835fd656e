// The fused selective scan for CPUs (chapter 09, "Making the scan fast").
//
//   h_t[d, n] = exp(Δ_t[d] · A[d, n]) · h_{t−1}[d, n] + Δ_t[d] · B_t[n] · u_t[d]
//   y_t[d]    = (Σ_n C_t[n] · h_t[d, n] + D[d] · u_t[d]) · SiLU(z_t[d])
//   Δ_t[d]    = softplus(delta_t[d] + delta_bias[d])              (each part optional)
//
// Why a kernel: the PyTorch scans launch several tensor operations per position, and every one
// reads and writes the whole (batch, channels, N) state through memory. Here one task owns a
// block of W channels of one sequence and walks the time loop with that block's state
// (N × W floats, a few KiB) in L1 cache and registers; each step reads only that position's
// inputs. The W channels of a block sit side by side in memory (the layout is (batch, L, D)),
// so the inner loops over them are plain vector code.
//
// Backward: the forward pass saves the state entering every segment of kSegment positions
// (as mamba-ssm's kernel saves chunk states). The backward pass walks the segments from the
// last to the first: it recomputes one segment's states from its saved entry state into a
// small buffer (taking C's gradient on the way, while each state is at hand), then runs the
// adjoint recurrence λ_{t−1} = a_t · λ_t (+ C_t · ∂y_t) backwards through it. Memory: the saved
// entry states (L / kSegment of them) plus one segment per thread, kept between calls.
//
// Determinism: gradients of B, C (summed over channels) and of A, D, delta_bias (summed over the
// batch) are first written per block / per sequence, then added in a fixed order, so the
// result does not depend on how many threads ran.

// Only the headers the kernel uses: <torch/extension.h> would bring all of libtorch's C++ API
// and take twice as long to compile (about 27 s against 12 s here).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t kSegment = 32;  // positions between saved states (backward recomputes these)

// Channels per task: 64 floats are eight AVX2 (four AVX-512) registers. Wide blocks matter for
// the backward pass: its gradients of B and C are sums over channels, one horizontal sum per
// block, state slot and position, and wider blocks need fewer of them. With AVX-512, layers of
// at least kWideFrom channels take blocks of 128 (measured about 12 % faster at 512 channels on
// a Zen 4 core); narrower layers keep 64, so that a batch of one still gives every core a task.
// The width depends on the channels only — never on the thread count — so the fixed-order sums
// below stay the same for any number of threads.
template <typename T> struct Width;
template <> struct Width<float> {
  static constexpr int value = 64;
#ifdef __AVX512F__
  static constexpr int wide = 128;
#else
  static constexpr int wide = 64;
#endif
};
template <> struct Width<double> { static constexpr int value = 8, wide = 8; };
constexpr int64_t kWideFrom = 256;

// Calls fn with the block width for `channels` as a compile-time constant.
template <typename T, typename Fn> void with_width(int64_t channels, Fn&& fn) {
  if (Width<T>::wide != Width<T>::value && channels >= kWideFrom)
    fn(std::integral_constant<int, Width<T>::wide>{});
  else
    fn(std::integral_constant<int, Width<T>::value>{});
}

// p · 2^k for a whole number k in [−126, 127], by writing k into a float's exponent bits (the
// last step of exp_fast and exp2_fast).
inline float times_power_of_two(float p, float k) {
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// exp for float that the compiler can vectorise: e^x = 2^k · e^r with k = round(x / ln 2) and
// |r| ≤ ln(2)/2, e^r from a degree-7 polynomial (Cephes' expf coefficients), 2^k written into
// the exponent bits. About 1 ulp; inputs are clamped to the range where 2^k stays normal.
// k is rounded by adding and subtracting 1.5 · 2^23 (std::floor would stop gcc vectorising).
inline float exp_fast(float x) {
  x = std::min(std::max(x, -87.33f), 88.37f);
  const float k = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = x - k * 0.693359375f + k * 2.12194440e-4f;  // ln 2 in two parts
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return times_power_of_two(p, k);
}
inline double exp_fast(double x) { return std::exp(x); }

// 2^y for float, vectorisable, for the decays exp(Δ A) = 2^(Δ · A log2 e) (the blocks keep A
// times log2 e): the same reduction as exp_fast, y = k + f with k = round(y) and f in [−½, ½],
// but 2^f needs no second step for ln 2 and is one degree-6 polynomial, 6 multiply-adds
// (coefficients fitted to 2^f's relative error on [−½, ½]; about 2 ulp). The decays are most of
// the scan's arithmetic: the forward pass ran about 8 % faster with it than with exp_fast.
inline float exp2_fast(float y) {
  y = std::min(std::max(y, -126.0f), 127.0f);
  const float k = (y + 12582912.0f) - 12582912.0f;
  const float f = y - k;
  float p = 1.5345812e-4f;
  p = p * f + 1.3399931e-3f;
  p = p * f + 9.6184891e-3f;
  p = p * f + 5.5503286e-2f;
  p = p * f + 2.4022646e-1f;
  p = p * f + 6.9314718e-1f;
  p = p * f + 1.0f;
  return times_power_of_two(p, k);
}
inline double exp2_fast(double y) { return std::exp2(y); }

// log for positive normal floats, vectorisable: x = m · 2^e with m in [√½, √2), log m from
// Cephes' logf polynomial in m − 1, e · ln 2 added in two parts.
inline float log_fast(float x) {
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  float e = static_cast<float>(((bits >> 23) & 0xff) - 127);
  const int32_t mantissa_bits = (bits & 0x007fffff) | 0x3f800000;  // m in [1, 2)
  float m;
  std::memcpy(&m, &mantissa_bits, sizeof(m));
  const bool high = m > 1.41421356f;
  m = high ? 0.5f * m : m;
  e = high ? e + 1.0f : e;
  const float f = m - 1.0f, f2 = f * f;
  float y = 7.0376836292e-2f;
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * f2 - 2.12194440e-4f * e - 0.5f * f2;
  return f + y + 0.693359375f * e;
}
inline double log_fast(double x) { return std::log(x); }

// log(1 + t) for t in [0, 1] without losing small t: log(u) · t / (u − 1) with u = 1 + t
// (the quotient cancels the rounding of u; Goldberg's trick).
// (The division always runs, on 1 where u = 1, so the compiler can vectorise it.)
template <typename T> inline T log1p_small(T t) {
  const T u = T(1) + t, rounded = u - T(1);
  const T ratio = log_fast(u) * t / (rounded == T(0) ? T(1) : rounded);
  return rounded == T(0) ? t : ratio;
}

// torch.nn.functional.softplus with its default threshold (x > 20 passes through), written as
// max(x, 0) + log(1 + e^−|x|) so that the exponential never overflows.
// (softplus_from takes e = exp(−|x|), so that a caller needing the sigmoid too computes it once.)
template <typename T> inline T softplus_from(T x, T e) {
  return x > T(20) ? x : (x > T(0) ? x : T(0)) + log1p_small(e);
}
template <typename T> inline T softplus_of(T x) {
  return softplus_from(x, exp_fast(x > T(0) ? -x : x));
}
template <typename T> inline T sigmoid(T x) { return T(1) / (T(1) + exp_fast(-x)); }

// Everything one scan reads, as raw pointers into contiguous tensors.
template <typename T> struct ScanArgs {
  int64_t batch, length, channels, state;    // B, L, D, N
  const T* u;                                 // (B, L, D)
  const T* delta;                             // (B, L, D), before bias and softplus
  const T* A_t;                               // (N, D): A transposed, channels contiguous
  const T* B;                                 // (B, L, N)
  const T* C;                                 // (B, L, N)
  const T* D;                                 // (D) or nullptr
  const T* z;                                 // (B, L, D) or nullptr
  const T* delta_bias;                        // (D) or nullptr
  bool softplus;
  int64_t segments() const { return (length + kSegment - 1) / kSegment; }
};

// One block of W channels (the last block may be narrower: its missing lanes read zeros, which
// keeps their state at zero, and are never written back).
template <typename T, int W> struct Block {
  const ScanArgs<T>& a;
  int64_t b, d0, width;
  T bias[W], skip[W];        // delta_bias and D of the block's channels (zeros if absent)
  std::vector<T> A_block;    // (N, W): A of the block's channels, slot by slot
  std::vector<T> A2_block;   // (N, W): the same times log2 e, for exp2_fast

  Block(const ScanArgs<T>& args, int64_t b_, int64_t d0_, int64_t width_)
      : a(args), b(b_), d0(d0_), width(width_), A_block(args.state * W, T(0)),
        A2_block(args.state * W, T(0)) {
    for (int w = 0; w < W; ++w) {
      const bool real = w < width;
      bias[w] = real && a.delta_bias != nullptr ? a.delta_bias[d0 + w] : T(0);
      skip[w] = real && a.D != nullptr ? a.D[d0 + w] : T(0);
    }
    for (int64_t n = 0; n < a.state; ++n)
      for (int w = 0; w < width; ++w) {
        A_block[n * W + w] = a.A_t[n * a.channels + d0 + w];
        A2_block[n * W + w] = A_block[n * W + w] * T(1.44269504088896340736);
      }
  }

  // Load W values of a (B, L, D) tensor at position t (zeros past `width`). Full blocks take
  // a plain copy: the compiler turns the general form into masked loads, which made the forward
  // pass about a quarter slower (L = 2048, batch 2, 512 channels), though only a last, partial
  // block needs them.
  void load(const T* x, int64_t t, T* out) const {
    const T* row = x + (b * a.length + t) * a.channels + d0;
    if (width == W) {
      for (int w = 0; w < W; ++w) out[w] = row[w];
    } else {
      for (int w = 0; w < W; ++w) out[w] = w < width ? row[w] : T(0);
    }
  }
  void store(T* x, int64_t t, const T* in) const {
    T* row = x + (b * a.length + t) * a.channels + d0;
    for (int w = 0; w < width; ++w) row[w] = in[w];
  }
  // Δ_t for the W channels at position t and, with kSlope, dΔ/d(delta) there: softplus' is the
  // sigmoid, which comes from the softplus' own exponential e = exp(−|x|) (σ(x) = 1 / (1 + e)
  // for x > 0, e / (1 + e) otherwise), so the backward pass needs no second one.
  template <bool kSlope>
  void step_sizes(int64_t t, T* __restrict dt, T* __restrict slope) const {
    T raw[W];
    load(a.delta, t, raw);
    if (a.softplus) {
#pragma omp simd
      for (int w = 0; w < W; ++w) {
        const T x = raw[w] + bias[w];
        const T e = exp_fast(x > T(0) ? -x : x);
        dt[w] = softplus_from(x, e);
        if constexpr (kSlope) slope[w] = (x > T(0) ? T(1) : e) / (T(1) + e);
      }
    } else {
#pragma omp simd
      for (int w = 0; w < W; ++w) {
        dt[w] = raw[w] + bias[w];
        if constexpr (kSlope) slope[w] = T(1);
      }
    }
  }
  // One step of the recurrence: h ← exp(Δ A) h_prev + Δ u B_t; returns Σ_n C_t h in y. The
  // backward pass's recompute (kBackward) also keeps the decay factors exp(Δ A) in `decay` for
  // the adjoint walk, and takes C's gradient here, Σ_w gy h_t (per state slot), while h_t is
  // at hand. h_prev and h may be the same buffer (the forward pass updates its state in place)
  // or two (the backward pass keeps every state of a segment, and so copies nothing).
  template <bool kBackward>
  void advance(int64_t t, const T* dt, const T* u, const T* h_prev, T* h, T* __restrict y,
               T* __restrict decay, const T* __restrict gy, T* __restrict dC) const {
    const T* B_t = a.B + (b * a.length + t) * a.state;
    const T* C_t = a.C + (b * a.length + t) * a.state;
    T dtu[W], acc[W];
    for (int w = 0; w < W; ++w) { dtu[w] = dt[w] * u[w]; acc[w] = T(0); }
    for (int64_t n = 0; n < a.state; ++n) {
      const T Bn = B_t[n], Cn = C_t[n];
      const T* hp = h_prev + n * W;
      T* hn = h + n * W;
      const T* An = A2_block.data() + n * W;
      T dC_n = T(0);
#pragma omp simd reduction(+ : dC_n)
      for (int w = 0; w < W; ++w) {
        const T decay_w = exp2_fast(dt[w] * An[w]);
        const T h_w = decay_w * hp[w] + dtu[w] * Bn;
        hn[w] = h_w;
        acc[w] += Cn * h_w;
        if constexpr (kBackward) {
          decay[n * W + w] = decay_w;
          dC_n += gy[w] * h_w;
        }
      }
      if constexpr (kBackward) dC[n] = dC_n;
    }
    for (int w = 0; w < W; ++w) y[w] = acc[w];
  }
  // (y + D u) · SiLU(z): the block's output at one position.
  void finish(int64_t t, const T* __restrict u, T* __restrict y) const {
#pragma omp simd
    for (int w = 0; w < W; ++w) y[w] += skip[w] * u[w];
    if (a.z != nullptr) {
      T z[W];
      load(a.z, t, z);
#pragma omp simd
      for (int w = 0; w < W; ++w) y[w] *= z[w] * sigmoid(z[w]);
    }
  }
};

template <typename T, int W>
void forward_block(const ScanArgs<T>& a, int64_t b, int64_t d0, int64_t width, T* out,
                   T* last_state /* (B, N, D) */, T* saved /* (B, segments, N, D) */) {
  const Block<T, W> block(a, b, d0, width);
  const int64_t N = a.state;
  std::vector<T> h(N * W, T(0));
  T u[W], dt[W], y[W];
  for (int64_t t = 0; t < a.length; ++t) {
    if (t % kSegment == 0) {  // the state entering this segment, for the backward pass
      T* dst = saved + ((b * a.segments() + t / kSegment) * N) * a.channels + d0;
      for (int64_t n = 0; n < N; ++n)
        for (int w = 0; w < width; ++w) dst[n * a.channels + w] = h[n * W + w];
    }
    block.load(a.u, t, u);
    block.template step_sizes<false>(t, dt, nullptr);
    block.template advance<false>(t, dt, u, h.data(), h.data(), y, nullptr, nullptr, nullptr);
    block.finish(t, u, y);
    block.store(out, t, y);
  }
  T* dst = last_state + b * N * a.channels + d0;
  for (int64_t n = 0; n < N; ++n)
    for (int w = 0; w < width; ++w) dst[n * a.channels + w] = h[n * W + w];
}

// Gradients one block writes: its own channels of du, ddelta, dz directly; its partial sums of
// dB and dC (over its channels) and of dA, dD, d(delta_bias) (over its one sequence) into
// per-block / per-sequence slots that are added up afterwards.
template <typename T> struct Grads {
  const T* grad_out;   // (B, L, D)
  const T* grad_last;  // (B, N, D) or nullptr
  T* du; T* ddelta; T* dz;                    // (B, L, D); dz may be nullptr
  T* dB_part; T* dC_part;                     // (blocks, B, L, N)
  T* dA_part;                                 // (B, N, D)
  T* dD_part; T* dbias_part;                  // (B, D)
};

// A buffer of at least `count` values owned by the calling thread, reused by its later calls.
template <typename T> T* thread_scratch(int64_t count) {
  thread_local std::vector<T> buffer;
  if (static_cast<int64_t>(buffer.size()) < count) buffer.resize(count);
  return buffer.data();
}

template <typename T, int W>
void backward_block(const ScanArgs<T>& a, const Grads<T>& g, const T* saved, int64_t b,
                    int64_t block_index, int64_t d0, int64_t width) {
  const Block<T, W> block(a, b, d0, width);
  const int64_t N = a.state, L = a.length, D = a.channels;
  // Scratch space kept by each thread across calls (0.6 MiB at N = 16, 128 channels): buffers
  // this large, allocated afresh, can come from the operating system as new pages on every
  // call (glibc returns freed memory above its trim threshold), and in a loop of backward passes
  // their page faults took 31.6 ms per pass against 22.7 ms with this buffer (B 2, L 2048,
  // 512 channels, N 16).
  const int64_t state_size = N * W, row_size = kSegment * W;
  T* const scratch = thread_scratch<T>(2 * state_size + (2 * kSegment + 1) * state_size +
                                       4 * row_size);
  T* const lam = scratch;
  T* const dA = lam + state_size;
  std::fill(lam, lam + 2 * state_size, T(0));
  if (g.grad_last != nullptr)
    for (int64_t n = 0; n < N; ++n)
      for (int w = 0; w < width; ++w) lam[n * W + w] = g.grad_last[(b * N + n) * D + d0 + w];
  // One segment's recomputed states (entry state first), decays, Δ, dΔ/d(delta), u and the
  // gradient reaching pre = y + D u.
  T* const hs = dA + state_size;
  T* const decays = hs + (kSegment + 1) * state_size;
  T* const dts = decays + kSegment * state_size;
  T* const slopes = dts + row_size;
  T* const us = slopes + row_size;
  T* const gys = us + row_size;
  T dD[W] = {}, dbias[W] = {};
  T* dB_part = g.dB_part + (block_index * a.batch + b) * L * N;
  T* dC_part = g.dC_part + (block_index * a.batch + b) * L * N;

  for (int64_t segment = a.segments() - 1; segment >= 0; --segment) {
    const int64_t t0 = segment * kSegment, t1 = std::min(L, t0 + kSegment);
    const T* entry = saved + ((b * a.segments() + segment) * N) * D + d0;
    for (int64_t n = 0; n < N; ++n)
      for (int w = 0; w < W; ++w) hs[n * W + w] = w < width ? entry[n * D + w] : T(0);
    for (int64_t t = t0; t < t1; ++t) {  // recompute the segment's states
      const int64_t i = t - t0;
      const T* u = &us[i * W];
      T* gy = &gys[i * W];
      T grad_out[W], y[W];
      block.load(a.u, t, &us[i * W]);
      block.template step_sizes<true>(t, &dts[i * W], &slopes[i * W]);
      block.load(g.grad_out, t, grad_out);  // ∂loss/∂out_t
      T z[W], sig[W];
      if (a.z != nullptr) {  // out = pre · SiLU(z): the part of the gradient that reaches pre
        block.load(a.z, t, z);
#pragma omp simd
        for (int w = 0; w < W; ++w) {
          sig[w] = sigmoid(z[w]);
          gy[w] = grad_out[w] * z[w] * sig[w];
        }
      } else {
        for (int w = 0; w < W; ++w) gy[w] = grad_out[w];
      }
      block.template advance<true>(t, &dts[i * W], u, &hs[i * N * W], &hs[(i + 1) * N * W], y,
                                   &decays[i * N * W], gy, &dC_part[t * N]);
      if (a.z != nullptr) {  // and the part that reaches z
        T dz[W];
#pragma omp simd
        for (int w = 0; w < W; ++w) {
          const T pre = y[w] + block.skip[w] * u[w];
          dz[w] = grad_out[w] * pre * sig[w] * (T(1) + z[w] * (T(1) - sig[w]));
        }
        block.store(g.dz, t, dz);
      }
    }
    for (int64_t t = t1 - 1; t >= t0; --t) {  // and walk back through them
      const int64_t i = t - t0;
      const T *u = &us[i * W], *dt = &dts[i * W], *slope = &slopes[i * W], *gy = &gys[i * W];
      const T *h_prev = &hs[i * N * W], *decay = &decays[i * N * W];
      T du[W], ddt[W], s[W], dtu[W];
#pragma omp simd
      for (int w = 0; w < W; ++w) {
        dD[w] += gy[w] * u[w];
        du[w] = gy[w] * block.skip[w];
        ddt[w] = T(0);
        s[w] = T(0);
        dtu[w] = dt[w] * u[w];
      }
      const T* B_t = a.B + (b * L + t) * N;
      const T* C_t = a.C + (b * L + t) * N;
      for (int64_t n = 0; n < N; ++n) {
        const T Bn = B_t[n], Cn = C_t[n];
        T* __restrict lam_n = &lam[n * W];
        const T* __restrict hp_n = h_prev + n * W;
        const T* __restrict a_n = decay + n * W;
        const T* __restrict A_n = &block.A_block[n * W];
        T* __restrict dA_n = &dA[n * W];
        T dB = T(0);
#pragma omp simd reduction(+ : dB)
        for (int w = 0; w < W; ++w) {
          const T lam_w = lam_n[w] + Cn * gy[w];        // λ_t = ∂loss/∂h_t
          const T a_w = a_n[w];
          dB += lam_w * dtu[w];
          s[w] += lam_w * Bn;                           // ∂loss/∂(Δ_t u_t)
          const T dlog = lam_w * a_w * hp_n[w];         // ∂loss/∂(Δ_t A)
          dA_n[w] += dlog * dt[w];
          ddt[w] += dlog * A_n[w];
          lam_n[w] = lam_w * a_w;                       // handed back to t − 1
        }
        dB_part[t * N + n] = dB;
      }
#pragma omp simd
      for (int w = 0; w < W; ++w) {
        du[w] += s[w] * dt[w];
        ddt[w] += s[w] * u[w];
      }
#pragma omp simd
      for (int w = 0; w < W; ++w) ddt[w] *= slope[w];  // through the softplus
      for (int w = 0; w < W; ++w) dbias[w] += ddt[w];
      block.store(g.du, t, du);
      block.store(g.ddelta, t, ddt);
    }
  }
  for (int64_t n = 0; n < N; ++n)
    for (int w = 0; w < width; ++w) g.dA_part[(b * N + n) * D + d0 + w] = dA[n * W + w];
  for (int w = 0; w < width; ++w) {
    g.dD_part[b * D + d0 + w] = dD[w];
    g.dbias_part[b * D + d0 + w] = dbias[w];
  }
}

at::Tensor optional_contiguous(const c10::optional<at::Tensor>& x) {
  return x.has_value() && x->defined() ? x->contiguous() : at::Tensor();
}
template <typename T> const T* pointer_or_null(const at::Tensor& x) {
  return x.defined() ? x.data_ptr<T>() : nullptr;
}

template <typename T>
ScanArgs<T> make_args(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A_t,
                      const at::Tensor& B, const at::Tensor& C, const at::Tensor& D,
                      const at::Tensor& z, const at::Tensor& delta_bias, bool softplus) {
  return ScanArgs<T>{u.size(0), u.size(1), u.size(2), A_t.size(0),
                     u.data_ptr<T>(), delta.data_ptr<T>(), A_t.data_ptr<T>(), B.data_ptr<T>(),
                     C.data_ptr<T>(), pointer_or_null<T>(D), pointer_or_null<T>(z),
                     pointer_or_null<T>(delta_bias), softplus};
}

}  // namespace

// Inputs (all the same floating dtype, float32 or float64): u, delta, z (B, L, D); A (D, N);
// B, C (B, L, N); D, delta_bias (D). Returns out (B, L, D), the last state (B, N, D) and the
// saved segment entry states (B, segments, N, D).
std::vector<at::Tensor> scan_forward(at::Tensor u, at::Tensor delta, at::Tensor A,
                                        at::Tensor B, at::Tensor C,
                                        c10::optional<at::Tensor> D_opt,
                                        c10::optional<at::Tensor> z_opt,
                                        c10::optional<at::Tensor> bias_opt, bool softplus) {
  u = u.contiguous(); delta = delta.contiguous(); B = B.contiguous(); C = C.contiguous();
  auto A_t = A.t().contiguous();
  auto D = optional_contiguous(D_opt), z = optional_contiguous(z_opt);
  auto bias = optional_contiguous(bias_opt);
  const int64_t batch = u.size(0), length = u.size(1), channels = u.size(2), N = A.size(1);
  const int64_t segments = (length + kSegment - 1) / kSegment;
  auto out = at::empty_like(u);
  auto last = at::zeros({batch, N, channels}, u.options());
  auto saved = at::empty({batch, segments, N, channels}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_forward", [&] {
    with_width<scalar_t>(channels, [&](auto width_constant) {
      constexpr int W = decltype(width_constant)::value;
      const auto args = make_args<scalar_t>(u, delta, A_t, B, C, D, z, bias, softplus);
      const int64_t blocks = (channels + W - 1) / W;
      scalar_t *out_p = out.data_ptr<scalar_t>(), *last_p = last.data_ptr<scalar_t>();
      scalar_t* saved_p = saved.data_ptr<scalar_t>();
      at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
          const int64_t b = task / blocks, d0 = (task % blocks) * W;
          forward_block<scalar_t, W>(args, b, d0, std::min<int64_t>(W, channels - d0), out_p,
                                     last_p, saved_p);
        }
      });
    });
  });
  return {out, last, saved};
}

// Returns du, ddelta, dA, dB, dC, dD, dz, d(delta_bias) (undefined where the input was absent).
std::vector<at::Tensor> scan_backward(at::Tensor u, at::Tensor delta, at::Tensor A,
                                         at::Tensor B, at::Tensor C,
                                         c10::optional<at::Tensor> D_opt,
                                         c10::optional<at::Tensor> z_opt,
                                         c10::optional<at::Tensor> bias_opt, bool softplus,
                                         at::Tensor saved, at::Tensor grad_out,
                                         c10::optional<at::Tensor> grad_last_opt) {
  u = u.contiguous(); delta = delta.contiguous(); B = B.contiguous(); C = C.contiguous();
  grad_out = grad_out.contiguous(); saved = saved.contiguous();
  auto A_t = A.t().contiguous();
  auto D = optional_contiguous(D_opt), z = optional_contiguous(z_opt);
  auto bias = optional_contiguous(bias_opt), grad_last = optional_contiguous(grad_last_opt);
  const int64_t batch = u.size(0), length = u.size(1), channels = u.size(2), N = A.size(1);
  auto du = at::empty_like(u), ddelta = at::empty_like(u);
  auto dz = z.defined() ? at::empty_like(u) : at::Tensor();
  std::vector<at::Tensor> result;
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_backward", [&] {
    with_width<scalar_t>(channels, [&](auto width_constant) {
      constexpr int W = decltype(width_constant)::value;
      const auto args = make_args<scalar_t>(u, delta, A_t, B, C, D, z, bias, softplus);
      const int64_t blocks = (channels + W - 1) / W;
      auto dB_part = at::empty({blocks, batch, length, N}, u.options());
      auto dC_part = at::empty({blocks, batch, length, N}, u.options());
      auto dA_part = at::empty({batch, N, channels}, u.options());
      auto dD_part = at::empty({batch, channels}, u.options());
      auto dbias_part = at::empty({batch, channels}, u.options());
      Grads<scalar_t> g{grad_out.data_ptr<scalar_t>(), pointer_or_null<scalar_t>(grad_last),
                        du.data_ptr<scalar_t>(), ddelta.data_ptr<scalar_t>(),
                        dz.defined() ? dz.data_ptr<scalar_t>() : nullptr,
                        dB_part.data_ptr<scalar_t>(), dC_part.data_ptr<scalar_t>(),
                        dA_part.data_ptr<scalar_t>(), dD_part.data_ptr<scalar_t>(),
                        dbias_part.data_ptr<scalar_t>()};
      const scalar_t* saved_p = saved.data_ptr<scalar_t>();
      at::parallel_for(0, batch * blocks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t task = begin; task < end; ++task) {
          const int64_t b = task / blocks, block = task % blocks, d0 = block * W;
          backward_block<scalar_t, W>(args, g, saved_p, b, block, d0,
                                      std::min<int64_t>(W, channels - d0));
        }
      });
      // Fixed-order sums of the partial gradients (the same bits for any number of threads).
      auto dB = at::empty({batch, length, N}, u.options());
      auto dC = at::empty({batch, length, N}, u.options());
      const int64_t rows = batch * length * N;
      const scalar_t *dBp = dB_part.data_ptr<scalar_t>(), *dCp = dC_part.data_ptr<scalar_t>();
      scalar_t *dB_out = dB.data_ptr<scalar_t>(), *dC_out = dC.data_ptr<scalar_t>();
      at::parallel_for(0, rows, 4096, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
          scalar_t sb = 0, sc = 0;
          for (int64_t k = 0; k < blocks; ++k) { sb += dBp[k * rows + r]; sc += dCp[k * rows + r]; }
          dB_out[r] = sb;
          dC_out[r] = sc;
        }
      });
      auto sum_batch = [&](const at::Tensor& part) {  // (B, ...) → (...), in batch order
        auto total = part[0].clone();
        for (int64_t b = 1; b < batch; ++b) total.add_(part[b]);
        return total;
      };
      result = {du, ddelta, sum_batch(dA_part).t().contiguous(), dB, dC,
                D.defined() ? sum_batch(dD_part) : at::Tensor(), dz,
                bias.defined() ? sum_batch(dbias_part) : at::Tensor()};
    });
  });
  return result;
}

namespace {

// One decoding step for rows [begin, end) of the flattened (batch · channels): the recurrence
// for one position, with the state's N slots of a channel contiguous.
template <typename T>
void step_rows(int64_t begin, int64_t end, int64_t channels, int64_t N, bool softplus, T* h,
               const T* x, const T* delta, const T* A, const T* B, const T* C, const T* D,
               const T* z, const T* bias, T* y) {
  for (int64_t i = begin; i < end; ++i) {
    const int64_t b = i / channels, d = i % channels;
    T dt = delta[i] + (bias != nullptr ? bias[d] : T(0));
    if (softplus) dt = softplus_of(dt);
    const T dtu = dt * x[i];
    T* hi = h + i * N;
    const T *Ad = A + d * N, *Bb = B + b * N, *Cb = C + b * N;
    T acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t n = 0; n < N; ++n) {
      hi[n] = exp_fast(dt * Ad[n]) * hi[n] + dtu * Bb[n];
      acc += Cb[n] * hi[n];
    }
    if (D != nullptr) acc += D[d] * x[i];
    if (z != nullptr) acc *= z[i] * sigmoid(z[i]);
    y[i] = acc;
  }
}

}  // namespace

// One decoding step, in place on state (B, D, N): the recurrence for one position.
// x, delta, z: (B, D); B, C: (B, N). Returns y (B, D).
at::Tensor state_step(at::Tensor state, at::Tensor x, at::Tensor delta,
                         at::Tensor A, at::Tensor B, at::Tensor C,
                         c10::optional<at::Tensor> D_opt, c10::optional<at::Tensor> z_opt,
                         c10::optional<at::Tensor> bias_opt, bool softplus) {
  TORCH_CHECK(state.is_contiguous(), "state must be contiguous");
  x = x.contiguous(); delta = delta.contiguous(); A = A.contiguous();
  B = B.contiguous(); C = C.contiguous();
  auto D = optional_contiguous(D_opt), z = optional_contiguous(z_opt);
  auto bias = optional_contiguous(bias_opt);
  const int64_t batch = x.size(0), channels = x.size(1), N = A.size(1);
  auto y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "selective_state_step", [&] {
    at::parallel_for(0, batch * channels, 64, [&](int64_t begin, int64_t end) {
      step_rows<scalar_t>(begin, end, channels, N, softplus, state.data_ptr<scalar_t>(),
                          x.data_ptr<scalar_t>(), delta.data_ptr<scalar_t>(),
                          A.data_ptr<scalar_t>(), B.data_ptr<scalar_t>(), C.data_ptr<scalar_t>(),
                          pointer_or_null<scalar_t>(D), pointer_or_null<scalar_t>(z),
                          pointer_or_null<scalar_t>(bias), y.data_ptr<scalar_t>());
    });
  });
  return y;
}

// The causal depthwise convolution for one decoding step, in place on conv_state (B, D, K):
// shift the window left by one, append x (B, D), and return SiLU(Σ_k window[k] · weight[d, k]
// + bias[d]) (B, D). One call instead of the ten small tensor operations it replaces.
at::Tensor conv_step(at::Tensor conv_state, at::Tensor x, at::Tensor weight,
                        c10::optional<at::Tensor> bias_opt) {
  TORCH_CHECK(conv_state.is_contiguous(), "conv_state must be contiguous");
  TORCH_CHECK(x.scalar_type() == conv_state.scalar_type() &&
                  weight.scalar_type() == conv_state.scalar_type(),
              "conv_step: conv_state, x and weight must share one dtype");
  x = x.contiguous(); weight = weight.contiguous();
  auto bias = optional_contiguous(bias_opt);
  TORCH_CHECK(!bias.defined() || bias.scalar_type() == conv_state.scalar_type(),
              "conv_step: bias must have conv_state's dtype");
  const int64_t batch = conv_state.size(0), channels = conv_state.size(1);
  const int64_t K = conv_state.size(2);
  auto y = at::empty_like(x);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "conv_step", [&] {
    scalar_t* window = conv_state.data_ptr<scalar_t>();
    const scalar_t *xp = x.data_ptr<scalar_t>(), *w = weight.data_ptr<scalar_t>();
    const scalar_t* b = pointer_or_null<scalar_t>(bias);
    scalar_t* yp = y.data_ptr<scalar_t>();
    for (int64_t i = 0; i < batch * channels; ++i) {
      const int64_t d = i % channels;
      scalar_t* row = window + i * K;
      scalar_t acc = 0;
      for (int64_t k = 0; k + 1 < K; ++k) {
        row[k] = row[k + 1];
        acc += row[k] * w[d * K + k];
      }
      row[K - 1] = xp[i];
      acc += xp[i] * w[d * K + K - 1];
      if (b != nullptr) acc += b[d];  // after the sum, as the PyTorch path adds it
      yp[i] = acc * sigmoid(acc);
    }
  });
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &scan_forward, "fused selective scan, forward");
  m.def("backward", &scan_backward, "fused selective scan, backward");
  m.def("step", &state_step, "one recurrent step of the selective scan, in place");
  m.def("conv_step", &conv_step, "one step of the causal depthwise conv + SiLU, in place");
}
