// The local score machine's softmax state in one fused CPU pass (an XLA FFI custom call).
//
// What it computes is local.py's streamed LS pass (SPEC §2), for queries q (centred on the
// bank's mean), per query image b the coefficients a and b² (s1 = a/b², s2 = a²/b²), and a
// LocalBank:
//
//   logit[b, i, n] = s1 · Σ_{j ∈ W_i} q[b, j] · c_n[j]  −  s2 · half_sq[i, n]  +  log_w[n]
//
// with W_i the k×k window around pixel i cut at the image border, then the online softmax
// state of every (b, i) over all n: max, Σ exp(logit − max), Σ exp(logit − max) · c_n[i].
//
// Why a kernel: on XLA:CPU the product image, its two box sums, the logits, max, exp and the
// weighted sum are separate passes over every chunk of logits (nothing fuses with a
// reduce-window or a dot), which costs 1.3–2.6 ns per (pixel, image) pair at C = 3. Here a
// block of NB images is carried through every stage while it is in the core's cache.
//
// Layouts (as local.LocalBank): q [B, H, W, C]; coef [B, 2] = (a, b²); cen [C+1, H, W, N]
// (centred images, the last row of ones is not read); half_sq [H, W, N]; log_w [N].
// Outputs: max [B, H, W], total [B, H, W], acc [B, H, W, C].
//
// Work is split into items (query image, range of kItemImages images), taken by the caller
// and XLA's intra-op thread pool; each worker merges its items' states into its own running
// state (softmax.merge), and the workers' states are merged at the end: memory independent
// of N.

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

constexpr int64_t kBlock = 128;          // images carried through the stages together
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
  const vf scale = reinterpret_cast<const vf&>(bits);
  return v < -87.0f ? vf{} : p * scale;
}

struct Shape {
  int64_t b, h, w, c, n, k;
};

// A block of kBlock images of the bank: element (row r, image j) at data[r·stride + j].
struct BlockView {
  const float* cen;       // rows (channel, pixel): C·H·W
  const float* half_sq;   // rows pixel: H·W
  const float* log_w;     // one row
  int64_t stride;
};

