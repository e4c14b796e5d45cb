// C++ CPU kernels, built on first use by kernels/cpu_kernels.py (which
// documents them): paged decode attention and RMSNorm, float32.
//
// Paged decode attention: one query token per sequence against its blocks of
// the paged KV cache, reading only its own context_len positions; the
// contract is paged_decode_attention's (kernels/paged_attention.py).
//
// One task per (sequence, kv head), split across torch's intra-op threads:
//   1. scores s[g][l] = scale * q_g . k_l for the G query heads of the kv
//      head, block by block (8 positions at a time; the 8 partial-sum
//      vectors are reduced together), the next block prefetched,
//   2. s[g][:] <- exp(s[g][:] - max), their sum; lse = max + log(sum),
//   3. out_g = sum_l s[g][l] v_l / sum.
// Vectors are GCC/Clang vector extensions of 8 floats: AVX2 code with -mavx2,
// plain SSE/NEON code elsewhere.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

namespace {

typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

inline v8 load8(const float* p) { v8 r; std::memcpy(&r, p, sizeof r); return r; }
inline void store8(float* p, v8 x) { std::memcpy(p, &x, sizeof x); }
inline v8 splat(float x) { return (v8){x, x, x, x, x, x, x, x}; }
inline v8 vmax(v8 a, v8 b) { return a > b ? a : b; }
inline float hmax(v8 x) { float m = x[0]; for (int i = 1; i < 8; ++i) m = x[i] > m ? x[i] : m; return m; }
inline float hsum(v8 x) { float s = 0; for (int i = 0; i < 8; ++i) s += x[i]; return s; }

#if defined(__clang__)
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, (v8i){__VA_ARGS__})
#endif

// r[j] = sum of the lanes of x[j]: pairwise sums of interleaved lanes, 3 rounds
inline v8 transpose_sum8(const v8 x[8]) {
  v8 a[4], b[2];
  for (int i = 0; i < 4; ++i)
    a[i] = SHUFFLE(x[2 * i], x[2 * i + 1], 0, 8, 2, 10, 4, 12, 6, 14) +
           SHUFFLE(x[2 * i], x[2 * i + 1], 1, 9, 3, 11, 5, 13, 7, 15);
  for (int i = 0; i < 2; ++i)
    b[i] = SHUFFLE(a[2 * i], a[2 * i + 1], 0, 1, 8, 9, 4, 5, 12, 13) +
           SHUFFLE(a[2 * i], a[2 * i + 1], 2, 3, 10, 11, 6, 7, 14, 15);
  return SHUFFLE(b[0], b[1], 0, 1, 2, 3, 8, 9, 10, 11) +
         SHUFFLE(b[0], b[1], 4, 5, 6, 7, 12, 13, 14, 15);
}

// exp(x) for x <= 0: Cephes' expf polynomial (relative error ~1e-7); x below
// -87 is clamped (weight ~1e-38 instead of a denormal or 0).
inline v8 exp8(v8 x) {
  x = vmax(x, splat(-87.0f));
  const v8 magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  const v8 t = x * splat(1.44269504088896341f) + magic;
  const v8 n = t - magic;
  const v8i e = ((v8i)t - (v8i)magic) + 127;
  const v8 r = x - n * splat(0.693359375f) - n * splat(-2.12194440e-4f);
  v8 p = splat(1.9875691500e-4f);
  p = p * r + splat(1.3981999507e-3f);
  p = p * r + splat(8.3334519073e-3f);
  p = p * r + splat(4.1665795894e-2f);
  p = p * r + splat(1.6666665459e-1f);
  p = p * r + splat(5.0000001201e-1f);
  p = p * r * r + r + splat(1.0f);
  return p * (v8)(e << 23);
}

// s[g * sn + l] = scale * q_g . k_l for the `rows` rows of k (row stride ksl)
template <int G, int D>
void scores(const float* q, const float* k, int64_t ksl, int64_t rows, float scale, float* s,
            int64_t sn) {
  constexpr int C = D / 8;
  int64_t l0 = 0;
  for (; l0 + 8 <= rows; l0 += 8) {
    for (int g = 0; g < G; ++g) {
      v8 qg[C];
      for (int c = 0; c < C; ++c) qg[c] = load8(q + g * D + 8 * c);
      v8 x[8];
      for (int j = 0; j < 8; ++j) {
        const float* kr = k + (l0 + j) * ksl;
        v8 acc = qg[0] * load8(kr);
        for (int c = 1; c < C; ++c) acc += qg[c] * load8(kr + 8 * c);
        x[j] = acc;
      }
      store8(s + g * sn + l0, transpose_sum8(x) * splat(scale));
    }
  }
  for (; l0 < rows; ++l0) {
    const float* kr = k + l0 * ksl;
    for (int g = 0; g < G; ++g) {
      v8 acc = splat(0.f);
      for (int c = 0; c < C; ++c) acc += load8(q + g * D + 8 * c) * load8(kr + 8 * c);
      s[g * sn + l0] = hsum(acc) * scale;
    }
  }
}

