// Weighted per-token cross-entropy on NVIDIA GPUs: the two primitives of
// datarater/kernels/primitives.py (forward, directional) in plain CUDA.
//
// Plain CUDA headers only, no torch: CI compile-checks this file with nvcc on machines without a
// GPU (or torch's CUDA headers). The torch glue lives in cross_entropy_launch.cpp.
//
// One thread block per row. A row is streamed with 16-byte vector loads when its length and
// address allow, else element by element. The forward keeps a running (max, sum) per thread
// (online softmax, rescaled only when the max grows: one exponential per element), reduced
// across the block; the directional pass reads the row (and the direction) once for p . D and
// once more to write.
//
// The fused forward + gradient (first-order training) holds each row in shared memory, split
// over a cluster of thread blocks (Hopper's distributed shared memory): the logits are read from
// memory once and the gradient written once, the least traffic there is. A second version holds
// the row in registers instead (16 or 32 logits per thread) and evaluates one exponential per
// logit instead of two; which one runs is the caller's choice (DATARATER_CE_FUSED_SLOTS).

#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "cross_entropy_cuda.h"

namespace {

constexpr int kThreads = 512;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_f(float x);
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }

// Elements per 16-byte vector.
template <typename T>
struct Vec {
  static constexpr int n = 16 / sizeof(T);
};

template <typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[Vec<T>::n]) {
  uint4 raw = *reinterpret_cast<const uint4*>(p);
  const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int k = 0; k < Vec<T>::n; ++k) out[k] = to_f(v[k]);
}

template <typename T>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[Vec<T>::n]) {
  uint4 raw;
  T* v = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int k = 0; k < Vec<T>::n; ++k) v[k] = from_f<T>(in[k]);
  *reinterpret_cast<uint4*>(p) = raw;
}

// Merge two (max, sum-of-exp) pairs. fmaxf passes over NaN, so a NaN is carried in the sum
// explicitly: once there, it stays (NaN times anything), and the row's lse is NaN as in torch.
__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
  if (isnan(m2) || isnan(s2)) {
    s = NAN;
    return;
  }
  const float mm = fmaxf(m, m2);
  if (mm == -INFINITY) return;  // both empty
  s = s * __expf(m - mm) + s2 * __expf(m2 - mm);
  m = mm;
}

// Adds a vector of logits to a running (max, sum of exp): the sum is rescaled only when the
// max grows (rarely, after the first vectors of a row), so a logit costs one exponential.
template <int n>
__device__ __forceinline__ void accumulate(float& m, float& s, const float (&x)[n]) {
  float mx = x[0];
#pragma unroll
  for (int k = 1; k < n; ++k) mx = fmaxf(mx, x[k]);
  if (mx > m) {
    s *= __expf(m - mx);  // 0 while m is -inf (s is 0 then too)
    m = mx;
  }
  if (m == -INFINITY) {  // nothing but masked logits so far: no inf - inf (and no exp to
#pragma unroll          // carry a NaN into the sum: fmaxf passed over it)
    for (int k = 0; k < n; ++k) s = isnan(x[k]) ? NAN : s;
    return;
  }
#pragma unroll
  for (int k = 0; k < n; ++k) s += __expf(x[k] - m);
}

__device__ __forceinline__ void block_max_sum(float& m, float& s) {
  __shared__ float sm[kWarps], ss[kWarps];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    merge(m, s, __shfl_xor_sync(0xffffffffu, m, off), __shfl_xor_sync(0xffffffffu, s, off));
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    sm[warp] = m;
    ss[warp] = s;
  }
  __syncthreads();
  if (warp == 0) {
    m = lane < kWarps ? sm[lane] : -INFINITY;
    s = lane < kWarps ? ss[lane] : 0.0f;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
      merge(m, s, __shfl_xor_sync(0xffffffffu, m, off), __shfl_xor_sync(0xffffffffu, s, off));
    }
    if (lane == 0) {
      sm[0] = m;
      ss[0] = s;
    }
  }
  __syncthreads();
  m = sm[0];
  s = ss[0];
}

