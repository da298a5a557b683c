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
// of images is carried through the product image, its two box sums, the logits, the online
// softmax and the weighted sums while it is in the core's cache. On XLA:CPU each of these
// stages is its own pass over every chunk of logits (nothing fuses with a reduce-window or a
// dot): 1.3–2.6 ns per pair at C = 3 for LS, 1.8–2.2 for ELS zeros at k = 11.
//
// Layouts: q [B, H, W, C]; coef [B, 2] = (a, b²); cen [C+1, H, W, N] (centred images; the
// last row, ones in a LocalBank, is not read); half_sq [H, W, N] (½‖W_i(c_n)‖², border cut;
// for interior i the whole window); log_w [N]. Outputs: max [B, P], total [B, P],
// acc [B, P, C] over the P state pixels (LS: all H·W; ELS: the (H−2m)(W−2m) interior ones).
//
// Work is split into items (query image, range of kItemImages images), taken by the caller
// and XLA's intra-op thread pool; items are dealt to worker slots round-robin and each slot
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
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kLanes = 16;          // partial sums per reduction (one AVX-512 register)
constexpr int64_t kItemImages = 256;    // images per work item
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Sixteen floats (one AVX-512 register; GCC splits it on narrower CPUs), for the per-pixel
// stage, where the compiler's own vectoriser gave up on the fused loops.
typedef float vf __attribute__((vector_size(64)));
typedef int32_t vi __attribute__((vector_size(64)));
static_assert(kLanes == 16, "vf holds kLanes floats");

inline vf load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

inline void store(float* p, vf v) { std::memcpy(p, &v, sizeof(v)); }