// acc[g] += sum_l s[g * sn + l] v_l over the `rows` rows of v (row stride vsl)
template <int G, int D>
void accumulate(const float* s, int64_t sn, const float* v, int64_t vsl, int64_t rows,
                v8 (&acc)[G][D / 8]) {
  constexpr int C = D / 8;
  for (int64_t l = 0; l < rows; ++l) {
    const float* vr = v + l * vsl;
    v8 vv[C];
    for (int c = 0; c < C; ++c) vv[c] = load8(vr + 8 * c);
    for (int g = 0; g < G; ++g) {
      const v8 p = splat(s[g * sn + l]);
      for (int c = 0; c < C; ++c) acc[g][c] += p * vv[c];
    }
  }
}

inline void prefetch_rows(const float* p, int64_t stride, int64_t rows, int dim) {
  for (int64_t r = 0; r < rows; ++r)
    for (int c = 0; c < dim; c += 16) __builtin_prefetch(p + r * stride + c);
}

// s[:n] <- exp(s[:n] - max); returns (max, sum)
inline std::pair<float, float> softmax_numerators(float* s, int64_t n) {
  v8 m8 = splat(-3.0e38f);
  int64_t l = 0;
  for (; l + 8 <= n; l += 8) m8 = vmax(m8, load8(s + l));
  float m = hmax(m8);
  for (; l < n; ++l) m = s[l] > m ? s[l] : m;
  v8 sum8 = splat(0.f);
  for (l = 0; l + 8 <= n; l += 8) {
    const v8 e = exp8(load8(s + l) - splat(m));
    store8(s + l, e);
    sum8 += e;
  }
  float sum = hsum(sum8);
  for (; l < n; ++l) {
    s[l] = exp8(splat(s[l] - m))[0];
    sum += s[l];
  }
  return {m, sum};
}

// Where one sequence's context lives: `table` lists its blocks (stride
// table_stride); row t of block b of kv head h is at base + b * block_stride
// + t * row_stride + h * head_stride.
struct Paged {
  const float* k;
  const float* v;
  int64_t block_stride_k, row_stride_k, block_stride_v, row_stride_v;
  int64_t block_size;
  const int32_t* table;
  int64_t table_stride;
};

// One (sequence, kv head): the G query heads q (G, D) against the first n
// positions; out (G, D) and lse (G,). s is scratch of G * n floats.
template <int G, int D>
void attend(const float* q, const Paged& p, int64_t n, float scale, float* out, float* lse,
            float* s) {
  constexpr int C = D / 8;
  if (n == 0) {
    for (int g = 0; g < G; ++g) {
      for (int d = 0; d < D; ++d) out[g * D + d] = 0.f;
      lse[g] = -std::numeric_limits<float>::infinity();
    }
    return;
  }
  const int64_t blocks = (n + p.block_size - 1) / p.block_size;
  auto rows_of = [&](int64_t j) { return std::min(p.block_size, n - j * p.block_size); };
  auto k_block = [&](int64_t j) { return p.k + p.table[j * p.table_stride] * p.block_stride_k; };
  auto v_block = [&](int64_t j) { return p.v + p.table[j * p.table_stride] * p.block_stride_v; };
  for (int64_t j = 0; j < blocks; ++j) {
    if (j + 1 < blocks) prefetch_rows(k_block(j + 1), p.row_stride_k, rows_of(j + 1), D);
    scores<G, D>(q, k_block(j), p.row_stride_k, rows_of(j), scale, s + j * p.block_size, n);
  }
  float inv[G];
  for (int g = 0; g < G; ++g) {
    const auto [m, sum] = softmax_numerators(s + g * n, n);
    inv[g] = 1.f / sum;
    lse[g] = m + std::log(sum);
  }
  v8 acc[G][C];
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) acc[g][c] = splat(0.f);
  for (int64_t j = 0; j < blocks; ++j) {
    if (j + 1 < blocks) prefetch_rows(v_block(j + 1), p.row_stride_v, rows_of(j + 1), D);
    accumulate<G, D>(s + j * p.block_size, n, v_block(j), p.row_stride_v, rows_of(j), acc);
  }
  for (int g = 0; g < G; ++g)
    for (int c = 0; c < C; ++c) store8(out + g * D + 8 * c, acc[g][c] * splat(inv[g]));
}

using AttendFn = void (*)(const float*, const Paged&, int64_t, float, float*, float*, float*);

template <int G>
AttendFn pick_head_dim(int64_t head_dim) {
  switch (head_dim) {
    case 32: return attend<G, 32>;
    case 64: return attend<G, 64>;
    case 128: return attend<G, 128>;
    default: return nullptr;
  }
}

// Keep in step with SUPPORTED_GROUPS / SUPPORTED_HEAD_DIMS in kernels/cpu_kernels.py.
AttendFn pick(int64_t group, int64_t head_dim) {
  switch (group) {
    case 1: return pick_head_dim<1>(head_dim);
    case 2: return pick_head_dim<2>(head_dim);
    case 4: return pick_head_dim<4>(head_dim);
    case 8: return pick_head_dim<8>(head_dim);
    default: return nullptr;
  }
}

