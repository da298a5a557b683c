// Fused CPU passes of the local machine and of the zero-padded ELS machine's interior, as XLA
// FFI custom calls (els_jax/native.py builds and registers them).
//
// LS (local.py's streamed pass, SPEC §2): for queries q centred on the bank's mean, per query
// image b the coefficients a, b² (s1 = a/b², s2 = a²/b²), and a local.LocalBank,
//
//   logit[b, i, n] = s1 · Σ_{j ∈ W_i} q[b, j] · c_n[j]  −  s2 · half_sq[i, n]  +  log_w[n]
//
// with W_i the k×k window around pixel i cut at the image border; the output is the online
// softmax state of every (b, i) over all n: max, Σ exp(logit − max), Σ exp(logit − max)·c_n[i].
//
// ELS interior (boundary "zeros", els.py's main pass): query pixel i and candidate position
// i' both interior (their windows inside the image), every image n and every i':
//
//   logit[b, i, (n, i')] = s1 · ⟨W_i(q_b), W_i'(c_n)⟩ − s2 · half_sq[i', n] + log_w[n],
//
// value c_n[i'] (q and c centred on the per-channel data mean). For one offset d = i' − i
// this is the LS computation with the images shifted by d, so both share one engine: a block
// of images is carried through the product image's row sums (a window's k columns) and
// column sums (its k rows), the logits, the online softmax and the weighted sums while it is
// in the core's cache. On XLA:CPU each of these stages is its own pass over every chunk of
// logits (nothing fuses with a reduce-window or a dot).
//
// Vectors: GCC vector types of the target's width (-march=native): 16 floats with AVX-512, 8
// with AVX/AVX2, 4 otherwise (SSE, NEON). 64-byte vectors without AVX-512 were split and
// spilled by GCC: 3–5× slower on an AVX2 Zen 3. Every reduction keeps kSums = 16 partial sums
// whatever the width (kSums / kLanes registers), so each sum is formed in the same order and
// the results do not depend on the vector width.
//
// Layouts: q [B, H, W, C]; coef [B, 2] = (a, b²); cen [C+1, H, W, N] (centred images; the
// last row, ones in a LocalBank, is not read); half_sq [H, W, N] (½‖W_i(c_n)‖², border cut;
// for interior i the whole window); log_w [N]. Outputs: max [B, P], total [B, P],
// acc [B, P, C] over the P state pixels (LS: all H·W; ELS: the (H−2m)(W−2m) interior ones).
//
// Work is split into items (query image, range of at most kItemImages images), taken by the
// caller and XLA's intra-op thread pool; items are dealt to worker slots round-robin and each slot
// merges its items in order (softmax.merge), then the slots are merged: deterministic, and
// memory independent of N.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <new>
#include <vector>

#if defined(__AVX__)
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Floats per vector register of the compile target (see the top of the file).
#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
#elif defined(__AVX__)
constexpr int64_t kLanes = 8;
#else
constexpr int64_t kLanes = 4;
#endif
constexpr int64_t kSums = 16;           // partial sums per reduction (kSums / kLanes registers)
static_assert(kSums % kLanes == 0, "kSums is a whole number of registers");
constexpr int64_t kItemImages = 256;    // images per work item (at most)
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// One register of floats (int32 lanes for the exponent bits), for the per-pixel stage, where
// the compiler's own vectoriser gave up on the fused loops.
typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }

// Every float buffer of the kernels starts on a cache line (64 bytes). With malloc's 16-byte
// alignment (glibc: 16 past a page for large blocks), each 64-byte register's load or store
// of a block's data, row box sums and logits straddled two lines. Aligned, the shift-map
// kernel took 19–25 % less time per call at every k and boundary (2-core AVX-512 Xeon, N =
// 1000 digits; its row box sums 25 % and column walks 33 % less), 7–11 % built for AVX2
// (32-byte registers, half of them split before).
template <typename T>
struct LineAllocator {
  using value_type = T;
  LineAllocator() = default;
  template <typename U>
  LineAllocator(const LineAllocator<U>&) {}
  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(kLineBytes)));
  }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(kLineBytes)); }
  static constexpr std::size_t kLineBytes = 64;
};
template <typename T, typename U>
bool operator==(const LineAllocator<T>&, const LineAllocator<U>&) { return true; }
template <typename T, typename U>
bool operator!=(const LineAllocator<T>&, const LineAllocator<U>&) { return false; }
using Floats = std::vector<float, LineAllocator<float>>;

// Weights below e^−kNegligible of the running maximum are left out: each is < 2^−86 of the
// maximum's own weight (1, part of every total), so even 2^40 of them move no sum by a
// float32 rounding step. They are left out lane by lane (``live_weights``), and a register
// whose lanes are all below it is not computed at all: which weights count does not depend on
// the vector width.
constexpr float kNegligible = 60.0f;