__device__ __forceinline__ float block_sum(float x) {
  __shared__ float sh[kWarps];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) sh[warp] = x;
  __syncthreads();
  if (warp == 0) {
    x = lane < kWarps ? sh[lane] : 0.0f;
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
    if (lane == 0) sh[0] = x;
  }
  __syncthreads();
  x = sh[0];
  __syncthreads();  // sh is reused by the next call
  return x;
}

template <typename T>
__device__ __forceinline__ bool vectorizable(const T* row, int64_t v) {
  return (v % Vec<T>::n) == 0 && (reinterpret_cast<uintptr_t>(row) % 16) == 0;
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    ce_forward_kernel(const T* __restrict__ logits, const int64_t* __restrict__ targets,
                      const float* __restrict__ weights, int64_t v, int64_t ignore_index,
                      float* __restrict__ loss, float* __restrict__ lse_out,
                      float* __restrict__ nll_out) {
  const int64_t row = blockIdx.x;
  const T* z = logits + row * v;
  float m = -INFINITY, s = 0.0f;
  if (vectorizable(z, v)) {
    constexpr int n = Vec<T>::n;
    for (int64_t j = static_cast<int64_t>(threadIdx.x) * n; j < v; j += kThreads * n) {
      float x[n];
      load_vec(z + j, x);
      accumulate(m, s, x);
    }
  } else {
    for (int64_t j = threadIdx.x; j < v; j += kThreads) merge(m, s, to_f(z[j]), 1.0f);
  }
  block_max_sum(m, s);
  if (threadIdx.x == 0) {
    const float lse = v > 0 ? m + __logf(s) : 0.0f;
    const int64_t y = targets[row];
    const bool valid = y != ignore_index && v > 0;
    const float nll = valid ? lse - to_f(z[y]) : 0.0f;
    lse_out[row] = lse;
    nll_out[row] = nll;
    loss[row] = weights ? weights[row] * nll : nll;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    ce_directional_kernel(const T* __restrict__ logits, const int64_t* __restrict__ targets,
                          const float* __restrict__ lse_in, const T* __restrict__ direction,
                          const float* __restrict__ coef_h, const float* __restrict__ coef_g,
                          int64_t v, int64_t ignore_index, float* __restrict__ dot,
                          T* out) {  // out may alias logits: each element is read, then written
  const int64_t row = blockIdx.x;
  const int64_t y = targets[row];
  const bool valid = y != ignore_index;
  const T* z = logits + row * v;
  const T* d = direction ? direction + row * v : nullptr;
  const float lse = lse_in[row];
  const bool vec = vectorizable(z, v) && (!d || vectorizable(d, v)) &&
                   (!out || vectorizable(out + row * v, v));
  constexpr int n = Vec<T>::n;

  float pd = 0.0f;
  if (d) {
    float acc = 0.0f;
    if (vec) {
      for (int64_t j = static_cast<int64_t>(threadIdx.x) * n; j < v; j += kThreads * n) {
        float x[n], dd[n];
        load_vec(z + j, x);
        load_vec(d + j, dd);
#pragma unroll
        for (int k = 0; k < n; ++k) acc += __expf(x[k] - lse) * dd[k];
      }
    } else {
      for (int64_t j = threadIdx.x; j < v; j += kThreads) acc += __expf(to_f(z[j]) - lse) * to_f(d[j]);
    }
    pd = block_sum(acc);
    if (threadIdx.x == 0) dot[row] = valid ? pd - to_f(d[y]) : 0.0f;
  }
  if (!out) return;
  const float a = valid && coef_h ? coef_h[row] : 0.0f;
  const float b = valid && coef_g ? coef_g[row] : 0.0f;
  T* o = out + row * v;
  if (vec) {
    for (int64_t j = static_cast<int64_t>(threadIdx.x) * n; j < v; j += kThreads * n) {
      float x[n], dd[n], r[n];
      load_vec(z + j, x);
      if (d) load_vec(d + j, dd);
#pragma unroll
      for (int k = 0; k < n; ++k) {
        const float p = __expf(x[k] - lse);
        r[k] = d ? p * (a * (dd[k] - pd) + b) : b * p;
        if (j + k == y) r[k] -= b;
      }
      store_vec(o + j, r);
    }
  } else {
    for (int64_t j = threadIdx.x; j < v; j += kThreads) {
      const float p = __expf(to_f(z[j]) - lse);
      float r = d ? p * (a * (to_f(d[j]) - pd) + b) : b * p;
      if (j == y) r -= b;
      o[j] = from_f<T>(r);
    }
  }
}

template <typename T>
cudaError_t launch_forward(const void* logits, const int64_t* targets, const float* weights,
                           int64_t n, int64_t v, int64_t ignore_index, float* loss, float* lse,
                           float* nll, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (n > INT32_MAX) return cudaErrorInvalidValue;  // a block per row: gridDim.x < 2^31
  ce_forward_kernel<T><<<static_cast<unsigned>(n), kThreads, 0, stream>>>(
      static_cast<const T*>(logits), targets, weights, v, ignore_index, loss, lse, nll);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_directional(const void* logits, const int64_t* targets, const float* lse,
                               const void* direction, const float* coef_h, const float* coef_g,
                               int64_t n, int64_t v, int64_t ignore_index, float* dot,
                               void* out, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  if (n > INT32_MAX) return cudaErrorInvalidValue;  // a block per row: gridDim.x < 2^31
  ce_directional_kernel<T><<<static_cast<unsigned>(n), kThreads, 0, stream>>>(
      static_cast<const T*>(logits), targets, lse, static_cast<const T*>(direction), coef_h,
      coef_g, v, ignore_index, dot, static_cast<T*>(out));
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------------
// Fused forward + gradient. Block r of a cluster of c blocks owns columns [r * part, (r+1) * part)
// of one row: it copies them to shared memory while reducing (max, sum of exp), the cluster
// combines its c partial results through distributed shared memory, and each block writes
// coef * (p - e_y) for its columns from shared memory. grad may alias logits: every read of the
// row (the target's logit included) happens before the first cluster barrier, every write after.

template <typename T>
__global__ void __launch_bounds__(kThreads)
    ce_fused_kernel(const T* logits, const int64_t* __restrict__ targets,
                    const float* __restrict__ coef, int64_t v, int64_t part, int64_t ignore_index,
                    float* __restrict__ loss, float* __restrict__ lse_out,
                    float* __restrict__ nll_out, T* grad) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* buf = reinterpret_cast<T*>(smem_raw);
  __shared__ float part_m, part_s, row_lse, z_target;
  cg::cluster_group cluster = cg::this_cluster();
  const unsigned rank = cluster.block_rank(), csize = cluster.num_blocks();
  const int64_t row = blockIdx.x / csize;
  const int64_t lo = rank * part, hi = min(v, lo + part);
  const T* z = logits + row * v;
  T* g = grad + row * v;
  const int64_t y = targets[row];
  const bool valid = y != ignore_index;
  const bool vec = vectorizable(z, v) && vectorizable(g, v);  // then part is a multiple of n
  constexpr int n = Vec<T>::n;

  float m = -INFINITY, s = 0.0f;
  if (vec) {
    // kInFlight vector loads are issued before any is used: enough bytes in flight per SM to
    // keep memory busy while each block holds its slice (a 64 KiB slice is one round).
    constexpr int kInFlight = 8;
    constexpr int64_t step = static_cast<int64_t>(kThreads) * n;
    for (int64_t base = lo + static_cast<int64_t>(threadIdx.x) * n; base < hi;
         base += step * kInFlight) {
      uint4 raw[kInFlight];
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) {
        const int64_t j = base + u * step;
        if (j < hi) raw[u] = *reinterpret_cast<const uint4*>(z + j);
      }
#pragma unroll
      for (int u = 0; u < kInFlight; ++u) {
        const int64_t j = base + u * step;
        if (j >= hi) break;
        *reinterpret_cast<uint4*>(buf + (j - lo)) = raw[u];
        const T* e = reinterpret_cast<const T*>(&raw[u]);
        float x[n];
#pragma unroll
        for (int k = 0; k < n; ++k) x[k] = to_f(e[k]);
        accumulate(m, s, x);
      }
    }
  } else {
    for (int64_t j = lo + threadIdx.x; j < hi; j += kThreads) {
      const T x = z[j];
      buf[j - lo] = x;
      merge(m, s, to_f(x), 1.0f);
    }
  }
  block_max_sum(m, s);
  if (threadIdx.x == 0) {
    part_m = m;
    part_s = s;
    if (rank == 0) z_target = valid ? to_f(z[y]) : 0.0f;
  }
  cluster.sync();  // every block's partial result is ready; no read of the row follows
  if (threadIdx.x == 0) {
    float cm = -INFINITY, cs = 0.0f;
    for (unsigned r = 0; r < csize; ++r) {
      merge(cm, cs, *cluster.map_shared_rank(&part_m, r), *cluster.map_shared_rank(&part_s, r));
    }
    row_lse = cm + __logf(cs);
  }
  __syncthreads();
  const float lse = row_lse;
  const float c = valid ? coef[row] : 0.0f;
  if (rank == 0 && threadIdx.x == 0) {
    const float nll = valid ? lse - z_target : 0.0f;
    lse_out[row] = lse;
    nll_out[row] = nll;
    loss[row] = c * nll;
  }
  if (vec) {
    for (int64_t j = lo + static_cast<int64_t>(threadIdx.x) * n; j < hi; j += kThreads * n) {
      const uint4 raw = *reinterpret_cast<const uint4*>(buf + (j - lo));
      const T* e = reinterpret_cast<const T*>(&raw);
      float r[n];
#pragma unroll
      for (int k = 0; k < n; ++k) {
        r[k] = c * __expf(to_f(e[k]) - lse);
        if (j + k == y) r[k] -= c;
      }
      store_vec(g + j, r);
    }
  } else {
    for (int64_t j = lo + threadIdx.x; j < hi; j += kThreads) {
      float r = c * __expf(to_f(buf[j - lo]) - lse);
      if (j == y) r -= c;
      g[j] = from_f<T>(r);
    }
  }
  cluster.sync();  // no block leaves while another may still read its partial result
#else
  __trap();  // the launcher checks for compute capability 9.0 first
#endif
}

// ---------------------------------------------------------------------------------------------
// Fused forward + gradient with the row held in registers: one exponential per logit. Block r of
// a cluster owns columns [r * part, (r+1) * part), at most kThreads * kSlots of them, kSlots per
// thread. Each thread loads its slots, takes its own max m_t, turns its slots into
// e = exp(z - m_t) in place and sums them; the block and then the cluster merge the (max, sum)
// pairs into the row's lse, and each thread writes coef * (e * exp(m_t - lse) - [j == y]): a
// multiply per logit where the shared-memory kernel above evaluates a second exponential. The
// cluster barrier is split (arrive once the partial results are read, wait before leaving), so
// a block writes its gradient without waiting for the rest of the cluster.

// Not the .aligned forms: threads may reach the wait from different trips of a loop.
__device__ __forceinline__ void cluster_arrive() {
  asm volatile("barrier.cluster.arrive.release;\n" ::: "memory");
}

__device__ __forceinline__ void cluster_wait() {
  asm volatile("barrier.cluster.wait.acquire;\n" ::: "memory");
}

// A 16-byte vector of -inf in T's encoding: absent slots read as masked logits.
template <typename T>
__device__ __forceinline__ uint4 neg_inf_vec();
template <>
__device__ __forceinline__ uint4 neg_inf_vec<float>() {
  return make_uint4(0xff800000u, 0xff800000u, 0xff800000u, 0xff800000u);
}
template <>
__device__ __forceinline__ uint4 neg_inf_vec<__nv_bfloat16>() {
  return make_uint4(0xff80ff80u, 0xff80ff80u, 0xff80ff80u, 0xff80ff80u);
}
template <>
__device__ __forceinline__ uint4 neg_inf_vec<__half>() {
  return make_uint4(0xfc00fc00u, 0xfc00fc00u, 0xfc00fc00u, 0xfc00fc00u);
}

template <typename T, int kSlots>
__global__ void __launch_bounds__(kThreads, kSlots <= 16 ? 3 : 1)
    ce_fused_regs_kernel(const T* logits, const int64_t* __restrict__ targets,
                         const float* __restrict__ coef, int64_t v, int64_t part,
                         int64_t ignore_index, float* __restrict__ loss,
                         float* __restrict__ lse_out, float* __restrict__ nll_out, T* grad) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  namespace cg = cooperative_groups;
  constexpr int n = Vec<T>::n;
  constexpr int kVecs = kSlots / n;
  static_assert(kSlots % n == 0, "whole vectors per thread");
  __shared__ float part_m, part_s, row_lse, z_target;
  cg::cluster_group cluster = cg::this_cluster();
  const unsigned rank = cluster.block_rank(), csize = cluster.num_blocks();
  const int64_t row = blockIdx.x / csize;
  const int64_t lo = rank * part;
  const int len = static_cast<int>(min(v, lo + part) - lo);  // columns of this block
  const T* zb = logits + row * v + lo;
  const int tid = threadIdx.x;

  // Slot (u, k) of a thread is column (u * kThreads + tid) * n + k of the block's part (rows
  // are whole 16-byte vectors: the launcher checks).
  float x[kSlots];
  {
    uint4 raw[kVecs];
#pragma unroll
    for (int u = 0; u < kVecs; ++u) {  // every load in flight before any is used
      const int j = (u * kThreads + tid) * n;
      raw[u] = j < len ? *reinterpret_cast<const uint4*>(zb + j) : neg_inf_vec<T>();
    }
#pragma unroll
    for (int u = 0; u < kVecs; ++u) {
      const T* e = reinterpret_cast<const T*>(&raw[u]);
#pragma unroll
      for (int k = 0; k < n; ++k) x[u * n + k] = to_f(e[k]);
    }
  }
  float m = -INFINITY;
#pragma unroll
  for (int k = 0; k < kSlots; ++k) m = fmaxf(m, x[k]);
  const float m_own = m;
  float s = 0.0f;
  if (m_own == -INFINITY) {  // nothing but masked, absent or NaN slots: no inf - inf
#pragma unroll
    for (int k = 0; k < kSlots; ++k) {
      x[k] = isnan(x[k]) ? NAN : 0.0f;  // a NaN reaches the sum (fmaxf passed over it)
      s += x[k];
    }
  } else {
#pragma unroll
    for (int k = 0; k < kSlots; ++k) {
      x[k] = __expf(x[k] - m_own);  // the difference first: exact near the max, any magnitude
      s += x[k];
    }
  }
  block_max_sum(m, s);
  // The row's scalars are (re)read here rather than kept in registers across the loads.
  const int64_t y = targets[row];
  const bool valid = y != ignore_index;
  if (tid == 0) {
    part_m = m;
    part_s = s;
    if (rank == 0) z_target = valid ? to_f(logits[row * v + y]) : 0.0f;
  }
  cluster.sync();  // every block's partial result is ready; no read of the row follows
  if (tid == 0) {
    float cm = -INFINITY, cs = 0.0f;
    for (unsigned r = 0; r < csize; ++r) {
      merge(cm, cs, *cluster.map_shared_rank(&part_m, r), *cluster.map_shared_rank(&part_s, r));
    }
    row_lse = cm + __logf(cs);
  }
  __syncthreads();
  cluster_arrive();  // this block has read what it needs from the others
  const float lse = row_lse;
  const float c = valid ? coef[row] : 0.0f;
  if (rank == 0 && tid == 0) {
    const float nll = valid ? lse - z_target : 0.0f;
    lse_out[row] = lse;
    nll_out[row] = nll;
    loss[row] = c * nll;
  }
  // a thread with nothing but masked slots writes zeros, unless the row's lse is NaN (a NaN
  // logit anywhere in it): then the whole row's gradient is NaN, as in torch
  const float scale = (m_own == -INFINITY && !isnan(lse)) ? 0.0f : c * __expf(m_own - lse);
  const int y_local = (valid && y >= lo && y < lo + len) ? static_cast<int>(y - lo) : -1;
  T* gb = grad + row * v + lo;
#pragma unroll
  for (int u = 0; u < kVecs; ++u) {
    const int j = (u * kThreads + tid) * n;
    if (j >= len) break;  // the later slots lie further right
    float r[n];
#pragma unroll
    for (int k = 0; k < n; ++k) r[k] = x[u * n + k] * scale - (j + k == y_local ? c : 0.0f);
    store_vec(gb + j, r);
  }
  cluster_wait();  // no block leaves while another may still read its partial result
#else
  __trap();  // the launcher checks for compute capability 9.0 first
#endif
}

// Launches one cluster of csize blocks per row, each block with smem bytes of dynamic shared
// memory and `part` columns; cudaErrorNotSupported when this GPU or binary cannot run it.
template <typename T, typename Kernel>
cudaError_t launch_clusters(Kernel kernel, const void* logits, const int64_t* targets,
                            const float* coef, int64_t n, int64_t v, int64_t part, int64_t csize,
                            size_t smem, int64_t ignore_index, float* loss, float* lse,
                            float* nll, void* grad, cudaStream_t stream, bool launch) {
  if (n * csize > INT32_MAX) return cudaErrorNotSupported;
  // The kernel body exists only where it was compiled for compute capability 9.0 (an
  // extension built for older GPUs and run on a newer one would reach the __trap()).
  cudaFuncAttributes attrs;
  cudaError_t err = cudaFuncGetAttributes(&attrs, kernel);
  if (err != cudaSuccess) return err;
  if (attrs.ptxVersion < 90) return cudaErrorNotSupported;
  if (smem > 0) {
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(smem));
    if (err != cudaSuccess) {  // more shared memory than a block may have: the caller falls back
      (void)cudaGetLastError();
      return cudaErrorNotSupported;
    }
  }
  if (csize > 8) {  // Hopper runs clusters of up to 16 blocks when asked to
    err = cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1);
    if (err != cudaSuccess) {
      (void)cudaGetLastError();
      return cudaErrorNotSupported;
    }
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(n * csize));
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = static_cast<unsigned>(csize);
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  int clusters = 0;
  err = cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg);
  if (err != cudaSuccess || clusters < 1) {
    (void)cudaGetLastError();
    return cudaErrorNotSupported;
  }
  if (!launch) return cudaSuccess;  // a plan only: it would run
  err = cudaLaunchKernelEx(&cfg, kernel, static_cast<const T*>(logits), targets, coef, v, part,
                           ignore_index, loss, lse, nll, static_cast<T*>(grad));
  if (err != cudaSuccess) return err;
  return cudaGetLastError();
}

