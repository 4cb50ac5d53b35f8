// Decode attention on CPU that reads the paged KV cache in place.
//
// One work item is (decode sequence, KV head): the query heads that share the KV head walk the
// sequence's blocks together, so each cached key and value row is read once for the whole group,
// straight from its block (the PyTorch reference first gathers the blocks into a contiguous copy,
// then reads that copy again). Softmax is online, rescaled once per block; scores and the
// accumulator are float32 whatever the cache dtype.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// bfloat16 is the top half of a float32: a shift, which vectorizes (c10's conversion may not).
template <typename T>
inline float to_float(T x) {
  return static_cast<float>(x);
}
template <>
inline float to_float<c10::BFloat16>(c10::BFloat16 x) {
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

template <typename T>
void decode(at::Tensor& out, const at::Tensor& query, const at::Tensor& key_cache,
            const at::Tensor& value_cache, const at::Tensor& block_tables,
            const at::Tensor& context_lens, const at::Tensor& seq_ids, const at::Tensor& rows,
            double scale) {
  const int64_t n = seq_ids.size(0);
  const int64_t num_heads = query.size(1), head_dim = query.size(2);
  const int64_t block_size = key_cache.size(1), num_kv_heads = key_cache.size(2);
  const int64_t group = num_heads / num_kv_heads;
  const int64_t max_blocks = block_tables.size(1);
  const int64_t token_stride = num_kv_heads * head_dim, block_stride = block_size * token_stride;
  const int64_t q_stride = query.stride(0), out_stride = out.stride(0);
  const T* __restrict__ q = query.data_ptr<T>();
  const T* __restrict__ kc = key_cache.data_ptr<T>();
  const T* __restrict__ vc = value_cache.data_ptr<T>();
  T* __restrict__ o = out.data_ptr<T>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  const int64_t* seqs = seq_ids.data_ptr<int64_t>();
  const int64_t* row_of = rows.data_ptr<int64_t>();
  // -ffast-math assumes no infinities: "no score yet" is a finite number no real score reaches.
  const float kNoScore = -1e30f;

  at::parallel_for(0, n * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * head_dim), acc(group * head_dim);
    std::vector<float> scores(group * block_size), m(group), l(group);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t i = item / num_kv_heads, h = item % num_kv_heads;
      const int64_t seq = seqs[i], len = lens[seq];
      const T* qrow = q + row_of[i] * q_stride + h * group * head_dim;
      for (int64_t x = 0; x < group * head_dim; ++x) qf[x] = to_float(qrow[x]) * scale;
      std::fill(acc.begin(), acc.end(), 0.0f);
      std::fill(m.begin(), m.end(), kNoScore);
      std::fill(l.begin(), l.end(), 0.0f);
      for (int64_t b = 0; b * block_size < len; ++b) {
        const int64_t block = tables[seq * max_blocks + b];
        const int64_t tokens = std::min(block_size, len - b * block_size);
        const T* kb = kc + block * block_stride + h * head_dim;
        const T* vb = vc + block * block_stride + h * head_dim;
        for (int64_t t = 0; t < tokens; ++t) {
          const T* k = kb + t * token_stride;
          for (int64_t g = 0; g < group; ++g) {
            const float* qg = qf.data() + g * head_dim;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < head_dim; ++d) dot += qg[d] * to_float(k[d]);
            scores[g * block_size + t] = dot;
          }
        }
        for (int64_t g = 0; g < group; ++g) {
          float* s = scores.data() + g * block_size;
          float block_max = *std::max_element(s, s + tokens);
          const float new_m = std::max(m[g], block_max);
          const float corr = std::exp(m[g] - new_m);  // 0 on the first block (m = kNoScore)
          float* a = acc.data() + g * head_dim;
          float sum = l[g] * corr;
#pragma omp simd
          for (int64_t d = 0; d < head_dim; ++d) a[d] *= corr;
          // One vectorized exp over the block (libmvec under -ffast-math), not one call a token.
#pragma omp simd reduction(+ : sum)
          for (int64_t t = 0; t < tokens; ++t) {
            s[t] = std::exp(s[t] - new_m);
            sum += s[t];
          }
          for (int64_t t = 0; t < tokens; ++t) {
            const float p = s[t];
            const T* v = vb + t * token_stride;
#pragma omp simd
            for (int64_t d = 0; d < head_dim; ++d) a[d] += p * to_float(v[d]);
          }
          l[g] = sum;
          m[g] = new_m;
        }
      }
      T* orow = o + row_of[i] * out_stride + h * group * head_dim;
      for (int64_t g = 0; g < group; ++g) {
        const float inv = 1.0f / l[g];
        for (int64_t d = 0; d < head_dim; ++d)
          orow[g * head_dim + d] = static_cast<T>(acc[g * head_dim + d] * inv);
      }
    }
  });
}

void paged_decode(at::Tensor out, const at::Tensor& query, const at::Tensor& key_cache,
                  const at::Tensor& value_cache, const at::Tensor& block_tables,
                  const at::Tensor& context_lens, const at::Tensor& seq_ids,
                  const at::Tensor& rows, double scale) {
  TORCH_CHECK(query.dim() == 3 && key_cache.dim() == 4, "query [T, H, D], cache [B, bs, Hkv, D]");
  TORCH_CHECK(query.stride(2) == 1 && query.stride(1) == query.size(2), "query rows contiguous");
  TORCH_CHECK(out.stride(2) == 1 && out.stride(1) == out.size(2), "out rows contiguous");
  TORCH_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(), "contiguous KV cache");
  TORCH_CHECK(query.scalar_type() == key_cache.scalar_type() &&
                  out.scalar_type() == query.scalar_type(),
              "query, cache and out share a dtype");
  TORCH_CHECK(query.size(1) % key_cache.size(2) == 0, "query heads per KV head");
  for (const at::Tensor* t : {&block_tables, &context_lens, &seq_ids, &rows})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->is_contiguous(), "int64 contiguous indices");
  switch (query.scalar_type()) {
    case at::kFloat:
      decode<float>(out, query, key_cache, value_cache, block_tables, context_lens, seq_ids, rows,
                    scale);
      break;
    case at::kBFloat16:
      decode<c10::BFloat16>(out, query, key_cache, value_cache, block_tables, context_lens,
                            seq_ids, rows, scale);
      break;
    case at::kHalf:
      decode<c10::Half>(out, query, key_cache, value_cache, block_tables, context_lens, seq_ids,
                        rows, scale);
      break;
    default:
      TORCH_CHECK(false, "paged_decode: float32, bfloat16 or float16, got ", query.scalar_type());
  }
}

}  // namespace

TORCH_LIBRARY(kvpilot_cpu, m) {
  m.def(
      "paged_decode(Tensor(a!) out, Tensor query, Tensor key_cache, Tensor value_cache, "
      "Tensor block_tables, Tensor context_lens, Tensor seq_ids, Tensor rows, float scale) -> ()");
}

TORCH_LIBRARY_IMPL(kvpilot_cpu, CPU, m) { m.impl("paged_decode", &paged_decode); }