// exp(x) = 2^n·e^r for a logit minus its running maximum, x ≥ −87: n = round(x/ln2), r = x −
// n·ln2 (ln2 split in two so that n·ln2 is exact, |r| ≤ ln2/2), e^r = 1 + r + r²·q(r) with
// q of degree 4, fitted for the least maximum relative error on |r| ≤ ln2/2 (3e-9 in exact
// arithmetic; within 1 ulp in float32, like XLA's own exp; Cephes' degree-7 form took two
// instructions more). Returns e^r in p and n in fn; the caller scales.
inline void exp_parts(vf x, vf& p, vf& fn) {
  const vf t = x * 1.4426950408889634f;
#if defined(__AVX512F__)
  // The same rounding as the magic-number add below, in one instruction instead of two.
  fn = reinterpret_cast<vf>(_mm512_roundscale_ps(
      reinterpret_cast<__m512>(t), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
  fn = (t + 12582912.0f) - 12582912.0f;                    // round to nearest (|t| < 2^22)
#endif
  const vf r = (x - fn * 0.693145751953125f) - fn * 1.428606765330187e-06f;
  vf q = r * 1.381461276e-03f + 8.368710056e-03f;
  q = q * r + 4.166838899e-02f;
  q = q * r + 1.666652113e-01f;
  q = q * r + 4.999999404e-01f;
  p = (q * r + 1.0f) * r + 1.0f;
}

// The weights p = exp(l − m) of a register of logits l against the running maximum m ≥ every
// lane, with every lane below floor = m − kNegligible set to exactly 0 (absent images, log w
// = −inf, among them). False, and p untouched, when every lane is below the floor: the
// caller skips the register (most of them at small t and large k).
inline bool live_weights(vf l, float m, float floor, vf& p) {
#if defined(__AVX512F__)
  const __mmask16 live =
      _mm512_cmp_ps_mask(reinterpret_cast<__m512>(l), _mm512_set1_ps(floor), _CMP_GE_OQ);
  if (live == 0) return false;
  // Lanes below the floor are computed (−inf there gives NaN) but never used: the zeroing
  // mask of the final ·2^n drops them, so no clamp or select is needed (three instructions
  // fewer per register than the portable form below).
  vf e, fn;
  exp_parts(l - m, e, fn);
  p = reinterpret_cast<vf>(_mm512_maskz_scalef_ps(live, reinterpret_cast<__m512>(e),
                                                  reinterpret_cast<__m512>(fn)));
  return true;
#else
#if defined(__AVX__)
  if (_mm256_movemask_ps(_mm256_cmp_ps(reinterpret_cast<__m256>(l), _mm256_set1_ps(floor),
                                       _CMP_GE_OQ)) == 0)
    return false;
#else
  bool any = false;
  for (int64_t i = 0; i < kLanes; ++i) any |= l[i] >= floor;
  if (!any) return false;
#endif
  const vf x = l - m;
  vf e, fn;
  exp_parts(x < -87.0f ? vf{} - 87.0f : x, e, fn);     // 2^n from the exponent bits: n ≥ −126
  const vi bits = (__builtin_convertvector(fn, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  p = l < floor ? vf{} : e * scale;
  return true;
#endif
}

struct Shape {
  int64_t b, h, w, c, n, k;
};

// Images [nb0, nb0 + block) of the bank: element (row r, image j) at data[r·stride + j].
// The last, partial block is a copy padded with absent images (values 0, log w −inf), so
// that every loop runs over whole blocks; with `pack`, every block is a copy.
class BlockView {
 public:
  const float* cen;       // rows (channel, pixel): C·H·W
  const float* half_sq;   // rows pixel: H·W
  const float* log_w;     // one row
  int64_t stride;

  BlockView(const Shape& s, const float* cen_, const float* half_sq_, const float* log_w_,
            int64_t nb0, int64_t block, Floats& tail, bool pack = false) {
    // pack: copy every block (NB contiguous floats per row), for a block read many times.
    const int64_t HW = s.h * s.w, C = s.c, N = s.n, nb = std::min(block, N - nb0);
    cen = cen_ + nb0, half_sq = half_sq_ + nb0, log_w = log_w_ + nb0, stride = N;
    if (nb == block && !pack) return;
    tail.assign((C * HW + HW + 1) * block, 0.0f);
    for (int64_t r = 0; r < C * HW; ++r)
      std::copy(cen_ + r * N + nb0, cen_ + r * N + nb0 + nb, tail.data() + r * block);
    for (int64_t r = 0; r < HW; ++r)
      std::copy(half_sq_ + r * N + nb0, half_sq_ + r * N + nb0 + nb,
                tail.data() + (C * HW + r) * block);
    float* lw = tail.data() + (C * HW + HW) * block;
    std::fill(lw, lw + block, kNegInf);
    std::copy(log_w_ + nb0, log_w_ + nb0 + nb, lw);
    cen = tail.data(), half_sq = tail.data() + C * HW * block, log_w = lw, stride = block;
  }
};

// Per state pixel: the running max and kSums partial sums of Σ p (entries 0 … 15) and Σ p·c_ch
// (entries 16·(ch+1) …), relative to the max; reduced once, at the end of an item.
// A pixel's state: its running maximum and its kSums partial sums of Σ p and of Σ p·c per
// channel ((C + 1)·kSums floats). A new maximum rescales the sums (rare after a few blocks).
inline void RescaleTo(float block_max, float& mx, float* ln, int64_t size) {
  if (block_max > mx) {
    const float f = mx == kNegInf ? 0.0f : std::exp(mx - block_max);
    for (int64_t l = 0; l < size; ++l) ln[l] *= f;
    mx = block_max;
  }
}

// The (max, total, acc) of every pixel from its maximum and partial sums.
inline void WriteLaneStates(const Floats& mx_in, const Floats& lanes,
                            int64_t c, float* mx, float* tot, float* acc) {
  const int64_t pixels = static_cast<int64_t>(mx_in.size());
  for (int64_t i = 0; i < pixels; ++i) {
    const float* ln = lanes.data() + i * (c + 1) * kSums;
    mx[i] = mx_in[i];
    float t = 0.0f;
    for (int64_t l = 0; l < kSums; ++l) t += ln[l];
    tot[i] = t;
    for (int64_t ch = 0; ch < c; ++ch) {
      float a = 0.0f;
      for (int64_t l = 0; l < kSums; ++l) a += ln[(ch + 1) * kSums + l];
      acc[i * c + ch] = a;
    }
  }
}

class PixelStates {
 public:
  PixelStates(int64_t pixels, int64_t c)
      : c_(c), mx_(pixels, kNegInf), lanes_(pixels * (c + 1) * kSums, 0.0f) {}

  // Adds a block of NB logits of pixel i with values vals + ch·ch_stride + j.
  template <int64_t NB>
  void add(int64_t i, const float* logit, vf block_max_lanes, const float* vals,
           int64_t ch_stride) {
    float block_max = kNegInf;
    for (int64_t l = 0; l < kLanes; ++l) block_max = std::max(block_max, block_max_lanes[l]);
    float& mx = mx_[i];
    float* ln = lanes_.data() + i * (c_ + 1) * kSums;
    RescaleTo(block_max, mx, ln, (c_ + 1) * kSums);
    if (mx == kNegInf) return;                // every candidate so far is absent
    // A block, or a register of it, whose logits are all below max − kNegligible adds
    // nothing that float32 could hold: skipped (most of them at small t and large k). (≥, not
    // >: when mx − kNegligible rounds to mx, the maximum itself must stay.)
    const float floor = mx - kNegligible;
    if (block_max < floor) return;
    // p = exp(logit − max), the kSums partial sums of Σ p in registers, then Σ p·c per
    // channel from p kept in L1 (several independent sums: no chain through memory).
    constexpr int64_t R = kSums / kLanes;
    if (c_ == 1) {        // one channel: Σ p·c in the same loop (the same sums, fewer passes)
      vf total[R], acc1[R];
      for (int64_t r = 0; r < R; ++r) {
        total[r] = load(ln + r * kLanes);
        acc1[r] = load(ln + kSums + r * kLanes);
      }
      for (int64_t j = 0; j < NB; j += kSums) {
        for (int64_t r = 0; r < R; ++r) {
          const vf lg = load(logit + j + r * kLanes);
          vf pv;
          if (!live_weights(lg, mx, floor, pv)) continue;
          total[r] += pv;
          acc1[r] += pv * load(vals + j + r * kLanes);
        }
      }
      for (int64_t r = 0; r < R; ++r) {
        store(ln + r * kLanes, total[r]);
        store(ln + kSums + r * kLanes, acc1[r]);
      }
      return;
    }
    alignas(64) float p[NB];
    vf total[R];
    for (int64_t r = 0; r < R; ++r) total[r] = load(ln + r * kLanes);
    for (int64_t j = 0; j < NB; j += kSums) {
      for (int64_t r = 0; r < R; ++r) {
        const vf lg = load(logit + j + r * kLanes);
        vf pv;
        if (!live_weights(lg, mx, floor, pv)) {
          store(p + j + r * kLanes, vf{});
          continue;
        }
        total[r] += pv;
        store(p + j + r * kLanes, pv);
      }
    }
    for (int64_t r = 0; r < R; ++r) store(ln + r * kLanes, total[r]);
    for (int64_t ch = 0; ch < c_; ++ch) {
      float* lc = ln + (ch + 1) * kSums;
      const float* vc = vals + ch * ch_stride;
      vf acc[R];
      for (int64_t r = 0; r < R; ++r) acc[r] = load(lc + r * kLanes);
      for (int64_t j = 0; j < NB; j += kSums)
        for (int64_t r = 0; r < R; ++r)
          acc[r] += load(p + j + r * kLanes) * load(vc + j + r * kLanes);
      for (int64_t r = 0; r < R; ++r) store(lc + r * kLanes, acc[r]);
    }
  }

  // The state (max, total, acc) of every pixel.
  void write(float* mx, float* tot, float* acc) const {
    WriteLaneStates(mx_, lanes_, c_, mx, tot, acc);
  }

 private:
  int64_t c_;
  Floats mx_, lanes_;
};

// s1 = a/b², s2 = a²/b² of query image b, in scalar float: the same whatever batch the image
// is in (XLA's vectorised division of a batch can differ by an ulp).
inline void coefficients(const float* coef, int64_t b, float& s1, float& s2) {
  const float a = coef[2 * b], b2 = coef[2 * b + 1];
  s1 = a / b2, s2 = (a * a) / b2;
}

// Floats per row of the row-sum image: W·NB plus one cache line, so that the k rows a window
// sums are not a multiple of 4 KiB apart (the same L1 set: more rows than an 8-way L1 holds
// thrash it; measured 3× slower at k = 11 on a Zen 3).
template <int64_t NB>
constexpr int64_t row_stride(int64_t W) { return W * NB + 16; }

// Up to four registers of a block summed side by side (one running sum is latency-bound).
template <int64_t NB>
constexpr int64_t kStep = std::min<int64_t>(NB, 4 * kLanes);

// One row of the row-sum image of query image qb against the block's images shifted by
// (dy, dx): for x in [x0, x1),
//   out[x·NB + j] = Σ_{x' ∈ [x−m, x+m] ∩ [0, W)} Σ_ch qb[y, x', ch] · c_j[y+dy, x'+dx, ch]
// (columns outside the image are cut, as LS wants; interior windows never reach them). The
// products are summed along the row as prefix sums and each window is one difference (k
// additions per window were 1.2–1.3× slower at k = 11; a running sum down the rows as well
// lost float32 accuracy at t = 0.02). pre: scratch of (W + 1)·NB floats.
template <int64_t NB>
void row_sums(const Shape& s, const float* qb, const BlockView& v, int64_t y, int64_t dy,
              int64_t dx, int64_t x0, int64_t x1, float* pre, float* out) {
  constexpr int64_t S = kStep<NB>, R = S / kLanes;
  const int64_t W = s.w, C = s.c, HW = s.h * s.w, m = s.k / 2;
  const int64_t lo = std::max<int64_t>(0, x0 - m), hi = std::min(W, x1 + m);
  for (int64_t j0 = 0; j0 < NB; j0 += S) {
    vf run[R] = {};
    for (int64_t r = 0; r < R; ++r) store(pre + j0 + r * kLanes, run[r]);
    for (int64_t x = lo; x < hi; ++x) {
      const int64_t i = y * W + x, shifted = (y + dy) * W + x + dx;
      for (int64_t r = 0; r < R; ++r) {
        const float* c = v.cen + shifted * v.stride + j0 + r * kLanes;
        vf p = vf{};
        for (int64_t ch = 0; ch < C; ++ch) p += qb[i * C + ch] * load(c + ch * HW * v.stride);
        run[r] += p;
        store(pre + (x - lo + 1) * NB + j0 + r * kLanes, run[r]);
      }
    }
  }
  for (int64_t x = x0; x < x1; ++x) {
    const float* a = pre + (std::min(hi, x + m + 1) - lo) * NB;
    const float* b = pre + (std::max(lo, x - m) - lo) * NB;
    for (int64_t j = 0; j < NB; j += kLanes) store(out + x * NB + j, load(a + j) - load(b + j));
  }
}

// logit[j] = s1·box[j] − s2·hs[j] + lw[j] with box[j] = Σ_{r < rows} sums[r·rs + j]
// (+ extra[j] if given): a window's rows of the row-sum image, rs floats apart, or its two
// partial sums (``column_split``); returns the lanes' maxima.
template <int64_t NB>
inline vf window_logits(const float* sums, int64_t rs, int64_t rows, const float* extra,
                        const float* hs, const float* lw, float s1, float s2, float* logit) {
  constexpr int64_t S = kStep<NB>, R = S / kLanes;
  vf vmax = vf{} + kNegInf;
  for (int64_t j0 = 0; j0 < NB; j0 += S) {
    vf box[R] = {};
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t u = 0; u < R; ++u) box[u] += load(sums + r * rs + j0 + u * kLanes);
    if (extra != nullptr)
      for (int64_t u = 0; u < R; ++u) box[u] += load(extra + j0 + u * kLanes);
    for (int64_t u = 0; u < R; ++u) {
      const int64_t j = j0 + u * kLanes;
      const vf lg = s1 * box[u] - s2 * load(hs + j) + load(lw + j);
      store(logit + j, lg);
      vmax = lg > vmax ? lg : vmax;
    }
  }
  return vmax;
}

// Asks for the NB floats of a block's bank data at one pixel in each of `rows` rows
// (row_stride pixels apart, images `stride` floats apart) ahead of their use.
template <int64_t NB>
inline void prefetch_pixel(const float* base, int64_t stride, int64_t pixel, int64_t rows,
                           int64_t row_stride) {
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t j = 0; j < NB; j += 16)
      __builtin_prefetch(base + (r * row_stride + pixel) * stride + j);
}

// dst[x·NB + j] = a[x·NB + j] + b[x·NB + j] (b null: a copy) for x in [x0, x1).
template <int64_t NB>
inline void row_add(float* dst, const float* a, const float* b, int64_t x0, int64_t x1) {
  for (int64_t i = x0 * NB; i < x1 * NB; i += kLanes)
    store(dst + i, b == nullptr ? load(a + i) : load(a + i) + load(b + i));
}

// The k-row sums of rows [y0, y1) of the row-sum image, as two partial sums each (van Herk /
// Gil-Werman): rows are cut into segments of k from y0; in place, each row becomes the sum of
// its segment up to it (F), and suf holds the sums from each row to the end of its segment
// (G). The window of rows [u, u + k) is then F[u + k − 1] + G[u] (F[u + k − 1] alone when u
// starts a segment): three additions per row instead of k (no subtraction, so no loss of
// float32 accuracy as a running sum down the rows has).
template <int64_t NB>
void column_split(float* sums, float* suf, int64_t rs, int64_t k, int64_t y0, int64_t y1,
                  int64_t x0, int64_t x1) {
  for (int64_t y = y1 - 1; y >= y0; --y) {
    const bool last = y + 1 == y1 || (y + 1 - y0) % k == 0;
    row_add<NB>(suf + y * rs, sums + y * rs, last ? nullptr : suf + (y + 1) * rs, x0, x1);
  }
  for (int64_t y = y0; y < y1; ++y)
    if ((y - y0) % k != 0) row_add<NB>(sums + y * rs, sums + y * rs, sums + (y - 1) * rs, x0, x1);
}

// From this k on, the interior's window rows are summed as two partial sums
// (``column_split``) instead of k rows.
constexpr int64_t kSplitK = 7;

constexpr int64_t kLocalBlock = 128;   // images per block, LS
constexpr int64_t kInteriorBlock = 32; // images per block, ELS interior (reused over offsets)
// Items are whole blocks, so the only partial block is the last one of the bank (BlockView).
static_assert(kItemImages % kLocalBlock == 0 && kItemImages % kInteriorBlock == 0);

// LS, one item: query image b, images [n0, n1); state over the H·W pixels.
void local_item(const Shape& s, const float* q, const float* coef, const float* cen,
                const float* half_sq, const float* log_w, int64_t b, int64_t n0, int64_t n1,
                float* mx, float* tot, float* acc) {
  constexpr int64_t NB = kLocalBlock;
  const int64_t H = s.h, W = s.w, C = s.c, m = s.k / 2, HW = H * W, rs = row_stride<NB>(W);
  float s1, s2;
  coefficients(coef, b, s1, s2);
  const float* qb = q + b * HW * C;
  Floats sums(H * rs), pre((W + 1) * NB), tail;
  alignas(64) float logit[NB];
  PixelStates states(HW, C);
  for (int64_t nb0 = n0; nb0 < n1; nb0 += NB) {
    const BlockView v(s, cen, half_sq, log_w, nb0, NB, tail);
    // Rows of the row-sum image are computed just before the first output row needing them.
    for (int64_t y = 0; y < std::min(H, m); ++y)
      row_sums<NB>(s, qb, v, y, 0, 0, 0, W, pre.data(), sums.data() + y * rs);
    for (int64_t y = 0; y < H; ++y) {
      if (y + m < H)
        row_sums<NB>(s, qb, v, y + m, 0, 0, 0, W, pre.data(), sums.data() + (y + m) * rs);
      const int64_t r0 = std::max<int64_t>(0, y - m), r1 = std::min(H - 1, y + m);
      for (int64_t x = 0; x < W; ++x) {
        const int64_t i = y * W + x;
        // LS reads each bank entry once per call, N floats apart from pixel to pixel: ask for
        // the next row-sum row's images and the next row's norms a row of work ahead (1.7×
        // faster on a Zen 3, whose loads otherwise wait on memory).
        if (y + m + 1 < H) prefetch_pixel<NB>(v.cen, v.stride, i + (m + 1) * W, C, HW);
        if (y + 1 < H) prefetch_pixel<NB>(v.half_sq, v.stride, i + W, 1, 0);
        const vf vmax = window_logits<NB>(sums.data() + r0 * rs + x * NB, rs, r1 - r0 + 1,
                                          nullptr, v.half_sq + i * v.stride, v.log_w, s1, s2,
                                          logit);
        states.add<NB>(i, logit, vmax, v.cen + i * v.stride, HW * v.stride);
      }
    }
  }
  states.write(mx, tot, acc);
}

// ELS interior, one item: query image b, images [n0, n1), every offset; state over the
// (H−2m)(W−2m) interior query pixels.
void interior_item(const Shape& s, const float* q, const float* coef, const float* cen,
                   const float* half_sq, const float* log_w, int64_t b, int64_t n0, int64_t n1,
                   float* mx, float* tot, float* acc) {
  constexpr int64_t NB = kInteriorBlock;
  const int64_t H = s.h, W = s.w, C = s.c, m = s.k / 2, HW = H * W, rs = row_stride<NB>(W);
  const int64_t hq = H - 2 * m, wq = W - 2 * m;
  float s1, s2;
  coefficients(coef, b, s1, s2);
  const float* qb = q + b * HW * C;
  Floats sums(H * rs), suf(s.k >= kSplitK ? H * rs : 0), pre((W + 1) * NB), tail;
  alignas(64) float logit[NB];
  PixelStates states(hq * wq, C);
  for (int64_t nb0 = n0; nb0 < n1; nb0 += NB) {
    // The block is read at every offset: packed once (NB contiguous floats per pixel).
    const BlockView v(s, cen, half_sq, log_w, nb0, NB, tail, true);
    for (int64_t dy = -(hq - 1); dy <= hq - 1; ++dy) {
      // Query rows whose window and whose candidate's window (d rows away) are interior.
      const int64_t qy0 = std::max(m, m - dy), qy1 = std::min(H - m, H - m - dy);
      for (int64_t dx = -(wq - 1); dx <= wq - 1; ++dx) {
        const int64_t qx0 = std::max(m, m - dx), qx1 = std::min(W - m, W - m - dx);
        const int64_t y0 = qy0 - m, y1 = qy1 + m;
        if (s.k >= kSplitK) {
          for (int64_t y = y0; y < y1; ++y)
            row_sums<NB>(s, qb, v, y, dy, dx, qx0, qx1, pre.data(), sums.data() + y * rs);
          column_split<NB>(sums.data(), suf.data(), rs, s.k, y0, y1, qx0, qx1);
        } else {
          for (int64_t y = y0; y < qy0 + m; ++y)
            row_sums<NB>(s, qb, v, y, dy, dx, qx0, qx1, pre.data(), sums.data() + y * rs);
        }
        for (int64_t y = qy0; y < qy1; ++y) {
          const int64_t u = y - m;                  // the window's first row
          const float *rows = sums.data() + u * rs, *extra = nullptr;
          int64_t n_rows = s.k;
          if (s.k >= kSplitK) {
            rows = sums.data() + (u + s.k - 1) * rs, n_rows = 1;
            if ((u - y0) % s.k != 0) extra = suf.data() + u * rs;
          } else {                                  // rows computed as they are needed
            row_sums<NB>(s, qb, v, y + m, dy, dx, qx0, qx1, pre.data(),
                         sums.data() + (y + m) * rs);
          }
          for (int64_t x = qx0; x < qx1; ++x) {
            const int64_t shifted = (y + dy) * W + x + dx;
            const vf vmax = window_logits<NB>(rows + x * NB, rs, n_rows,
                                              extra == nullptr ? nullptr : extra + x * NB,
                                              v.half_sq + shifted * v.stride, v.log_w, s1, s2,
                                              logit);
            states.add<NB>((y - m) * wq + (x - m), logit, vmax, v.cen + shifted * v.stride,
                           HW * v.stride);
          }
        }
      }
    }
  }
  states.write(mx, tot, acc);
}

// ELS main pass from a window bank (els_window.WindowBank: every candidate window once, or
// identical windows merged into one of log weight log count). Query window q[b, i] (the k×k·C
// window of query pixel i, minus a·μ) against bank row c = [c − μ, ½‖c − μ‖², log w_c] with
// value v_c:
//
//   logit[b, i, c] = s1·⟨q[b, i], c − μ⟩ − s2·½‖c − μ‖² + log w_c,
//
// the XLA window engine's augmented dot product. An item (query image, range of candidates)
// packs kWindowBlock candidates at a time component-major (a register holds one component of
// kLanes candidates) and computes the logits of kQueryTile query pixels against them at once
// (each key register loaded once, used kQueryTile times), then adds them to the pixels'
// online softmax states (PixelStates, with the kernels' skip of negligible weights). On
// XLA:CPU the same pass is a matmul of length D + 2 (short: memory-bound), then the max, the
// exp and a matrix-vector product, each its own pass over the logits.
constexpr int64_t kWindowBlock = 128;                    // candidates packed at a time
constexpr int64_t kQueryTile = 4;                        // query pixels per micro-tile
constexpr int64_t kCandVecs = kLanes == 16 ? 4 : 2;      // candidate registers per micro-tile
static_assert(kWindowBlock % (kCandVecs * kLanes) == 0, "whole micro-tiles per block");

struct WindowShape {
  int64_t b, p, d, m, v;  // query images, query pixels, window length, candidates, values
};

void window_item(const WindowShape& s, const float* q, const float* coef, const float* keys,
                 const float* vals, int64_t b, int64_t m0, int64_t m1, float* mx, float* tot,
                 float* acc) {
  constexpr int64_t NB = kWindowBlock, QT = kQueryTile, CV = kCandVecs, CT = CV * kLanes;
  const int64_t P = s.p, D = s.d, V = s.v, KD = s.d + 2;
  float s1, s2;
  coefficients(coef, b, s1, s2);
  const float* qb = q + b * P * D;
  // Rows of the packed block: D components, ½‖c − μ‖², log w, then the V values.
  Floats pack((KD + V) * NB);
  float* const hs = pack.data() + D * NB;
  float* const lw = pack.data() + (D + 1) * NB;
  const float* const pv = pack.data() + KD * NB;
  alignas(64) float logit[QT][NB];
  PixelStates states(P, V);
  for (int64_t j0 = m0; j0 < m1; j0 += NB) {
    const int64_t nb = std::min(NB, m1 - j0);
    for (int64_t j = 0; j < nb; ++j) {
      const float* kr = keys + (j0 + j) * KD;
      for (int64_t d = 0; d < KD; ++d) pack[d * NB + j] = kr[d];
      for (int64_t ch = 0; ch < V; ++ch) pack[(KD + ch) * NB + j] = vals[(j0 + j) * V + ch];
    }
    for (int64_t j = nb; j < NB; ++j) {                 // absent candidates: weight exactly 0
      for (int64_t r = 0; r < KD + V; ++r) pack[r * NB + j] = 0.0f;
      lw[j] = kNegInf;
    }
    for (int64_t i0 = 0; i0 < P; i0 += QT) {
      const int64_t nq = std::min(QT, P - i0);
      const float* qi[QT];
      for (int64_t t = 0; t < QT; ++t) qi[t] = qb + (i0 + std::min(t, nq - 1)) * D;
      vf vmax[QT];
      for (int64_t t = 0; t < QT; ++t) vmax[t] = vf{} + kNegInf;
      for (int64_t c0 = 0; c0 < NB; c0 += CT) {
        vf dot[QT][CV] = {};
        for (int64_t d = 0; d < D; ++d) {
          vf kv[CV];
          for (int64_t u = 0; u < CV; ++u) kv[u] = load(pack.data() + d * NB + c0 + u * kLanes);
          for (int64_t t = 0; t < QT; ++t) {
            const float qd = qi[t][d];
            for (int64_t u = 0; u < CV; ++u) dot[t][u] += qd * kv[u];
          }
        }
        for (int64_t u = 0; u < CV; ++u) {
          const int64_t j = c0 + u * kLanes;
          const vf h = load(hs + j), l = load(lw + j);
          for (int64_t t = 0; t < QT; ++t) {
            const vf lg = s1 * dot[t][u] - s2 * h + l;
            store(logit[t] + j, lg);
            vmax[t] = lg > vmax[t] ? lg : vmax[t];
          }
        }
      }
      for (int64_t t = 0; t < nq; ++t) states.add<NB>(i0 + t, logit[t], vmax[t], pv, NB);
    }
  }
  states.write(mx, tot, acc);
}

// Adds the softmax state (m2, t2, a2) of a pixel into (m1, t1, a1), as softmax.merge.
inline void merge_into(float& m1, float& t1, float* a1, float m2, float t2, const float* a2,
                       int64_t C) {
  if (m2 == kNegInf) return;
  if (m1 == kNegInf) {
    m1 = m2, t1 = t2;
    std::copy(a2, a2 + C, a1);
    return;
  }
  const float m = std::max(m1, m2), f1 = std::exp(m1 - m), f2 = std::exp(m2 - m);
  t1 = t1 * f1 + t2 * f2;
  for (int64_t ch = 0; ch < C; ++ch) a1[ch] = a1[ch] * f1 + a2[ch] * f2;
  m1 = m;
}

// Shared by the caller and the pool's tasks; a task that starts after every slot is taken
// finds nothing to do and only drops its reference.
struct Work {
  std::atomic<int64_t> next_slot{0};
  int64_t done = 0;
  std::mutex mu;
  std::condition_variable cv;
};

// Runs item(b, n0, n1, mx, tot, acc) over every (query image, range of images) on the caller
// and the pool, and writes the merged state over P pixels per query image.
template <typename Item>
void run_items(ffi::ThreadPool& pool, const Shape& s, int64_t P, int64_t block, Item item_fn,
               float* mxo, float* toto, float* acco, int64_t max_item = kItemImages) {
  // Candidates (images, or windows of a window bank) per item: whole blocks, at most
  // max_item, and few enough that every thread gets two items of each query image when N
  // allows (a bank of 64 images would otherwise be one item, on one core). A function of N
  // and the pool only: a query image's result does not depend on the rest of the batch.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  const int64_t want = (s.n + 2 * threads - 1) / (2 * threads);
  const int64_t item =
      std::min(max_item, std::max(block, (want + block - 1) / block * block));
  const int64_t C = s.c, per_b = (s.n + item - 1) / item;
  const int64_t items = s.b * per_b;
  // The caller works too: num_threads workers in all (more would oversubscribe the cores).
  const int64_t helpers =
      std::min<int64_t>(items - 1, std::max<int64_t>(0, pool.num_threads() - 1));
  const int64_t workers = helpers + 1;
  // One running state per (worker slot, query image): max [P], total [P], acc [P·C].
  const int64_t state = P * (2 + C);
  Floats slot_states(workers * s.b * state, 0.0f);
  for (int64_t w = 0; w < workers * s.b; ++w)
    std::fill(slot_states.begin() + w * state, slot_states.begin() + w * state + P, kNegInf);
  float* slotp = slot_states.data();
  // Slot w takes items w, w + workers, ... and merges them in that order, whichever thread
  // runs it: the result does not depend on the pool's timing (nor on the rest of the batch).
  auto work = std::make_shared<Work>();
  auto drain = [=, &s]() {
    Floats one(state);
    for (;;) {
      const int64_t slot = work->next_slot.fetch_add(1);
      if (slot >= workers) return;
      for (int64_t it = slot; it < items; it += workers) {
        const int64_t b = it / per_b, n0 = (it % per_b) * item;
        item_fn(b, n0, std::min(s.n, n0 + item), one.data(), one.data() + P,
                one.data() + 2 * P);
        float* st = slotp + (slot * s.b + b) * state;
        for (int64_t i = 0; i < P; ++i)
          merge_into(st[i], st[P + i], st + 2 * P + i * C, one[i], one[P + i],
                     one.data() + 2 * P + i * C, C);
      }
      std::lock_guard<std::mutex> lock(work->mu);
      if (++work->done == workers) work->cv.notify_all();
    }
  };
  for (int64_t t = 0; t < helpers; ++t) {
    // A late task only reads `work` (kept alive by its copy) and finds no slot left.
    pool.Schedule([work, drain]() { drain(); });
  }
  drain();
  {
    std::unique_lock<std::mutex> lock(work->mu);
    work->cv.wait(lock, [&] { return work->done == workers; });
  }
  for (int64_t b = 0; b < s.b; ++b) {
    float* m = mxo + b * P;
    float* t = toto + b * P;
    float* a = acco + b * P * C;
    std::fill(m, m + P, kNegInf);
    std::fill(t, t + P, 0.0f);
    std::fill(a, a + P * C, 0.0f);
    for (int64_t w = 0; w < workers; ++w) {
      const float* st = slotp + (w * s.b + b) * state;
      for (int64_t i = 0; i < P; ++i)
        merge_into(m[i], t[i], a + i * C, st[i], st[P + i], st + 2 * P + i * C, C);
    }
  }
}

ffi::Error check(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& coef,
                 const ffi::Buffer<ffi::F32>& cen, const ffi::Buffer<ffi::F32>& half_sq,
                 const ffi::Buffer<ffi::F32>& log_w, int64_t k, Shape& s) {
  const auto qd = q.dimensions(), fd = coef.dimensions(), cd = cen.dimensions();
  const auto hd = half_sq.dimensions(), ld = log_w.dimensions();
  if (qd.size() != 4 || fd.size() != 2 || cd.size() != 4 || hd.size() != 3 || ld.size() != 1) {
    return ffi::Error::InvalidArgument(
        "expected q [B, H, W, C], coef [B, 2], cen [C+1, H, W, N], half_sq [H, W, N], "
        "log_w [N]");
  }
  s = Shape{qd[0], qd[1], qd[2], qd[3], cd[3], k};
  const bool ok = fd[0] == s.b && fd[1] == 2 && cd[0] == s.c + 1 && cd[1] == s.h &&
                  cd[2] == s.w && hd[0] == s.h && hd[1] == s.w && hd[2] == s.n &&
                  ld[0] == s.n && s.n > 0;
  if (!ok) return ffi::Error::InvalidArgument("bank shapes do not match the queries");
  if (k < 1 || k % 2 == 0) return ffi::Error::InvalidArgument("k must be odd and positive");
  return ffi::Error::Success();
}

#define ELS_ARGS                                                                        \
  ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> coef,            \
      ffi::Buffer<ffi::F32> cen, ffi::Buffer<ffi::F32> half_sq,                         \
      ffi::Buffer<ffi::F32> log_w, int64_t k, ffi::ResultBuffer<ffi::F32> out_max,      \
      ffi::ResultBuffer<ffi::F32> out_total, ffi::ResultBuffer<ffi::F32> out_acc

template <bool kInterior>
ffi::Error SoftmaxImpl(ELS_ARGS) {
  Shape s;
  if (ffi::Error err = check(q, coef, cen, half_sq, log_w, k, s); err.failure()) return err;
  const int64_t m = k / 2;
  if (kInterior && (s.h <= 2 * m || s.w <= 2 * m)) {
    return ffi::Error::InvalidArgument("k must be smaller than H and W for the interior");
  }
  const int64_t P = kInterior ? (s.h - 2 * m) * (s.w - 2 * m) : s.h * s.w;
  const float *qp = q.typed_data(), *cp = coef.typed_data(), *cenp = cen.typed_data();
  const float *hsp = half_sq.typed_data(), *lwp = log_w.typed_data();
  run_items(pool, s, P, kInterior ? kInteriorBlock : kLocalBlock,
            [&](int64_t b, int64_t n0, int64_t n1, float* mx, float* tot, float* acc) {
              (kInterior ? interior_item : local_item)(s, qp, cp, cenp, hsp, lwp, b, n0, n1,
                                                       mx, tot, acc);
            },
            out_max->typed_data(), out_total->typed_data(), out_acc->typed_data());
  return ffi::Error::Success();
}

ffi::Error LocalImpl(ELS_ARGS) {
  return SoftmaxImpl<false>(pool, q, coef, cen, half_sq, log_w, k, out_max, out_total, out_acc);
}

ffi::Error InteriorImpl(ELS_ARGS) {
  return SoftmaxImpl<true>(pool, q, coef, cen, half_sq, log_w, k, out_max, out_total, out_acc);
}

// q [B, P, D], coef [B, 2], keys [M, D + 2], values [M, V] → max [B, P], total [B, P],
// acc [B, P, V].
ffi::Error WindowImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> coef,
                      ffi::Buffer<ffi::F32> keys, ffi::Buffer<ffi::F32> vals,
                      ffi::ResultBuffer<ffi::F32> out_max, ffi::ResultBuffer<ffi::F32> out_total,
                      ffi::ResultBuffer<ffi::F32> out_acc) {
  const auto qd = q.dimensions(), fd = coef.dimensions(), kd = keys.dimensions();
  const auto vd = vals.dimensions();
  if (qd.size() != 3 || fd.size() != 2 || kd.size() != 2 || vd.size() != 2) {
    return ffi::Error::InvalidArgument(
        "expected q [B, P, D], coef [B, 2], keys [M, D + 2], values [M, V]");
  }
  const WindowShape ws{qd[0], qd[1], qd[2], kd[0], vd[1]};
  if (fd[0] != ws.b || fd[1] != 2 || kd[1] != ws.d + 2 || vd[0] != ws.m || ws.m < 1 ||
      ws.p < 1) {
    return ffi::Error::InvalidArgument("window bank shapes do not match the queries");
  }
  const Shape s{ws.b, 0, 0, ws.v, ws.m, 0};
  const float *qp = q.typed_data(), *cp = coef.typed_data(), *kp = keys.typed_data();
  const float* vp = vals.typed_data();
  run_items(pool, s, ws.p, kWindowBlock,
            [&](int64_t b, int64_t m0, int64_t m1, float* mx, float* tot, float* acc) {
              window_item(ws, qp, cp, kp, vp, b, m0, m1, mx, tot, acc);
            },
            out_max->typed_data(), out_total->typed_data(), out_acc->typed_data(),
            std::numeric_limits<int64_t>::max());
  return ffi::Error::Success();
}

}  // namespace