// Splits a row of v columns over the fewest blocks of at most `capacity` columns (whole
// vectors each); false when that takes more than max_blocks.
template <typename T>
bool split_row(int64_t v, int64_t capacity, int64_t max_blocks, int64_t& part, int64_t& csize) {
  constexpr int64_t vn = Vec<T>::n;
  csize = (v + capacity - 1) / capacity;
  if (csize > max_blocks) return false;
  part = (v + csize - 1) / csize;
  part = (part + vn - 1) / vn * vn;
  csize = (v + part - 1) / part;
  return true;
}

template <typename T>
cudaError_t launch_fused(const void* logits, const int64_t* targets, const float* coef,
                         int64_t n, int64_t v, int64_t ignore_index, float* loss, float* lse,
                         float* nll, void* grad, int64_t part_bytes, int64_t slots,
                         cudaStream_t stream, datarater::cuda::FusedPlan* plan = nullptr,
                         bool launch = true) {
  if (plan) *plan = datarater::cuda::FusedPlan{};
  if (n == 0 || v == 0) return cudaSuccess;
  int device = 0, major = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err != cudaSuccess) return err;
  if (major < 9) return cudaErrorNotSupported;
  int64_t part = 0, csize = 0;
  const auto go = [&](auto kernel, size_t smem, int kind, int64_t kslots) {
    const cudaError_t e = launch_clusters<T>(kernel, logits, targets, coef, n, v, part, csize,
                                             smem, ignore_index, loss, lse, nll, grad, stream,
                                             launch);
    if (e == cudaSuccess && plan) *plan = datarater::cuda::FusedPlan{kind, kslots, csize};
    return e;
  };
  if (slots != 0 && slots != 16 && slots != 32) return cudaErrorInvalidValue;
  if (slots != 0) {  // the row in registers, slots per thread, up to 16 blocks, whole vectors
    const bool aligned = v % Vec<T>::n == 0 && reinterpret_cast<uintptr_t>(logits) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(grad) % 16 == 0;
    if (aligned && split_row<T>(v, slots * kThreads, 16, part, csize)) {
      err = slots == 16 ? go(ce_fused_regs_kernel<T, 16>, 0, 2, 16)
                        : go(ce_fused_regs_kernel<T, 32>, 0, 2, 32);
      if (err != cudaErrorNotSupported) return err;
    }
  }
  // the row in shared memory, at most part_bytes per block, 8 blocks
  if (!split_row<T>(v, part_bytes / static_cast<int64_t>(sizeof(T)), 8, part, csize)) {
    return cudaErrorNotSupported;
  }
  return go(ce_fused_kernel<T>, static_cast<size_t>(part) * sizeof(T), 1, 0);
}

}  // namespace