// exp(x) for x ≤ 0 (a logit minus its running maximum): x = n·ln2 + r, |r| ≤ ln2/2 (ln2 split
// in two so that n·ln2 is exact), exp(r) by a degree-7 polynomial (relative error ~1e-7, like
// XLA's own), 2^n from the exponent bits. Below −87 (and for −inf, an absent image) the
// result is exactly 0, so absent images contribute nothing.
inline vf exp_nonpositive(vf v) {
  const vf lo = v < -87.0f ? vf{} - 87.0f : v;
  const vf t = lo * 1.4426950408889634f;
  const vf fn = (t + 12582912.0f) - 12582912.0f;          // round to nearest (|t| < 2^22)
  const vf r = (lo - fn * 0.693145751953125f) - fn * 1.428606765330187e-06f;
  vf p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const vi bits = (__builtin_convertvector(fn, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return v < -87.0f ? vf{} : p * scale;
}

struct Shape {
  int64_t b, h, w, c, n, k;
};

// Images [nb0, nb0 + block) of the bank: element (row r, image j) at data[r·stride + j].
// The last, partial block is a copy padded with absent images (values 0, log w −inf), so
// that every loop runs over whole blocks.
class BlockView {
 public:
  const float* cen;       // rows (channel, pixel): C·H·W
  const float* half_sq;   // rows pixel: H·W
  const float* log_w;     // one row
  int64_t stride;

  BlockView(const Shape& s, const float* cen_, const float* half_sq_, const float* log_w_,
            int64_t nb0, int64_t block, std::vector<float>& tail) {
    const int64_t HW = s.h * s.w, C = s.c, N = s.n, nb = std::min(block, N - nb0);
    cen = cen_ + nb0, half_sq = half_sq_ + nb0, log_w = log_w_ + nb0, stride = N;
    if (nb == block) return;
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

// Per state pixel: the running max and lane partial sums of Σ p (lanes 0 … 15) and Σ p·c_ch
// (lanes 16·(ch+1) …), relative to the max; reduced over lanes once, at the end of an item.
class PixelStates {
 public:
  PixelStates(int64_t pixels, int64_t c)
      : c_(c), mx_(pixels, kNegInf), lanes_(pixels * (c + 1) * kLanes, 0.0f) {}

  // Adds a block of NB logits of pixel i with values vals + ch·ch_stride + j.
  template <int64_t NB>
  void add(int64_t i, const float* logit, vf block_max_lanes, const float* vals,
           int64_t ch_stride) {
    float block_max = kNegInf;
    for (int64_t l = 0; l < kLanes; ++l) block_max = std::max(block_max, block_max_lanes[l]);
    float& mx = mx_[i];
    float* ln = lanes_.data() + i * (c_ + 1) * kLanes;
    if (block_max > mx) {                     // a new maximum: rescale (rare after a few blocks)
      const float f = mx == kNegInf ? 0.0f : std::exp(mx - block_max);
      for (int64_t l = 0; l < (c_ + 1) * kLanes; ++l) ln[l] *= f;
      mx = block_max;
    }
    if (mx == kNegInf) return;                // every candidate so far is absent
    // p = exp(logit − max) one register at a time, added at once to the lane sums (p is
    // never stored).
    vf total = load(ln);
    for (int64_t j = 0; j < NB; j += kLanes) {
      const vf pv = exp_nonpositive(load(logit + j) - mx);
      total += pv;
      for (int64_t ch = 0; ch < c_; ++ch) {
        float* lc = ln + (ch + 1) * kLanes;
        store(lc, load(lc) + pv * load(vals + ch * ch_stride + j));
      }
    }
    store(ln, total);
  }

  // The state (max, total, acc) of every pixel.
  void write(float* mx, float* tot, float* acc) const {
    const int64_t pixels = static_cast<int64_t>(mx_.size());
    for (int64_t i = 0; i < pixels; ++i) {
      const float* ln = lanes_.data() + i * (c_ + 1) * kLanes;
      mx[i] = mx_[i];
      float t = 0.0f;
      for (int64_t l = 0; l < kLanes; ++l) t += ln[l];
      tot[i] = t;
      for (int64_t ch = 0; ch < c_; ++ch) {
        float a = 0.0f;
        for (int64_t l = 0; l < kLanes; ++l) a += ln[(ch + 1) * kLanes + l];
        acc[i * c_ + ch] = a;
      }
    }
  }

 private:
  int64_t c_;
  std::vector<float> mx_, lanes_;
};

// s1 = a/b², s2 = a²/b² of query image b, in scalar float: the same whatever batch the image
// is in (XLA's vectorised division of a batch can differ by an ulp).
inline void coefficients(const float* coef, int64_t b, float& s1, float& s2) {
  const float a = coef[2 * b], b2 = coef[2 * b + 1];
  s1 = a / b2, s2 = (a * a) / b2;
}

// The product image of query image qb with block images shifted by (dy, dx), summed over
// channels, at rows [y0, y1) and columns [x0, x1): prod[(y·W + x)·NB + j].
template <int64_t NB>
void product(const Shape& s, const float* qb, const BlockView& v, int64_t dy, int64_t dx,
             int64_t y0, int64_t y1, int64_t x0, int64_t x1, float* prod) {
  const int64_t W = s.w, C = s.c, HW = s.h * s.w;
  for (int64_t y = y0; y < y1; ++y) {
    for (int64_t x = x0; x < x1; ++x) {
      const int64_t i = y * W + x, shifted = (y + dy) * W + x + dx;
      for (int64_t j = 0; j < NB; j += kLanes) {
        vf out = vf{};
        for (int64_t ch = 0; ch < C; ++ch)
          out += qb[i * C + ch] * load(v.cen + (ch * HW + shifted) * v.stride + j);
        store(prod + i * NB + j, out);
      }
    }
  }
}

// vert[x·NB + j] = Σ_{y' ∈ [r0, r1]} prod[(y'·W + x)·NB + j] for x in [x0, x1).
template <int64_t NB>
void column_sums(const float* prod, int64_t W, int64_t r0, int64_t r1, int64_t x0,
                 int64_t x1, float* vert) {
  for (int64_t x = x0; x < x1; ++x) {
    for (int64_t j = 0; j < NB; j += kLanes) {
      vf out = vf{};
      for (int64_t yy = r0; yy <= r1; ++yy) out += load(prod + (yy * W + x) * NB + j);
      store(vert + x * NB + j, out);
    }
  }
}

// pre[(x − x0)·NB + j] = Σ_{x' ∈ [x0, x)} vert[x'·NB + j] for x in [x0, x1]: the sum over a
// window's k columns is then one difference (measured 1.2–1.3× faster at k = 11 than k
// additions; a running sum down the rows as well lost float32 accuracy at t = 0.02).
template <int64_t NB>
void prefix_sums(const float* vert, int64_t x0, int64_t x1, float* pre) {
  for (int64_t j = 0; j < NB; j += kLanes) store(pre + j, vf{});
  for (int64_t x = x0; x < x1; ++x)
    for (int64_t j = 0; j < NB; j += kLanes)
      store(pre + (x - x0 + 1) * NB + j, load(pre + (x - x0) * NB + j) + load(vert + x * NB + j));
}

// logit[j] = s1·(pre[c1] − pre[c0]) − s2·hs[j] + lw[j] (pre from prefix_sums: the window's
// columns are prefix entries [c0, c1)); returns the lanes' maxima.
template <int64_t NB>
inline vf window_logits(const float* pre, int64_t c0, int64_t c1, const float* hs,
                        const float* lw, float s1, float s2, float* logit) {
  vf vmax = vf{} + kNegInf;
  for (int64_t j = 0; j < NB; j += kLanes) {
    const vf box = load(pre + c1 * NB + j) - load(pre + c0 * NB + j);
    const vf lg = s1 * box - s2 * load(hs + j) + load(lw + j);
    store(logit + j, lg);
    vmax = lg > vmax ? lg : vmax;
  }
  return vmax;
}

constexpr int64_t kLocalBlock = 128;   // images per block, LS
constexpr int64_t kInteriorBlock = 32; // images per block, ELS interior (reused over offsets)
// Items are whole blocks, so the only partial block is the last one of the bank (BlockView).
static_assert(kItemImages % kLocalBlock == 0 && kItemImages % kInteriorBlock == 0);

// LS, one item: query image b, images [n0, n1); state over the H·W pixels.
void local_item(const Shape& s, const float* q, const float* coef, const float* cen,
                const float* half_sq, const float* log_w, int64_t b, int64_t n0, int64_t n1,
                float* mx, float* tot, float* acc) {
  constexpr int64_t NB = kLocalBlock;
  const int64_t H = s.h, W = s.w, C = s.c, m = s.k / 2, HW = H * W;
  float s1, s2;
  coefficients(coef, b, s1, s2);
  const float* qb = q + b * HW * C;
  std::vector<float> prod(HW * NB), vert(W * NB), pre((W + 1) * NB), tail;
  alignas(64) float logit[NB];
  PixelStates states(HW, C);
  for (int64_t nb0 = n0; nb0 < n1; nb0 += NB) {
    const BlockView v(s, cen, half_sq, log_w, nb0, NB, tail);
    // Rows of the product image are computed just before the first output row needing them.
    product<NB>(s, qb, v, 0, 0, 0, std::min(H, m), 0, W, prod.data());
    for (int64_t y = 0; y < H; ++y) {
      if (y + m < H) product<NB>(s, qb, v, 0, 0, y + m, y + m + 1, 0, W, prod.data());
      column_sums<NB>(prod.data(), W, std::max<int64_t>(0, y - m), std::min(H - 1, y + m), 0,
                      W, vert.data());
      prefix_sums<NB>(vert.data(), 0, W, pre.data());
      for (int64_t x = 0; x < W; ++x) {
        const int64_t i = y * W + x;
        const vf vmax = window_logits<NB>(pre.data(), std::max<int64_t>(0, x - m),
                                          std::min(W, x + m + 1), v.half_sq + i * v.stride,
                                          v.log_w, s1, s2, logit);
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
  const int64_t H = s.h, W = s.w, C = s.c, m = s.k / 2, HW = H * W;
  const int64_t hq = H - 2 * m, wq = W - 2 * m;
  float s1, s2;
  coefficients(coef, b, s1, s2);
  const float* qb = q + b * HW * C;
  std::vector<float> prod(HW * NB), vert(W * NB), pre((W + 1) * NB), tail;
  alignas(64) float logit[NB];
  PixelStates states(hq * wq, C);
  for (int64_t nb0 = n0; nb0 < n1; nb0 += NB) {
    const BlockView v(s, cen, half_sq, log_w, nb0, NB, tail);
    for (int64_t dy = -(hq - 1); dy <= hq - 1; ++dy) {
      // Query rows whose window and whose candidate's window (d rows away) are interior.
      const int64_t qy0 = std::max(m, m - dy), qy1 = std::min(H - m, H - m - dy);
      for (int64_t dx = -(wq - 1); dx <= wq - 1; ++dx) {
        const int64_t qx0 = std::max(m, m - dx), qx1 = std::min(W - m, W - m - dx);
        product<NB>(s, qb, v, dy, dx, qy0 - m, qy1 + m, qx0 - m, qx1 + m, prod.data());
        for (int64_t y = qy0; y < qy1; ++y) {
          column_sums<NB>(prod.data(), W, y - m, y + m, qx0 - m, qx1 + m, vert.data());
          prefix_sums<NB>(vert.data(), qx0 - m, qx1 + m, pre.data());
          for (int64_t x = qx0; x < qx1; ++x) {
            const int64_t shifted = (y + dy) * W + x + dx;
            const int64_t c0 = x - qx0;             // pre starts at column qx0 − m
            const vf vmax = window_logits<NB>(pre.data(), c0, c0 + 2 * m + 1,
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
void run_items(ffi::ThreadPool& pool, const Shape& s, int64_t P, Item item_fn, float* mxo,
               float* toto, float* acco) {
  const int64_t C = s.c, per_b = std::max<int64_t>(1, (s.n + kItemImages - 1) / kItemImages);
  const int64_t items = s.b * per_b;
  // The caller works too: num_threads workers in all (more would oversubscribe the cores).
  const int64_t helpers =
      std::min<int64_t>(items - 1, std::max<int64_t>(0, pool.num_threads() - 1));
  const int64_t workers = helpers + 1;
  // One running state per (worker slot, query image): max [P], total [P], acc [P·C].
  const int64_t state = P * (2 + C);
  std::vector<float> slot_states(workers * s.b * state, 0.0f);
  for (int64_t w = 0; w < workers * s.b; ++w)
    std::fill(slot_states.begin() + w * state, slot_states.begin() + w * state + P, kNegInf);
  float* slotp = slot_states.data();
  // Slot w takes items w, w + workers, ... and merges them in that order, whichever thread
  // runs it: the result does not depend on the pool's timing (nor on the rest of the batch).
  auto work = std::make_shared<Work>();
  auto drain = [=, &s]() {
    std::vector<float> one(state);
    for (;;) {
      const int64_t slot = work->next_slot.fetch_add(1);
      if (slot >= workers) return;
      for (int64_t it = slot; it < items; it += workers) {
        const int64_t b = it / per_b, n0 = (it % per_b) * kItemImages;
        item_fn(b, n0, std::min(s.n, n0 + kItemImages), one.data(), one.data() + P,
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
  run_items(pool, s, P,
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
