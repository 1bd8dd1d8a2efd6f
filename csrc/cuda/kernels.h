// Launch entry points of the CUDA kernels in csrc/cuda/*.cu.
//
// This header is shared by nvcc (the .cu files) and by the host C++ binding, and it must stay
// free of torch and CUDA headers: the CPU torch wheel has no CUDA headers, so the binding only
// ever sees raw pointers, sizes, a dtype code and the stream as an opaque pointer.
// Every launcher returns 0 on success or a cudaError_t value; error_string turns it into a
// message. Strides are in elements; all pointers are device pointers.
#pragma once
#include <cstdint>

#include "contract.h"

namespace rcar_cuda {

// Element types of input tensors (outputs are always float32), raw norms, aggregations and RCAR
// regulator modes: the codes of rcar_fast.contract, generated into csrc/contract.h.
using namespace rcar_contract;

int device_count();                    // 0 when there is no driver or no device
const char* error_string(int code);

// out[n, r, r'] = sum_k x[n, r, k] * x[n, r', k]; x is (n, R, d) with row stride `stride_r`
// and image stride `stride_n` (elements), out is contiguous float32 (n, R, R).
int gram(const void* x, float* out, int64_t n, int64_t R, int64_t d,
         int64_t stride_n, int64_t stride_r, int dtype, void* stream);

// Gram matrices of ragged item sets: item n has rows 0..len(n)-1 (len(n) = lens[n], or R when
// lens is null); rows >= len(n) are never read. Item n's len x len matrix is written row-major
// at out + out_off[n] (or out + n*R*R when out_off is null).
int gram_ragged(const void* x, const int64_t* lens, const int64_t* out_off, float* out,
                int64_t n, int64_t R, int64_t d, int64_t stride_n, int64_t stride_r, int dtype,
                void* stream);

// Squared row norms of ragged item sets: out[out_off[n] + r] = sum_k x[n, r, k]^2 for
// r < len(n) (out_off null: out[n*R + r]; lens null: len(n) = R). Padding rows are never read.
int row_sqnorms(const void* x, const int64_t* lens, const int64_t* out_off, float* out,
                int64_t n, int64_t R, int64_t d, int64_t stride_n, int64_t stride_r, int dtype,
                void* stream);

// ---------------------------------------------------------------------------------------------
// SCAN all pairs (csrc/cuda/scan.cu).
//
// Captions are addressed in a "packed" word order: word w of caption j has the packed index
// word_off[j] + w. Captions are cut into groups of consecutive captions whose words fit one
// block's score tile (col_frags * 16 words; see scan_tile_rows / scan_tile_cols); a block scores
// imgs_per_block images against one group.
struct ScanProblem {
  const void* img;               // (n_img, R, d)
  const void* cap;               // (n_cap, Lmax, d); padding words are never read
  int dtype;                     // DType of img and cap
  int64_t n_img, R, d, n_cap;
  int64_t img_stride_n, img_stride_r, cap_stride_n, cap_stride_w;
  const int64_t* lens;           // (n_cap,) caption lengths, 1 <= lens[j]
  const int64_t* word_off;       // (n_cap + 1,) exclusive prefix sum of lens
  int64_t total_words;           // word_off[n_cap]
  int64_t max_len;               // max(lens)
  const int32_t* group_first;    // (n_groups + 1,) first caption of each group, then n_cap
  int64_t n_groups;
  int col_frags;                 // 8, 4 or 2 (tile geometry, see scan_tile_*)
  const float* gram;             // t2i: (n_img, R, R) region Grams; i2t: caption Grams
  const int64_t* gram_off;       // i2t: (n_cap,) offset of caption j's len x len Gram; t2i: unused
  const float* query_sq;         // squared query norms: t2i packed words (total_words,),
                                 // i2t regions (n_img * R,)
  int i2t;                       // 0: t2i (words attend to regions), 1: i2t
  int raw_norm;                  // RawNorm
  int agg;                       // Aggregation
  float smooth, lse_lambda;
};

// Tile capacity for a col_frags value: region rows and word columns of one block.
int scan_tile_rows(int col_frags);
int scan_tile_cols(int col_frags);

// sims[i * n_cap + j], float32 (n_img, n_cap).
int scan_forward(const ScanProblem& p, float* sims, void* stream);

// Backward of scan_forward for grad_sims (n_img, n_cap) float32. Writes, for every pair, with
// "query rows" and "context columns" (t2i: rows = packed words, columns = image rows i*R + c;
// i2t: rows = image rows i*R + k, columns = packed words), each a row-major float32 matrix:
//   d_scores    dL/dS for the raw scores S[c, k] = context_c . query_k
//   attn        alpha[k, c], the attention weights
//   attn_scaled 2 * dL/d|ctx_k|^2 * alpha[k, c]   (so that dL/dG = attn_scaled^T attn)
// and d_query_norm, dL/d|q_k|: t2i (total_words, n_img) [word, i]; i2t (n_img*R, n_cap) [row, j].
// Every entry of the outputs that belongs to a pair is written; the caller does the big GEMMs.
int scan_backward(const ScanProblem& p, const float* grad_sims, float* d_scores, float* attn,
                  float* attn_scaled, float* d_query_norm, void* stream);

// ---------------------------------------------------------------------------------------------
// S-only heads, all pairs (csrc/cuda/maxsim.cu; HEADS.md, MAXSIM_API.md). The same tile as
// SCAN (csrc/cuda/tile.cuh): captions packed and cut into groups (group_first) for a col_frags
// tile shape (scan_tile_rows / scan_tile_cols give its capacity), images imgs_per_block at a
// time. Regions r >= img_lens[i] and words w >= lens[j] are never read. Inputs fp32 / fp16 /
// bf16 (dtype), fp32 accumulation; every output float32.
struct MaxSimProblem {
  const void* img;               // (n_img, R, d)
  const void* cap;               // (n_cap, Lmax, d)
  int dtype;                     // DType of img and cap
  int64_t n_img, R, d, n_cap;
  int64_t img_stride_n, img_stride_r, cap_stride_n, cap_stride_w;
  const int64_t* img_lens;       // (n_img,) real regions, 1 <= img_lens[i] <= R
  const int64_t* lens;           // (n_cap,) real words, 1 <= lens[j]
  const int64_t* word_off;       // (n_cap + 1,) exclusive prefix sum of lens
  int64_t total_words;           // word_off[n_cap]
  int64_t max_len;               // max(lens)
  const int32_t* group_first;    // (n_groups + 1,) first caption of each group, then n_cap
  int64_t n_groups;
  int col_frags;                 // 8, 4 or 2
  int direction;                 // HeadDirection
  int pool;                      // Pool
  int leaky;                     // 1: leaky(x) = x > 0 ? x : kLeakySlope x on the maxima
  float tau;                     // lse / softmax temperature, > 0
  float both_scale;              // direction both: both_scale * (t2i + i2t)
  int vsa;                       // 1: CHAN's VSA coding (direction i2t, leaky 0) replaces the maxima
  float vsa_tau;                 // its softmax temperature over the words, > 0
  const float* gram;             // vsa: packed caption Grams, caption j's lens[j]^2 at gram_off[j]
  const int64_t* gram_off;       // vsa: (n_cap,) offsets into gram
};

// nullptr if the launchers take p, else why not (shapes beyond the tile, bad codes): callers
// check before launching; the launchers return cudaErrorInvalidValue for such a p.
const char* maxsim_problem_error(const MaxSimProblem& p);

// sims[i * n_cap + j] (float32, every pair written).
int maxsim_forward(const MaxSimProblem& p, float* sims, void* stream);

// Backward for grad_sims (n_img, n_cap) float32, deterministic (no atomics; every sum in a
// fixed order), in three kernels on `stream`:
//   1. the tile recomputed: per pair the first argmax and the pooling weight of every pooled
//      maximum, times grad_sims[i, j] (and both_scale, and the leaky slope), into
//      t2i_coef / t2i_arg (n_img, total_words) [i, packed word] = (coefficient, region r*) and
//      i2t_coef / i2t_arg (n_img * R, n_cap) [i * R + r, j] = (coefficient, word w*)
//      (each pair only needs its direction's buffers; the others may be null);
//   2. per image (a thread per feature column, captions in order): d_img (n_img, R, d),
//      every entry written, 0 at padded regions;
//   3. per caption (a thread per feature column, images in order): d_cap_packed
//      (total_words, d) [packed word] += the caption's gradient (accumulates, so that a caller
//      may run image chunks one after another into the same buffer).
int maxsim_backward(const MaxSimProblem& p, const float* grad_sims, float* t2i_coef,
                    int32_t* t2i_arg, float* i2t_coef, int32_t* i2t_arg, float* d_img,
                    float* d_cap_packed, void* stream);

// Backward of the VSA coding (p.vsa) for grad_sims (n_img, n_cap) float32: the tile
// recomputed, and per pair, each (n_img * R, total_words) [i * R + r, packed word] float32,
// every entry written (0 at padded regions), as scan_backward's i2t outputs:
//   d_scores dL/dS, attn a_rw, attn_scaled 2 dL/d|c_r|^2 a_rw (2 dL/dG_j = attn_scaled^T attn
//   over caption j's words). The caller contracts them with the features.
int maxsim_vsa_backward(const MaxSimProblem& p, const float* grad_sims, float* d_scores,
                        float* attn, float* attn_scaled, void* stream);

// ---------------------------------------------------------------------------------------------
// RCAR similarity head, eval-mode forward (csrc/cuda/rcar.cu). Features are float32.
// `weights` is a device array of pointers to float32 tensors, in this order (Wt = the
// nn.Linear weight transposed to (in, out), contiguous; b = its bias):
//   per alignment step t:  alv.Wt (d, s), alv.b (s)
//   per RCR step t:        matrix1.Wt (s, 2s), matrix1.b (2s), matrix2.Wt (2s, d), matrix2.b (d),
//                          smooth1.Wt (s, s/2), smooth1.b (s/2), smooth2.w (s/2), smooth2.b (1)
//   per RAR step n:        q.Wt (s, s), q.b (s), k.Wt (s, s), k.b (s), v.w (s), v.b (1)
//   then                   eval.w (s), eval.b (1)
// with step counts alv/rcr/rar = only_rar n: 1/0/n; only_rcr n: n/n/0; coop_rcar n: n/n-1/n.
struct RcarProblem {
  const float* img;              // (n_img, R, d)
  const float* cap;              // (n_cap, Lmax, d); padding never read
  int64_t n_img, R, d, n_cap;
  int64_t img_stride_n, img_stride_r, cap_stride_n, cap_stride_w;
  const int64_t* lens;
  int64_t max_len;
  int64_t sim_dim;
  int regulator;                 // Regulator
  int steps;
  int i2t;
  float smooth;
  const float* const* weights;
  float* workspace;              // n_blocks * rcar_workspace_floats(...) floats
  int64_t n_blocks;              // persistent blocks; each loops over pairs
};

// Workspace floats one persistent block needs (its per-pair (Q, d) and (Q, s) scratch).
int64_t rcar_workspace_floats(int64_t max_queries, int64_t d, int64_t sim_dim);
int rcar_forward(const RcarProblem& p, float* sims, void* stream);

}  // namespace rcar_cuda