#define ELS_BINDING                                 \
  ffi::Ffi::Bind()                                  \
      .Ctx<ffi::ThreadPool>()                       \
      .Arg<ffi::Buffer<ffi::F32>>() /* q */         \
      .Arg<ffi::Buffer<ffi::F32>>() /* coef */      \
      .Arg<ffi::Buffer<ffi::F32>>() /* cen */       \
      .Arg<ffi::Buffer<ffi::F32>>() /* half_sq */   \
      .Arg<ffi::Buffer<ffi::F32>>() /* log_w */     \
      .Attr<int64_t>("k")                           \
      .Ret<ffi::Buffer<ffi::F32>>() /* max */       \
      .Ret<ffi::Buffer<ffi::F32>>() /* total */     \
      .Ret<ffi::Buffer<ffi::F32>>() /* acc */

XLA_FFI_DEFINE_HANDLER_SYMBOL(ElsLocalSoftmax, LocalImpl, ELS_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(ElsInteriorSoftmax, InteriorImpl, ELS_BINDING);

XLA_FFI_DEFINE_HANDLER_SYMBOL(ElsWindowSoftmax, WindowImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>() /* q */
                                  .Arg<ffi::Buffer<ffi::F32>>() /* coef */
                                  .Arg<ffi::Buffer<ffi::F32>>() /* keys */
                                  .Arg<ffi::Buffer<ffi::F32>>() /* values */
                                  .Ret<ffi::Buffer<ffi::F32>>() /* max */
                                  .Ret<ffi::Buffer<ffi::F32>>() /* total */
                                  .Ret<ffi::Buffer<ffi::F32>>() /* acc */);

// ----------------------------------------------------------------------------------------
// Shift-map engine (docs/theory.md §9, els_jax/engines/shiftmap.py): the patch machines'
// logits from one map per (training image, shift d = j − i),
//
//   f_d(p) = Σ_c (x(p) − a·y(p + d))²,     ‖q_i − a·c_j‖² = (box_k f_d)(i),
//
// logit = −(box_k f_d)(i)/(2b²) + log w, value y(i + d): O(C) work per term of the map and
// O(1) per pair for the box sums, whatever k. The pairs are the product of per-axis lists of
// (shift d, query range [i0, i0 + len)) (``axis_shifts``; shiftmap.axis_plan's rule):
//
//   mode 0 "local"     d = 0 for every i, x and y zero-extended (LS's cut windows).
//   mode 1 "zeros"     d = 0 for every i (zero padded); d ≠ 0 for interior i with i + d interior.
//   mode 2 "circular"  d = 0 … n−1 (mod n): i with (i + d) mod n interior; x and y periodic.
//   mode 3 "wrap"      d = 0 … n−1 (mod n): every i; x and y periodic.
//   mode 4 "edge"      mode 1's pairs of the coordinates within m of a border (d = 0) only,
//   mode 5 "inner"     ... and of the interior coordinates only: the zero-padded border pixels
//                      are (rows 4 × columns 1) ∪ (rows 5 × columns 4), two calls with a mode
//                      per axis (``mode_x``), whatever engine runs the interior
//                      (``shiftmap.border_x0``).
//
// One item (query image, range of images) packs NB images at a time pixel-major (a register
// holds one pixel of kLanes images) and, for every shift: the row box sums of the map's rows
// over the query range ± m (``row_box``, straight from the map's terms), the column box sums
// fused with the logits (``column_windows``: a column of pairs at a time; a row at a time for
// direct sums), and those pairs into the pixels' online softmax states (``RowStates``:
// PixelStates' partial sums and skip of negligible weights, fed a row or column at a time).
// Box sums add nonnegative terms only (no prefix sums, no subtraction, so no float32
// cancellation at small t): k ≤ kShiftDirectK by k direct additions, larger k by van Herk /
// Gil-Werman partial sums (in-segment suffix and prefix sums, restarted every k terms: about
// three additions per output whatever k).
//
// Cost: a shift's map covers its query range ± m along each axis, so the terms per pair are
// ((len + 2m)/len)² on average: ~1 for LS and for wrap_patches (len = n), but (n/(n − 2m))²
// for the circular windows inside the image and the zero-padded interior at large k (28 at
// k = 27 on 32×32: only 6×6 candidate positions per image, each needing the whole map).

namespace {

// Images per block: eight registers with AVX-512 (kLanes = 16), eight with AVX2 or four with
// NEON/SSE. Measured on a 2-core AVX-512 EPYC (N = 1024 of 32×32, B = 1, t = 0.5): 128
// images took 13–18 % less time than 64 per call at k = 7…15 (C = 1, zeros), 6–15 % (circular),
// 3–8 % (C = 3), 13 % at B = 16 (each shift's set-up and each pixel's softmax-state update
// shared by more images); 256 was slower again (registers spill). Built for AVX2, 128 was up
// to 28 % slower than 64 (els_soft), so those targets keep 64.
constexpr int64_t kShiftBlock = kLanes == 16 ? 128 : 64;
constexpr int64_t kShiftDirectK = 5;    // up to this k, box sums by direct additions
static_assert(kItemImages % kShiftBlock == 0, "items are whole blocks");
static_assert(kShiftBlock % kSums == 0, "whole partial-sum groups per block");

struct AxisShift {
  int64_t d, i0, len;  // shift; query coordinates i0 … i0 + len − 1 (mod n when periodic)
};

std::vector<AxisShift> axis_shifts(int64_t n, int64_t k, int64_t mode) {
  const int64_t m = k / 2, inner = n - 2 * m;
  std::vector<AxisShift> out;
  if (mode == 0) {
    out.push_back({0, 0, n});
  } else if (mode == 4) {
    out.push_back({0, 0, m});
    out.push_back({0, n - m, m});
  } else if (mode == 1 || mode == 5) {
    for (int64_t d = -(inner - 1); d <= inner - 1; ++d) {
      if (d == 0) out.push_back(mode == 1 ? AxisShift{0, 0, n} : AxisShift{0, m, inner});
      else out.push_back({d, std::max(m, m - d), inner - std::abs(d)});
    }
  } else {
    for (int64_t d = 0; d < n; ++d) {
      if (mode == 3) out.push_back({d, 0, n});
      else out.push_back({d, ((m - d) % n + n) % n, inner});
    }
  }
  return out;
}

// For the T = len + 2m map coordinates t of one axis shift: the query coordinate p (−1
// outside a zero-extended image, where the term is 0) and the candidate coordinate q = p + d;
// on a periodic axis only the first min(T, n) are distinct (t ≥ n repeats t − n).
struct AxisMap {
  std::vector<int64_t> p, q;
  int64_t T, distinct;
};

AxisMap axis_map(const AxisShift& s, int64_t n, int64_t k, bool periodic) {
  const int64_t m = k / 2, T = s.len + 2 * m;
  AxisMap am;
  am.T = T;
  am.distinct = periodic ? std::min(T, n) : T;
  am.p.resize(T), am.q.resize(T);
  for (int64_t t = 0; t < T; ++t) {
    int64_t p = s.i0 - m + t;
    if (periodic) {
      p = ((p % n) + n) % n;
      am.p[t] = p, am.q[t] = (p + s.d) % n;
    } else {
      const bool in = p >= 0 && p < n;     // outside only for d = 0, where q = p is outside too
      am.p[t] = in ? p : -1, am.q[t] = in ? p + s.d : -1;
    }
  }
  return am;
}

// One row of the map against NB images: ``term`` sets out[e] = f(t) (register e), ``add``
// adds f(t) to run[e] (a fused multiply-add per channel); f(t) = Σ_c (x[p(t), c] −
// a·y[q(t), c])², 0 where p(t) < 0. xrow: the query's row (pixel-major, C per pixel); yrow:
// the packed block's row (NB per pixel, channels `plane` floats apart).
template <int64_t NB, int64_t CC>
struct MapRow {
  static constexpr int64_t V = NB / kLanes;
  const float* xrow;
  const float* yrow;
  int64_t plane, c;
  vf av;
  const AxisMap& tx;

  int64_t channels() const { return CC > 0 ? CC : c; }

  void term(int64_t t, vf* out) const {
#pragma GCC unroll 16
    for (int64_t e = 0; e < V; ++e) out[e] = vf{};
    add(t, out);
  }

  void add(int64_t t, vf* run) const {
    const int64_t px = tx.p[t];
    if (px < 0) return;
    const int64_t nc = channels();
    const float* xp = xrow + px * nc;
    const float* yp = yrow + tx.q[t] * NB;
    for (int64_t ch = 0; ch < nc; ++ch) {
      const float xc = xp[ch];
#pragma GCC unroll 16
      for (int64_t e = 0; e < V; ++e) {
        const vf d = xc - av * load(yp + ch * plane + e * kLanes);
        run[e] = d * d + run[e];
      }
    }
  }
};

// Row box sums of one row of the map: out[u] = Σ_{t=u}^{u+k−1} f(t), u in [0, L) (NB floats
// each). k ≤ kShiftDirectK: the row's terms into f, then k direct additions per output.
// Larger k, van Herk straight from the terms, the running sums in registers: backwards over
// the k-segments (from t = 0) that hold outputs, g[t] = Σ from t to the end of t's segment,
// written to out for t < L; then forwards from t = k, pre[t] = Σ from the start of t's
// segment to t, added to out[t − k + 1] unless that starts a segment (the window [u, u + k)
// is g[u] + pre[u + k − 1], or g[u] alone). Terms read by both passes (L > k) are computed
// twice, each time fused into its running sum (two multiply-adds per channel), not stored
// in f and loaded again: 6 % less per call at k = 7 (circular and zeros, N = 1000 digits,
// AVX-512; a 64-byte store fewer per register and term). Writing each output once, with a
// segment's sums in registers, saved nothing more.
//
// wk (optional, k floats): a weighted window instead of the box, out[u] = Σ_r wk[r]·f(u + r)
// (els_soft's separable Gaussian, g(δ) = g₁(δy)·g₁(δx)), always by direct sums: k fused
// multiply-adds per output, positive weights on nonnegative terms (no cancellation).
template <int64_t NB, int64_t CC>
void row_box(const MapRow<NB, CC>& row, int64_t L, int64_t k, float* f, float* out,
             const float* wk = nullptr) {
  constexpr int64_t V = NB / kLanes;
  const int64_t T = L + k - 1;
  vf run[V];
  if (k <= kShiftDirectK || wk != nullptr) {
    for (int64_t t = 0; t < T; ++t) {
      row.term(t, run);
#pragma GCC unroll 16
      for (int64_t e = 0; e < V; ++e) store(f + t * NB + e * kLanes, run[e]);
    }
    if (wk != nullptr) {
      // Two outputs at a time, the window's k terms outermost: 2·V independent sums (one
      // sum over k terms alone is a chain of k dependent multiply-adds, latency-bound), and
      // the k − 1 terms the two windows share loaded once.
      int64_t u = 0;
      for (; u + 1 < L; u += 2) {
        const float* fu = f + u * NB;
        vf s0[V], s1[V];
#pragma GCC unroll 16
        for (int64_t e = 0; e < V; ++e) {
          s0[e] = wk[0] * load(fu + e * kLanes);
          s1[e] = wk[0] * load(fu + NB + e * kLanes);
        }
        for (int64_t r = 1; r < k; ++r) {
          const float wr = wk[r];
#pragma GCC unroll 16
          for (int64_t e = 0; e < V; ++e) {
            s0[e] += wr * load(fu + r * NB + e * kLanes);
            s1[e] += wr * load(fu + (r + 1) * NB + e * kLanes);
          }
        }
#pragma GCC unroll 16
        for (int64_t e = 0; e < V; ++e) {
          store(out + u * NB + e * kLanes, s0[e]);
          store(out + (u + 1) * NB + e * kLanes, s1[e]);
        }
      }
      for (; u < L; ++u) {
        const float* fu = f + u * NB;
        vf s0[V];
#pragma GCC unroll 16
        for (int64_t e = 0; e < V; ++e) s0[e] = wk[0] * load(fu + e * kLanes);
        for (int64_t r = 1; r < k; ++r) {
          const float wr = wk[r];
#pragma GCC unroll 16
          for (int64_t e = 0; e < V; ++e) s0[e] += wr * load(fu + r * NB + e * kLanes);
        }
#pragma GCC unroll 16
        for (int64_t e = 0; e < V; ++e) store(out + u * NB + e * kLanes, s0[e]);
      }
      return;
    }
    for (int64_t u = 0; u < L; ++u) {
      const float* fu = f + u * NB;
#pragma GCC unroll 16
      for (int64_t e = 0; e < V; ++e) {
        vf sum = load(fu + e * kLanes);
        for (int64_t r = 1; r < k; ++r) sum += load(fu + r * NB + e * kLanes);
        store(out + u * NB + e * kLanes, sum);
      }
    }
    return;
  }
  const int64_t Lg = std::min(T, (L + k - 1) / k * k);
  for (int64_t s0 = (Lg - 1) / k * k; s0 >= 0; s0 -= k) {
#pragma GCC unroll 16
    for (int64_t e = 0; e < V; ++e) run[e] = vf{};
    for (int64_t t = std::min(s0 + k, Lg) - 1; t >= s0; --t) {
      row.add(t, run);
      if (t < L) {
#pragma GCC unroll 16
        for (int64_t e = 0; e < V; ++e) store(out + t * NB + e * kLanes, run[e]);
      }
    }
  }
  for (int64_t t = k; t < T; ++t) {
    if (t % k == 0) {
#pragma GCC unroll 16
      for (int64_t e = 0; e < V; ++e) run[e] = vf{};
    }
    row.add(t, run);
    const int64_t u = t - k + 1;
    if (u % k != 0) {
#pragma GCC unroll 16
      for (int64_t e = 0; e < V; ++e) {
        float* o = out + u * NB + e * kLanes;
        store(o, load(o) + run[e]);
      }
    }
  }
}

// The k-row window sums down one column of the row box sums (NB floats at offset o of each
// row, rows[t] for t < T = L + k − 1), by van Herk / Gil-Werman: rows cut into segments of k
// from t = 0; the window [u, u + k) is g[u] + pre[u + k − 1], g[u] the sum from u to the end
// of u's segment (within the first L_g = min(T, ⌈L/k⌉k) rows), pre[t] the sum from the start
// of t's segment to t (g[u] alone when u starts a segment). G registers of the column at a
// time (kColumnGroup: independent sums side by side, few enough registers for AVX2, SSE and
// NEON), one segment at a time: its g in gk (k·NB floats, in L1), pre as running sums in
// registers. out(u, e, sum) gets the window of rows [u, u + k) for registers e … e + G − 1.
//
// A column at a time, not a row of windows at a time: the whole map's g (T rows of a row's
// L·NB floats, ~370 KB at k = 7 on 32×32) and a running pre row went through L2 in separate
// passes, a quarter of a k = 7 call (AVX-512 EPYC). The additions and their order are the
// same, so the sums are the same.
constexpr int64_t kColumnGroup = 4;

template <int64_t NB, typename Out>
inline void column_windows(const float* const* rows, int64_t o, int64_t L, int64_t k, float* gk,
                           Out&& out) {
  constexpr int64_t G = std::min<int64_t>(NB / kLanes, kColumnGroup);
  static_assert((NB / kLanes) % G == 0, "whole groups of registers");
  const int64_t T = L + k - 1, Lg = std::min(T, (L + k - 1) / k * k);
  for (int64_t e0 = 0; e0 < NB / kLanes; e0 += G) {
    const int64_t oe = o + e0 * kLanes;
    for (int64_t s0 = 0; s0 < L; s0 += k) {
      vf run[G];
#pragma GCC unroll 16
      for (int64_t e = 0; e < G; ++e) run[e] = vf{};
      for (int64_t t = std::min(s0 + k, Lg) - 1; t >= s0; --t) {
        const float* rt = rows[t] + oe;
#pragma GCC unroll 16
        for (int64_t e = 0; e < G; ++e) {
          run[e] = load(rt + e * kLanes) + run[e];
          store(gk + (t - s0) * NB + (e0 + e) * kLanes, run[e]);
        }
      }
      vf pre[G];
      const int64_t u1 = std::min(s0 + k, L);
      for (int64_t u = s0; u < u1; ++u) {
        vf sum[G];
        const float* gu = gk + (u - s0) * NB + e0 * kLanes;
        if (u == s0) {
#pragma GCC unroll 16
          for (int64_t e = 0; e < G; ++e) sum[e] = load(gu + e * kLanes);
        } else {
          const float* next = rows[u + k - 1] + oe;
#pragma GCC unroll 16
          for (int64_t e = 0; e < G; ++e) {
            pre[e] = u == s0 + 1 ? load(next + e * kLanes) : pre[e] + load(next + e * kLanes);
            sum[e] = load(gu + e * kLanes) + pre[e];
          }
        }
        out(u, e0, sum);
      }
    }
  }
}

// The online softmax state of every query pixel: PixelStates' kSums partial sums per pixel
// and its skip of weights below e^−kNegligible of the running maximum, fed a row of pixels at
// a time: first each pixel's maximum (and the rare rescale), then every exponential of the
// row in one loop, whose iterations are independent (one pixel's exps alone leave the core
// waiting on their dependency chain).
class RowStates {
 public:
  static constexpr int64_t kRegC = 4;   // channels whose sums are kept in registers

  RowStates(int64_t pixels, int64_t c)
      : c_(c), mx_(pixels, kNegInf), lanes_(pixels * (c + 1) * kSums, 0.0f) {}

  // Pixel pix[r] (r < count) gets the NB logits logit + r·NB, whose maximum is bmax[r], with
  // values vals[r] + ch·ch_stride + j. CC: the channels if at most kRegC, else 0.
  template <int64_t NB, int64_t CC>
  void add_row(int64_t count, const int64_t* pix, const float* logit, const float* bmax,
               const float* const* vals, int64_t ch_stride) {
    constexpr int64_t R = kSums / kLanes;
    const int64_t S = (c_ + 1) * kSums;
    if (static_cast<int64_t>(live_.size()) < count) live_.resize(count);
    for (int64_t r = 0; r < count; ++r) {
      const float block_max = bmax[r];
      float& mx = mx_[pix[r]];
      RescaleTo(block_max, mx, lanes_.data() + pix[r] * S, S);
      // Skipped: every candidate so far absent, or every logit below the floor (≥, not >:
      // when mx − kNegligible rounds to mx, the maximum itself must stay).
      live_[r] = mx != kNegInf && block_max >= mx - kNegligible;
    }
    for (int64_t r = 0; r < count; ++r) {
      if (!live_[r]) continue;
      const float m = mx_[pix[r]], floor = m - kNegligible;
      float* ln = lanes_.data() + pix[r] * S;
      const float* lg = logit + r * NB;
      const float* v = vals[r];
      if constexpr (CC > 0) {
        vf total[R], acc[CC][R];
        for (int64_t q = 0; q < R; ++q) {
          total[q] = load(ln + q * kLanes);
          for (int64_t ch = 0; ch < CC; ++ch) acc[ch][q] = load(ln + (ch + 1) * kSums + q * kLanes);
        }
        for (int64_t j = 0; j < NB; j += kLanes) {
          const int64_t q = (j % kSums) / kLanes;
          const vf l = load(lg + j);
          vf p;
          if (!live_weights(l, m, floor, p)) continue;
          total[q] += p;
          for (int64_t ch = 0; ch < CC; ++ch) acc[ch][q] += p * load(v + ch * ch_stride + j);
        }
        for (int64_t q = 0; q < R; ++q) {
          store(ln + q * kLanes, total[q]);
          for (int64_t ch = 0; ch < CC; ++ch) store(ln + (ch + 1) * kSums + q * kLanes, acc[ch][q]);
        }
      } else {                                // any C: the sums in memory
        for (int64_t j = 0; j < NB; j += kLanes) {
          float* lq = ln + j % kSums;
          const vf l = load(lg + j);
          vf p;
          if (!live_weights(l, m, floor, p)) continue;
          store(lq, load(lq) + p);
          for (int64_t ch = 0; ch < c_; ++ch) {
            float* la = lq + (ch + 1) * kSums;
            store(la, load(la) + p * load(v + ch * ch_stride + j));
          }
        }
      }
    }
  }

  // The state (max, total, acc) of every pixel, as PixelStates::write.
  void write(float* mx, float* tot, float* acc) const {
    WriteLaneStates(mx_, lanes_, c_, mx, tot, acc);
  }

  static float hmax(vf v) {
#if defined(__AVX512F__)
    return _mm512_reduce_max_ps(reinterpret_cast<__m512>(v));
#else
    float m = v[0];
    for (int64_t l = 1; l < kLanes; ++l) m = std::max(m, v[l]);
    return m;
#endif
  }

 private:
  int64_t c_;
  Floats mx_, lanes_;
  std::vector<char> live_;
};

// Per axis shift, the query and candidate coordinates of its query range (wrapped on a
// periodic axis) times a stride, computed once per item: the pair loops had an integer
// division per pair for them.
struct AxisPairs {
  std::vector<int64_t> q, c;
};

std::vector<AxisPairs> axis_pairs(const std::vector<AxisShift>& shifts, int64_t n, bool periodic,
                                  int64_t stride) {
  std::vector<AxisPairs> out(shifts.size());
  for (size_t i = 0; i < shifts.size(); ++i) {
    const AxisShift& s = shifts[i];
    for (int64_t u = 0; u < s.len; ++u) {
      int64_t qi = s.i0 + u, ci = qi + s.d;
      if (periodic) qi %= n, ci %= n;
      out[i].q.push_back(qi * stride), out[i].c.push_back(ci * stride);
    }
  }
  return out;
}

struct ShiftShape {
  int64_t b, h, w, c, n, k, mode, mode_x;  // mode: of the rows (and columns if mode_x < 0)
};

// One item: query image b against images [n0, n1), every shift; state over all H·W pixels.
// CC: the number of channels when at most RowStates::kRegC, else 0 (any C).
// wk: optional per-axis weights [k] (the window wk[δy]·wk[δx] instead of the k×k box).
template <int64_t NB, int64_t CC>
void shift_item(const ShiftShape& s, const float* x, const float* coef, const float* images,
                const float* log_w, const float* wk, int64_t b, int64_t n0, int64_t n1,
                float* mx, float* tot, float* acc) {
  const int64_t H = s.h, W = s.w, C = CC > 0 ? CC : s.c, k = s.k, m = k / 2, HW = H * W;
  const bool periodic = s.mode == 2 || s.mode == 3;
  const float a = coef[2 * b], b2 = coef[2 * b + 1];
  const float scale = -0.5f / b2;                       // the jnp form's logit scale
  const float* xb = x + b * HW * C;
  const std::vector<AxisShift> sy = axis_shifts(H, k, s.mode),
                               sx = axis_shifts(W, k, s.mode_x < 0 ? s.mode : s.mode_x);
  std::vector<AxisMap> my, mxs;
  for (const AxisShift& v : sy) my.push_back(axis_map(v, H, k, periodic));
  for (const AxisShift& v : sx) mxs.push_back(axis_map(v, W, k, periodic));
  const std::vector<AxisPairs> wy = axis_pairs(sy, H, periodic, W),
                               wx = axis_pairs(sx, W, periodic, 1);
  int64_t max_lx = 0, max_ly = 0;
  for (const AxisShift& v : sx) max_lx = std::max(max_lx, v.len);
  for (const AxisShift& v : sy) max_ly = std::max(max_ly, v.len);
  const int64_t max_tx = max_lx + 2 * m, max_ty = max_ly + 2 * m;
  // Floats per row-box row, one cache line more than a row's max_lx·NB: the column walks read
  // T rows of R at one offset, and rows a multiple of 4 KiB apart (32·128 floats) fall in the
  // same L1 set (the interior kernel's row_stride, above).
  const int64_t RE = max_lx * NB + 16;
  // The packed block: pixel-major, NB images per pixel, one plane per channel; log w.
  Floats pack(C * HW * NB), lw(NB);
  // A row of map terms; the row box sums of every distinct map row (R), a zero row; the
  // segment's van Herk sums; a row or column of pairs' logits, their maxima, pixels, values.
  Floats frow(max_tx * NB), R(max_ty * RE), zero_row(RE, 0.0f);
  // (A column of pairs holds up to max_ly pixels, one more for the weighted window's odd
  // last pair, whose second window reads the zero row rptr[T] and is not used.)
  const int64_t max_l = std::max(max_lx, max_ly + 1);   // pixels in a row or a column
  Floats gk(k * NB), logit(max_l * NB), bmax(max_l), lmax(max_ly * kLanes);
  std::vector<const float*> rptr(max_ty + 1), vptr(max_l);
  std::vector<int64_t> pix(max_l);
  RowStates states(HW, C);
  const vf av = vf{} + a, sv = vf{} + scale;
  const bool direct = k <= kShiftDirectK || wk != nullptr;
  for (int64_t nb0 = n0; nb0 < n1; nb0 += NB) {
    const int64_t nb = std::min(NB, n1 - nb0);
    for (int64_t j = 0; j < nb; ++j) {
      const float* img = images + (nb0 + j) * HW * C;
      for (int64_t px = 0; px < HW; ++px)
        for (int64_t ch = 0; ch < C; ++ch) pack[(ch * HW + px) * NB + j] = img[px * C + ch];
      lw[j] = log_w[nb0 + j];
    }
    for (int64_t j = nb; j < NB; ++j) {                 // absent images: weight exactly 0
      for (int64_t r = 0; r < C * HW; ++r) pack[r * NB + j] = 0.0f;
      lw[j] = kNegInf;
    }
    for (size_t iy = 0; iy < sy.size(); ++iy) {
      const AxisShift& ay = sy[iy];
      const AxisMap& ty = my[iy];
      const int64_t* qrow = wy[iy].q.data();    // query and candidate rows, times W
      const int64_t* crow = wy[iy].c.data();
      for (size_t ix = 0; ix < sx.size(); ++ix) {
        const AxisShift& ax = sx[ix];
        const int64_t Lx = ax.len;
        const int64_t* qcol = wx[ix].q.data();  // query and candidate columns
        const int64_t* ccol = wx[ix].c.data();
        // Row box sums of the map's distinct rows (later rows of a periodic axis repeat).
        for (int64_t t = 0; t < ty.distinct; ++t) {
          const int64_t py = ty.p[t];
          if (py < 0) {
            rptr[t] = zero_row.data();
            continue;
          }
          const MapRow<NB, CC> row{xb + py * W * C, pack.data() + ty.q[t] * W * NB, HW * NB,
                                   C, av, mxs[ix]};
          rptr[t] = R.data() + t * RE;
          row_box<NB, CC>(row, Lx, k, frow.data(), R.data() + t * RE, wk);
        }
        for (int64_t t = ty.distinct; t < ty.T; ++t) rptr[t] = rptr[t - H];
        rptr[ty.T] = zero_row.data();
        if (wk != nullptr) {
          // The weighted window's column sums, a column of pairs at a time (its k + 1 rows of
          // NB floats stay in L1 while the window slides down; a row of windows at a time read
          // every row of R from L2 about k/2 times), two outputs at a time with the taps
          // outermost: 2·V independent sums, the k − 1 rows the two windows share loaded once.
          constexpr int64_t V = NB / kLanes;
          for (int64_t v = 0; v < Lx; ++v) {
            const int64_t xi = qcol[v], xj = ccol[v];
            const int64_t o = v * NB;
            for (int64_t u = 0; u < ay.len; ++u) {
              pix[u] = qrow[u] + xi;
              vptr[u] = pack.data() + (crow[u] + xj) * NB;
            }
            for (int64_t u = 0; u < ay.len; u += 2) {
              // (an odd last pair's second window reads the zero row rptr[T]; not used)
              const float* const* rows = rptr.data() + u;
              vf s0[V], s1[V];
#pragma GCC unroll 16
              for (int64_t e = 0; e < V; ++e) {
                s0[e] = wk[0] * load(rows[0] + o + e * kLanes);
                s1[e] = wk[0] * load(rows[1] + o + e * kLanes);
              }
              for (int64_t r = 1; r < k; ++r) {
                const float wr = wk[r];
#pragma GCC unroll 16
                for (int64_t e = 0; e < V; ++e) {
                  s0[e] += wr * load(rows[r] + o + e * kLanes);
                  s1[e] += wr * load(rows[r + 1] + o + e * kLanes);
                }
              }
              vf m0 = vf{} + kNegInf, m1 = m0;
#pragma GCC unroll 16
              for (int64_t e = 0; e < V; ++e) {
                const vf lwe = load(lw.data() + e * kLanes);
                const vf l0 = s0[e] * sv + lwe, l1 = s1[e] * sv + lwe;
                store(logit.data() + u * NB + e * kLanes, l0);
                store(logit.data() + (u + 1) * NB + e * kLanes, l1);
                m0 = l0 > m0 ? l0 : m0;
                m1 = l1 > m1 ? l1 : m1;
              }
              bmax[u] = RowStates::hmax(m0);
              bmax[u + 1] = RowStates::hmax(m1);
            }
            states.add_row<NB, CC>(ay.len, pix.data(), logit.data(), bmax.data(), vptr.data(),
                                   HW * NB);
          }
          continue;
        }
        if (!direct) {
          // Van Herk's column sums fused with the logits and their maxima, a column of pairs
          // at a time (``column_windows``), each column then added to the pixels' states.
          for (int64_t v = 0; v < Lx; ++v) {
            const int64_t xi = qcol[v], xj = ccol[v];
            for (int64_t u = 0; u < ay.len; ++u) {
              pix[u] = qrow[u] + xi;
              vptr[u] = pack.data() + (crow[u] + xj) * NB;
            }
            column_windows<NB>(rptr.data(), v * NB, ay.len, k, gk.data(),
                               [&](int64_t u, int64_t e0, const vf* sum) {
              constexpr int64_t G = std::min<int64_t>(NB / kLanes, kColumnGroup);
              vf vmax = e0 == 0 ? vf{} + kNegInf : load(lmax.data() + u * kLanes);
#pragma GCC unroll 16
              for (int64_t e = 0; e < G; ++e) {
                const vf lg = sum[e] * sv + load(lw.data() + (e0 + e) * kLanes);
                store(logit.data() + u * NB + (e0 + e) * kLanes, lg);
                vmax = lg > vmax ? lg : vmax;
              }
              store(lmax.data() + u * kLanes, vmax);
            });
            for (int64_t u = 0; u < ay.len; ++u)
              bmax[u] = RowStates::hmax(load(lmax.data() + u * kLanes));
            states.add_row<NB, CC>(ay.len, pix.data(), logit.data(), bmax.data(), vptr.data(),
                                   HW * NB);
          }
          continue;
        }
        // k ≤ kShiftDirectK: the column box sums by k direct additions, fused with the logits
        // and their maxima, a row of pairs at a time, each row then added to the pixels' states.
        for (int64_t u = 0; u < ay.len; ++u) {
          const float* const* rows = rptr.data() + u;
          for (int64_t v = 0; v < Lx; ++v) {
            pix[v] = qrow[u] + qcol[v];
            vptr[v] = pack.data() + (crow[u] + ccol[v]) * NB;
            const int64_t o = v * NB;
            vf vmax = vf{} + kNegInf;
            for (int64_t e = 0; e < NB; e += kLanes) {
              vf sum = load(rows[0] + o + e);
              for (int64_t r = 1; r < k; ++r) sum += load(rows[r] + o + e);
              const vf lg = sum * sv + load(lw.data() + e);
              store(logit.data() + o + e, lg);
              vmax = lg > vmax ? lg : vmax;
            }
            bmax[v] = RowStates::hmax(vmax);
          }
          states.add_row<NB, CC>(Lx, pix.data(), logit.data(), bmax.data(), vptr.data(),
                                 HW * NB);
        }
      }
    }
  }
  states.write(mx, tot, acc);
}

// uint8 pixels u → (u − 127.5)/127.5 into ``out`` (resized to ``count``). Not inlined: the
// shift-map items' code stays as it is for float32 images.
__attribute__((noinline)) void convert_pixels(const uint8_t* src, int64_t count,
                                              Floats& out) {
  out.resize(count);
  for (int64_t e = 0; e < count; ++e) out[e] = (static_cast<float>(src[e]) - 127.5f) / 127.5f;
}

ffi::Error ShiftCall(ffi::ThreadPool& pool, const ffi::Buffer<ffi::F32>& x,
                     const ffi::Buffer<ffi::F32>& coef, const ffi::AnyBuffer& images,
                     const ffi::Buffer<ffi::F32>& log_w, const float* wk, int64_t k,
                     int64_t mode, int64_t mode_x, ffi::ResultBuffer<ffi::F32>& out_max,
                     ffi::ResultBuffer<ffi::F32>& out_total,
                     ffi::ResultBuffer<ffi::F32>& out_acc) {
  const auto xd = x.dimensions(), fd = coef.dimensions(), id = images.dimensions();
  const auto ld = log_w.dimensions();
  if (xd.size() != 4 || fd.size() != 2 || id.size() != 4 || ld.size() != 1) {
    return ffi::Error::InvalidArgument(
        "expected x [B, H, W, C], coef [B, 2], images [N, H, W, C], log_w [N]");
  }
  const ShiftShape ss{xd[0], xd[1], xd[2], xd[3], id[0], k, mode, mode_x};
  if (fd[0] != ss.b || fd[1] != 2 || id[1] != ss.h || id[2] != ss.w || id[3] != ss.c ||
      ld[0] != ss.n || ss.n < 1) {
    return ffi::Error::InvalidArgument("image shapes do not match the queries");
  }
  if (k < 1 || k % 2 == 0) return ffi::Error::InvalidArgument("k must be odd and positive");
  if (mode < 0 || mode > 5) return ffi::Error::InvalidArgument("mode must be 0 … 5");
  if (mode_x < -1 || mode_x > 5) return ffi::Error::InvalidArgument("mode_x must be -1 … 5");
  const int64_t mx_mode = mode_x < 0 ? mode : mode_x;
  const bool zero_rule = mode == 1 || mode >= 4 || mx_mode == 1 || mx_mode >= 4;
  if ((mode == 2 || mode == 3) != (mx_mode == 2 || mx_mode == 3)) {
    return ffi::Error::InvalidArgument("both axes periodic (modes 2, 3) or neither");
  }
  if ((mode >= 1 || mx_mode >= 1) &&
      (k > std::min(ss.h, ss.w) || (zero_rule && k == std::min(ss.h, ss.w)))) {
    return ffi::Error::InvalidArgument("k too large for this mode (zeros with k ≥ min(H, W) "
                                       "is mode 0)");
  }
  const Shape s{ss.b, ss.h, ss.w, ss.c, ss.n, k};
  const float *xp = x.typed_data(), *cp = coef.typed_data();
  const float* lp = log_w.typed_data();
  const bool u8 = images.element_type() == ffi::DataType::U8;
  if (!u8 && images.element_type() != ffi::DataType::F32) {
    return ffi::Error::InvalidArgument("images must be float32 or uint8");
  }
  const int64_t per_image = ss.h * ss.w * ss.c;
  run_items(pool, s, ss.h * ss.w, kShiftBlock,
            [&](int64_t b, int64_t n0, int64_t n1, float* mx, float* tot, float* acc) {
              constexpr int64_t NB = kShiftBlock;
              const float* ip = static_cast<const float*>(images.untyped_data());
              const float* lw = lp;
              Floats converted;
              if (u8) {
                // uint8 pixels (held at a quarter of float32's bytes) read as (u − 127.5)/127.5
                // (docs/theory.md §9; float division of exact operands, correctly rounded: the
                // values of core.data.UINT8_TO_UNIT), the item's images at a time. One
                // instantiation of shift_item for both: a second (uint8) one made GCC inline
                // less of the first, and circular k = 7 took 6–11 % longer.
                convert_pixels(static_cast<const uint8_t*>(images.untyped_data()) +
                                   n0 * per_image, (n1 - n0) * per_image, converted);
                ip = converted.data();                   // images n0 … n1 − 1 as 0 … n1 − n0 − 1
                lw = lp + n0;
                n1 -= n0;
                n0 = 0;
              }
              switch (ss.c) {
                case 1: return shift_item<NB, 1>(ss, xp, cp, ip, lw, wk, b, n0, n1, mx, tot, acc);
                case 2: return shift_item<NB, 2>(ss, xp, cp, ip, lw, wk, b, n0, n1, mx, tot, acc);
                case 3: return shift_item<NB, 3>(ss, xp, cp, ip, lw, wk, b, n0, n1, mx, tot, acc);
                case 4: return shift_item<NB, 4>(ss, xp, cp, ip, lw, wk, b, n0, n1, mx, tot, acc);
                default: return shift_item<NB, 0>(ss, xp, cp, ip, lw, wk, b, n0, n1, mx, tot, acc);
              }
            },
            out_max->typed_data(), out_total->typed_data(), out_acc->typed_data());
  return ffi::Error::Success();
}

ffi::Error ShiftMapImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                        ffi::Buffer<ffi::F32> coef, ffi::AnyBuffer images,
                        ffi::Buffer<ffi::F32> log_w, ffi::Buffer<ffi::F32> weights, int64_t k,
                        int64_t mode, int64_t mode_x, ffi::ResultBuffer<ffi::F32> out_max,
                        ffi::ResultBuffer<ffi::F32> out_total,
                        ffi::ResultBuffer<ffi::F32> out_acc) {
  const auto wd = weights.dimensions();
  if (wd.size() != 1 || (wd[0] != 0 && wd[0] != k)) {
    return ffi::Error::InvalidArgument(
        "expected weights [k] (a separable window) or [0] (the box)");
  }
  return ShiftCall(pool, x, coef, images, log_w, wd[0] == 0 ? nullptr : weights.typed_data(), k,
                   mode, mode_x, out_max, out_total, out_acc);
}

}  // namespace

// Images per block of the shift-map kernel, for the engine probes (a probe gives the kernel
// two blocks per core: ``native.shift_block``).
extern "C" int64_t ElsShiftBlock() { return kShiftBlock; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(ElsShiftMapSoftmax, ShiftMapImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>() /* x */
                                  .Arg<ffi::Buffer<ffi::F32>>() /* coef */
                                  .Arg<ffi::AnyBuffer>() /* images: float32 or uint8 */
                                  .Arg<ffi::Buffer<ffi::F32>>() /* log_w */
                                  .Arg<ffi::Buffer<ffi::F32>>() /* weights */
                                  .Attr<int64_t>("k")
                                  .Attr<int64_t>("mode")
                                  .Attr<int64_t>("mode_x") /* −1: the rows' mode */
                                  .Ret<ffi::Buffer<ffi::F32>>() /* max */
                                  .Ret<ffi::Buffer<ffi::F32>>() /* total */
                                  .Ret<ffi::Buffer<ffi::F32>>() /* acc */);