// One item: query image b, images [n0, n1). Writes its softmax state over the H·W pixels:
// mx [HW], tot [HW], acc [HW·C].
void run_item(const Shape& s, const float* q, const float* coef, const float* cen,
              const float* half_sq, const float* log_w, int64_t b, int64_t n0, int64_t n1,
              float* mx, float* tot, float* acc) {
  const int64_t H = s.h, W = s.w, C = s.c, N = s.n, m = s.k / 2, HW = H * W;
  // s1 = a/b², s2 = a²/b² from (a, b²) here, in scalar float: the same for a query image
  // whatever batch it is in (XLA's vectorised division of a batch can differ by an ulp).
  const float a = coef[2 * b], b2 = coef[2 * b + 1];
  const float s1 = a / b2, s2 = (a * a) / b2;
  const float* qb = q + b * HW * C;
  // prod: the product image of each block image with the query (rows computed just before
  // the first output row that needs them); vert: one output row's sums over k rows.
  std::vector<float> prod(HW * kBlock), vert(W * kBlock), tail;
  // Per pixel: lane partial sums of Σ p (index 0) and Σ p·c_ch (1 … C), relative to mx.
  std::vector<float> lanes(HW * (C + 1) * kLanes, 0.0f);
  alignas(64) float logit[kBlock];
  std::fill(mx, mx + HW, kNegInf);
  for (int64_t nb0 = n0; nb0 < n1; nb0 += kBlock) {
    const int64_t nb = std::min(kBlock, n1 - nb0);
    BlockView v{cen + nb0, half_sq + nb0, log_w + nb0, N};
    if (nb < kBlock) {
      // The last, partial block: a copy padded with absent images (values 0, log w −inf),
      // so that every loop below runs over exactly kBlock images.
      tail.assign((C * HW + HW + 1) * kBlock, 0.0f);
      for (int64_t r = 0; r < C * HW; ++r)
        std::copy(cen + r * N + nb0, cen + r * N + nb0 + nb, tail.data() + r * kBlock);
      for (int64_t r = 0; r < HW; ++r)
        std::copy(half_sq + r * N + nb0, half_sq + r * N + nb0 + nb,
                  tail.data() + (C * HW + r) * kBlock);
      float* lw = tail.data() + (C * HW + HW) * kBlock;
      std::fill(lw, lw + kBlock, kNegInf);
      std::copy(log_w + nb0, log_w + nb0 + nb, lw);
      v = BlockView{tail.data(), tail.data() + C * HW * kBlock, lw, kBlock};
    }
    auto product_row = [&](int64_t y) {     // Σ_ch q[y, x, ch] · c[ch, y, x, j]
      for (int64_t i = y * W; i < (y + 1) * W; ++i) {
        for (int64_t j = 0; j < kBlock; j += kLanes) {
          vf out = vf{};
          for (int64_t ch = 0; ch < C; ++ch)
            out += qb[i * C + ch] * load(v.cen + (ch * HW + i) * v.stride + j);
          store(prod.data() + i * kBlock + j, out);
        }
      }
    };
    for (int64_t y = 0; y < std::min(H, m); ++y) product_row(y);
    for (int64_t y = 0; y < H; ++y) {
      if (y + m < H) product_row(y + m);
      // Sum over the k rows of each window (rows outside the image do not count).
      const int64_t y0 = std::max<int64_t>(0, y - m), y1 = std::min(H - 1, y + m);
      for (int64_t x = 0; x < W; ++x) {
        for (int64_t j = 0; j < kBlock; j += kLanes) {
          vf out = vf{};
          for (int64_t yy = y0; yy <= y1; ++yy) out += load(prod.data() + (yy * W + x) * kBlock + j);
          store(vert.data() + x * kBlock + j, out);
        }
      }
      // Per pixel: the sum over the k columns, logits, online softmax, weighted sums.
      for (int64_t x = 0; x < W; ++x) {
        const int64_t i = y * W + x;
        const int64_t x0 = std::max<int64_t>(0, x - m), x1 = std::min(W - 1, x + m);
        const float* hs = v.half_sq + i * v.stride;
        vf vmax = vf{} + kNegInf;
        for (int64_t j = 0; j < kBlock; j += kLanes) {       // box sum over k columns, logits
          vf box = vf{};
          for (int64_t xx = x0; xx <= x1; ++xx) box += load(vert.data() + xx * kBlock + j);
          const vf lg = s1 * box - s2 * load(hs + j) + load(v.log_w + j);
          store(logit + j, lg);
          vmax = lg > vmax ? lg : vmax;
        }
        float block_max = kNegInf;
        for (int64_t l = 0; l < kLanes; ++l) block_max = std::max(block_max, vmax[l]);
        float* ln = lanes.data() + i * (C + 1) * kLanes;
        if (block_max > mx[i]) {            // a new maximum: rescale the sums (rare after
          const float f = mx[i] == kNegInf ? 0.0f : std::exp(mx[i] - block_max);  // a few blocks)
          for (int64_t l = 0; l < (C + 1) * kLanes; ++l) ln[l] *= f;
          mx[i] = block_max;
        }
        if (mx[i] == kNegInf) continue;     // every image so far is absent
        const float ref = mx[i];
        // p = exp(logit − max) one register at a time, added at once to the lane sums of
        // Σ p and Σ p·c_ch (p is never stored).
        vf total = load(ln);
        for (int64_t j = 0; j < kBlock; j += kLanes) {
          const vf pv = exp_nonpositive(load(logit + j) - ref);
          total += pv;
          for (int64_t ch = 0; ch < C; ++ch) {
            float* lc = ln + (ch + 1) * kLanes;
            store(lc, load(lc) + pv * load(v.cen + (ch * HW + i) * v.stride + j));
          }
        }
        store(ln, total);
      }
    }
  }
  for (int64_t i = 0; i < HW; ++i) {         // the lanes' partial sums, once per pixel
    const float* ln = lanes.data() + i * (C + 1) * kLanes;
    float t = 0.0f;
    for (int64_t l = 0; l < kLanes; ++l) t += ln[l];
    tot[i] = t;
    for (int64_t ch = 0; ch < C; ++ch) {
      float a = 0.0f;
      for (int64_t l = 0; l < kLanes; ++l) a += ln[(ch + 1) * kLanes + l];
      acc[i * C + ch] = a;
    }
  }
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

ffi::Error LocalSoftmaxImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q,
                            ffi::Buffer<ffi::F32> coef, ffi::Buffer<ffi::F32> cen,
                            ffi::Buffer<ffi::F32> half_sq, ffi::Buffer<ffi::F32> log_w,
                            int64_t k, ffi::ResultBuffer<ffi::F32> out_max,
                            ffi::ResultBuffer<ffi::F32> out_total,
                            ffi::ResultBuffer<ffi::F32> out_acc) {
  const auto qd = q.dimensions();
  const auto cd = cen.dimensions();
  if (qd.size() != 4 || cd.size() != 4) {
    return ffi::Error::InvalidArgument("q must be [B, H, W, C] and cen [C+1, H, W, N]");
  }
  const Shape s{qd[0], qd[1], qd[2], qd[3], cd[3], k};
  if (cd[0] != s.c + 1 || cd[1] != s.h || cd[2] != s.w || k < 1 || k % 2 == 0) {
    return ffi::Error::InvalidArgument("bank does not match the queries, or k is not odd");
  }
  const int64_t HW = s.h * s.w, C = s.c, per_b = std::max<int64_t>(1, (s.n + kItemImages - 1) / kItemImages);
  const int64_t items = s.b * per_b;
  // The caller works too: num_threads workers in all (more would oversubscribe the cores).
  const int64_t helpers = std::min<int64_t>(items - 1, std::max<int64_t>(0, pool.num_threads() - 1));
  const int64_t workers = helpers + 1;
  // One running state per (worker, query image): memory independent of N. Layout per slot
  // and b: max [HW], total [HW], acc [HW·C].
  const int64_t state = HW * (2 + C);
  std::vector<float> slot_states(workers * s.b * state, 0.0f);
  for (int64_t w = 0; w < workers * s.b; ++w)
    std::fill(slot_states.begin() + w * state, slot_states.begin() + w * state + HW, kNegInf);
  const float* qp = q.typed_data();
  const float* coefp = coef.typed_data();
  const float* cenp = cen.typed_data();
  const float* hsp = half_sq.typed_data();
  const float* lwp = log_w.typed_data();
  float* slotp = slot_states.data();
  // Items are dealt to the worker slots round-robin (slot w: items w, w + workers, ...) and
  // each slot merges its items in that order, whichever thread runs it: the result does not
  // depend on the thread pool's timing (nor on the other queries of the batch).
  auto work = std::make_shared<Work>();
  auto drain = [=, &s]() {
    std::vector<float> item(state);
    for (;;) {
      const int64_t slot = work->next_slot.fetch_add(1);
      if (slot >= workers) return;
      for (int64_t it = slot; it < items; it += workers) {
        const int64_t b = it / per_b, chunk = it % per_b;
        const int64_t n0 = chunk * kItemImages, n1 = std::min(s.n, n0 + kItemImages);
        run_item(s, qp, coefp, cenp, hsp, lwp, b, n0, n1, item.data(), item.data() + HW,
                 item.data() + 2 * HW);
        float* st = slotp + (slot * s.b + b) * state;
        for (int64_t i = 0; i < HW; ++i)
          merge_into(st[i], st[HW + i], st + 2 * HW + i * C, item[i], item[HW + i],
                     item.data() + 2 * HW + i * C, C);
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
  float* mxo = out_max->typed_data();
  float* toto = out_total->typed_data();
  float* acco = out_acc->typed_data();
  for (int64_t b = 0; b < s.b; ++b) {
    float* m = mxo + b * HW;
    float* t = toto + b * HW;
    float* a = acco + b * HW * C;
    std::fill(m, m + HW, kNegInf);
    std::fill(t, t + HW, 0.0f);
    std::fill(a, a + HW * C, 0.0f);
    for (int64_t w = 0; w < workers; ++w) {
      const float* st = slotp + (w * s.b + b) * state;
      for (int64_t i = 0; i < HW; ++i)
        merge_into(m[i], t[i], a + i * C, st[i], st[HW + i], st + 2 * HW + i * C, C);
    }
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ElsLocalSoftmax, LocalSoftmaxImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .Arg<ffi::Buffer<ffi::F32>>()   // coef
                                  .Arg<ffi::Buffer<ffi::F32>>()   // cen
                                  .Arg<ffi::Buffer<ffi::F32>>()   // half_sq
                                  .Arg<ffi::Buffer<ffi::F32>>()   // log_w
                                  .Attr<int64_t>("k")
                                  .Ret<ffi::Buffer<ffi::F32>>()   // max
                                  .Ret<ffi::Buffer<ffi::F32>>()   // total
                                  .Ret<ffi::Buffer<ffi::F32>>());  // acc