// Shapes and dtypes are checked by the Python wrapper (kernels/cpu_kernels.py);
// here only what would make the kernel read out of bounds.
std::tuple<at::Tensor, at::Tensor> paged_decode_attention(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
    const at::Tensor& block_tables, const at::Tensor& context_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1 && q.scalar_type() == at::kFloat,
              "q must be float32 (B, H, D) with a unit last stride");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() &&
                  k_cache.stride(3) == 1 && v_cache.stride(3) == 1 &&
                  k_cache.scalar_type() == at::kFloat && v_cache.scalar_type() == at::kFloat,
              "k_cache and v_cache must be float32 (num_blocks, block_size, KVH, D) with a "
              "unit last stride");
  TORCH_CHECK(block_tables.scalar_type() == at::kInt && context_lens.scalar_type() == at::kInt,
              "block_tables and context_lens must be int32");
  const int64_t batch = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t num_blocks = k_cache.size(0), block_size = k_cache.size(1);
  const int64_t kv_heads = k_cache.size(2), group = heads / kv_heads;
  const AttendFn fn = pick(group, dim);
  TORCH_CHECK(fn != nullptr && group * kv_heads == heads && k_cache.size(3) == dim,
              "unsupported shapes: H=", heads, " KVH=", kv_heads, " D=", dim);
  const int32_t* lens = context_lens.data_ptr<int32_t>();
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int64_t ts0 = block_tables.stride(0), ts1 = block_tables.stride(1);
  int64_t longest = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = lens[b * context_lens.stride(0)];
    TORCH_CHECK(n >= 0 && (n + block_size - 1) / block_size <= block_tables.size(1),
                "context_lens[", b, "]=", n, " needs more blocks than block_tables has");
    for (int64_t j = 0; j * block_size < n; ++j) {
      const int32_t id = tables[b * ts0 + j * ts1];
      TORCH_CHECK(id >= 0 && id < num_blocks, "block_tables[", b, ", ", j, "]=", id,
                  " outside [0, ", num_blocks, ")");
    }
    longest = std::max(longest, n);
  }
  at::Tensor out = at::empty({batch, heads, dim}, q.options());
  at::Tensor lse = at::empty({batch, heads}, q.options());
  const at::Tensor qc = q.contiguous();
  const float* qp = qc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  float* lp = lse.data_ptr<float>();
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  at::parallel_for(0, batch * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s(group * std::max<int64_t>(longest, 1));
    for (int64_t t = begin; t < end; ++t) {
      const int64_t b = t / kv_heads, h = t % kv_heads;
      const Paged p{kp + h * k_cache.stride(2), vp + h * v_cache.stride(2),
                    k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
                    block_size, tables + b * ts0, ts1};
      fn(qp + t * group * dim, p, lens[b * context_lens.stride(0)], sc, op + t * group * dim,
         lp + t * group, s.data());
    }
  });
  return {out, lse};
}


// out[t] = x[t] * rsqrt(mean(x[t]^2) + eps) * weight, row by row
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat,
              "x must be a contiguous float32 (T, d) tensor");
  const int64_t rows = x.size(0), d = x.size(1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == d && weight.is_contiguous() &&
                  weight.scalar_type() == at::kFloat,
              "weight must be a contiguous float32 (d,) tensor");
  at::Tensor out = at::empty_like(x);
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float e = static_cast<float>(eps);
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* xr = xp + t * d;
      float* orow = op + t * d;
      v8 sq = splat(0.f);
      int64_t i = 0;
      for (; i + 8 <= d; i += 8) {
        const v8 y = load8(xr + i);
        sq += y * y;
      }
      float ss = hsum(sq);
      for (; i < d; ++i) ss += xr[i] * xr[i];
      const float r = 1.f / std::sqrt(ss / static_cast<float>(d) + e);
      for (i = 0; i + 8 <= d; i += 8) store8(orow + i, load8(xr + i) * splat(r) * load8(wp + i));
      for (; i < d; ++i) orow[i] = xr[i] * r * wp[i];
    }
  });
  return out;
}

// How many threads at::parallel_for runs `tasks` tasks of grain 1 on: what the
// kernels above get (1 when the build lacks OpenMP, whatever torch's setting).
int64_t parallel_threads(int64_t tasks) {
  std::vector<char> seen(std::max<int64_t>(at::get_num_threads(), 1) + 1, 0);
  at::parallel_for(0, tasks, 1, [&](int64_t, int64_t) {
    const int64_t t = at::get_thread_num();
    seen[std::min<int64_t>(t, static_cast<int64_t>(seen.size()) - 1)] = 1;
  });
  int64_t n = 0;
  for (char c : seen) n += c;
  return n;
}

}  // namespace

TORCH_LIBRARY(baton_cpu, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor context_lens, float scale) -> (Tensor, Tensor)");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("parallel_threads(int tasks) -> int");
}

TORCH_LIBRARY_IMPL(baton_cpu, CPU, m) {
  m.impl("paged_decode_attention", paged_decode_attention);
  m.impl("rms_norm", rms_norm);
}

TORCH_LIBRARY_IMPL(baton_cpu, CompositeExplicitAutograd, m) {
  m.impl("parallel_threads", parallel_threads);
}