namespace datarater {
namespace cuda {

cudaError_t ce_forward(DType dtype, const void* logits, const int64_t* targets,
                       const float* weights, int64_t n, int64_t v, int64_t ignore_index,
                       float* loss, float* lse, float* nll, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return launch_forward<float>(logits, targets, weights, n, v, ignore_index, loss, lse, nll, stream);
    case DType::kBFloat16:
      return launch_forward<__nv_bfloat16>(logits, targets, weights, n, v, ignore_index, loss, lse, nll, stream);
    case DType::kFloat16:
      return launch_forward<__half>(logits, targets, weights, n, v, ignore_index, loss, lse, nll, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t ce_directional(DType dtype, const void* logits, const int64_t* targets,
                           const float* lse, const void* direction, const float* coef_h,
                           const float* coef_g, int64_t n, int64_t v, int64_t ignore_index,
                           float* dot, void* out, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return launch_directional<float>(logits, targets, lse, direction, coef_h, coef_g, n, v, ignore_index, dot, out, stream);
    case DType::kBFloat16:
      return launch_directional<__nv_bfloat16>(logits, targets, lse, direction, coef_h, coef_g, n, v, ignore_index, dot, out, stream);
    case DType::kFloat16:
      return launch_directional<__half>(logits, targets, lse, direction, coef_h, coef_g, n, v, ignore_index, dot, out, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t ce_forward_grad(DType dtype, const void* logits, const int64_t* targets,
                            const float* coef, int64_t n, int64_t v, int64_t ignore_index,
                            float* loss, float* lse, float* nll, void* grad, int64_t part_bytes,
                            int64_t slots, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return launch_fused<float>(logits, targets, coef, n, v, ignore_index, loss, lse, nll, grad, part_bytes, slots, stream);
    case DType::kBFloat16:
      return launch_fused<__nv_bfloat16>(logits, targets, coef, n, v, ignore_index, loss, lse, nll, grad, part_bytes, slots, stream);
    case DType::kFloat16:
      return launch_fused<__half>(logits, targets, coef, n, v, ignore_index, loss, lse, nll, grad, part_bytes, slots, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t ce_forward_grad_plan(DType dtype, const void* logits, const void* grad, int64_t n,
                                 int64_t v, int64_t part_bytes, int64_t slots, FusedPlan* plan) {
  const auto at = [&](auto zero) {
    using T = decltype(zero);
    return launch_fused<T>(logits, nullptr, nullptr, n, v, 0, nullptr, nullptr, nullptr,
                           const_cast<void*>(grad), part_bytes, slots, nullptr, plan, false);
  };
  switch (dtype) {
    case DType::kFloat32:
      return at(float{});
    case DType::kBFloat16:
      return at(__nv_bfloat16{});
    case DType::kFloat16:
      return at(__half{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace datarater
