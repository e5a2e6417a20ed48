/* Single-pass AdamW on the host, for the CPU optimizer actors (fuyou_ray/cpu_adam.py compiles and loads it).

Why: the clipped step's optimizer phase is serial and bound by host memory bandwidth. The torch path makes
three passes over each element range - the clipping scale (grad.mul_), torch._fused_adamw_, and the cast of
the new master weights into the bf16 params slot - about 42 bytes of memory traffic per parameter. This
kernel makes one: it reads the gradient, master weights and both moments once (16 B) and writes the
weights, moments and bf16 params once (14 B; fp32 params, on the CPU fallback, 16 B), and it leaves the gradient unmodified.

It computes what the torch path computes, bit for bit: the gradient is scaled with one fp32 multiply
(grad.mul_), the update follows torch's CPU fused AdamW kernel (aten/src/ATen/native/cpu/FusedAdamKernel.cpp:
weight decay applied to the weights first, the first moment as lerp through an FMA, the second moment,
denominator and step in the same fp32 operations), and the params are the weights rounded to
bf16 to nearest even (c10::BFloat16; a NaN weight gives a NaN param, whose bits may differ from torch's
vectorised cast: runs refuse a non-finite gradient before any update). Which multiply-adds torch's build fused,
and its first moment's formula, differ between torch versions and builds: `variant` selects, and the loader
picks the variant that reproduces torch on this machine, or does not use the kernel.

Build: cc -O3 -march=native -fno-math-errno -ffp-contract=off -shared -fPIC (no -ffast-math: every
operation must round as IEEE fp32 does). */

#include <math.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif
#include <stdint.h>
#include <string.h>

/* Variants: how torch's build computes the moments and the weights. The kernel's update has the same
   operations in every variant; they differ in which multiply-adds are fused (FMA, one rounding) and in the
   first moment's formula (lerp, or m*beta1 + g*(1 - beta1) in older torch). variant = m | v << 3 | w << 6:
   m: 0 fma(c1, g - m, m) (lerp)   1 m + c1*(g - m)   2 m*b1 + g*c1   3 fma(m, b1, g*c1)   4 fma(g, c1, m*b1)
   v: 0 v*b2 + (c2*g)*g   1 fma(c2*g, g, v*b2)   2 fma(v, b2, (c2*g)*g)
      3 v*b2 + (g*g)*c2   4 fma(g*g, c2, v*b2)   5 fma(v, b2, (g*g)*c2)
   w: 0 w*decay + step    1 fma(w, decay, step)
   Torch's scalar remainder loop (the last numel % vector-width elements of each call) is not reproduced
   here: the loader hands those few elements to torch itself. */

typedef struct {
    float grad_scale;    /* the clipping coefficient (1 = none) */
    float decay;         /* 1 - lr * weight_decay, rounded to fp32 (1 = no decay) */
    float lerp_weight;   /* 1 - beta1 */
    float beta1;
    float beta2;
    float c2;            /* 1 - beta2 */
    float bc2_sqrt;      /* sqrt(1 - beta2^step) */
    float eps;
    float neg_step_size; /* -lr / (1 - beta1^step) */
} fy_adamw_hp;

static inline uint16_t to_bf16(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0; /* NaN, as c10::BFloat16 writes it */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* One element: the new w, m, v from the gradient and the old ones. */
static inline __attribute__((always_inline)) void elem(float gi, float wi, float mi, float vi,
                                                        const fy_adamw_hp *hp, const int m_mode,
                                                        const int v_mode, const int w_fma, float *wo,
                                                        float *mo, float *vo) {
    const float decay = hp->decay, b1 = hp->beta1, c1 = hp->lerp_weight;
    const float b2 = hp->beta2, c2 = hp->c2, bc2 = hp->bc2_sqrt, eps = hp->eps, nss = hp->neg_step_size;
    /* torch's lerp: a small weight steps from m towards g, a large one back from g towards m */
    const int small = fabsf(c1) < 0.5f;
    const float coeff = small ? c1 : c1 - 1.0f;
    float base = small ? mi : gi;
    if (m_mode == 0) mi = fmaf(coeff, gi - mi, base);
    else if (m_mode == 1) mi = base + coeff * (gi - mi);
    else if (m_mode == 2) mi = mi * b1 + gi * c1;
    else if (m_mode == 3) mi = fmaf(mi, b1, gi * c1);
    else mi = fmaf(gi, c1, mi * b1);
    float cg = c2 * gi, gg = gi * gi;
    if (v_mode == 0) vi = vi * b2 + cg * gi;
    else if (v_mode == 1) vi = fmaf(cg, gi, vi * b2);
    else if (v_mode == 2) vi = fmaf(vi, b2, cg * gi);
    else if (v_mode == 3) vi = vi * b2 + gg * c2;
    else if (v_mode == 4) vi = fmaf(gg, c2, vi * b2);
    else vi = fmaf(vi, b2, gg * c2);
    float denom = sqrtf(vi) / bc2 + eps;
    float step = (nss * mi) / denom;
    *wo = w_fma ? fmaf(wi, decay, step) : wi * decay + step;
    *mo = mi;
    *vo = vi;
}

/* Branch-free loops, so that they vectorise: x * 1 and fma(w, 1, s) are exact, so a scale or decay of 1
   computes what skipping them would. In place, and out of place (the old state read from one buffer, the
   new one written to another: the host cache lends the version read and a file for the new version). */
static inline __attribute__((always_inline)) void body(float *restrict w, const float *restrict g,
                                                        float *restrict m, float *restrict v, int64_t lo,
                                                        int64_t hi, const fy_adamw_hp *hp, const int m_mode,
                                                        const int v_mode, const int w_fma) {
    const float scale = hp->grad_scale;
    for (int64_t i = lo; i < hi; i++)
        elem(g[i] * scale, w[i], m[i], v[i], hp, m_mode, v_mode, w_fma, &w[i], &m[i], &v[i]);
}

static inline __attribute__((always_inline)) void body_oop(
    float *restrict w, const float *restrict g, float *restrict m, float *restrict v,
    const float *restrict w0, const float *restrict m0, const float *restrict v0, int64_t lo, int64_t hi,
    const fy_adamw_hp *hp, const int m_mode, const int v_mode, const int w_fma) {
    const float scale = hp->grad_scale;
    for (int64_t i = lo; i < hi; i++)
        elem(g[i] * scale, w0[i], m0[i], v0[i], hp, m_mode, v_mode, w_fma, &w[i], &m[i], &v[i]);
}

static void cast_bf16(const float *restrict w, uint16_t *restrict p, int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; i++) p[i] = to_bf16(w[i]);
}

static void params_out(const float *w, void *p, int p_kind, int64_t lo, int64_t hi) {
    if (p_kind == 1)
        cast_bf16(w, (uint16_t *)p, lo, hi);
    else if (p_kind == 2)
        memcpy((float *)p + lo, w + lo, (size_t)(hi - lo) * sizeof(float));
}

/* one copy of each loop per variant, each with constant modes, so the compiler vectorises each */
#define W_CASES(mm, vm) \
    case (mm) | (vm) << 3: \
        if (w0) body_oop(w, g, m, v, w0, m0, v0, lo, hi, hp, mm, vm, 0); \
        else body(w, g, m, v, lo, hi, hp, mm, vm, 0); \
        break; \
    case (mm) | (vm) << 3 | 1 << 6: \
        if (w0) body_oop(w, g, m, v, w0, m0, v0, lo, hi, hp, mm, vm, 1); \
        else body(w, g, m, v, lo, hi, hp, mm, vm, 1); \
        break;
#define V_CASES(mm) W_CASES(mm, 0) W_CASES(mm, 1) W_CASES(mm, 2) W_CASES(mm, 3) W_CASES(mm, 4) W_CASES(mm, 5)

static int update(float *w, const float *g, float *m, float *v, const float *w0, const float *m0,
                  const float *v0, int64_t lo, int64_t hi, const fy_adamw_hp *hp, int variant) {
    switch (variant) {
        V_CASES(0) V_CASES(1) V_CASES(2) V_CASES(3) V_CASES(4)
    default: return -1;
    }
    return 0;
}

/* Out of place, the new state goes to other memory than the old state was read from: ordinary stores
   would first read each destination line (read-for-ownership), 12 more bytes per parameter in the
   optimizer's serial phase. So each block is computed into buffers in the L1 cache and streamed out with
   non-temporal stores, which write whole lines without reading them. */
static void stream_out(float *restrict dst, const float *restrict src, int64_t n) {
    int64_t i = 0;
#if defined(__AVX__)
    while (i < n && ((uintptr_t)(dst + i) & 31) != 0) {
        dst[i] = src[i];
        i++;
    }
    for (; i + 8 <= n; i += 8) _mm256_stream_ps(dst + i, _mm256_loadu_ps(src + i));
#endif
    for (; i < n; i++) dst[i] = src[i];
}

#define BLOCK 2048

/* AdamW on elements [lo, hi): in place on w, m, v, or, when w0 is not NULL, from the old state w0, m0, v0
   (other buffers) into w, m, v. The new weights also go to `p` as bf16 (p_kind 1) or fp32 (2); p_kind 0: no
   params out. Block by block, so that the params are written from weights still in the L1 cache. Returns
   0, or -1 for an unknown variant (nothing updated). */
int fy_adamw(float *w, const float *g, float *m, float *v, const float *w0, const float *m0, const float *v0,
             void *p, int p_kind, int64_t lo, int64_t hi, const fy_adamw_hp *hp, int variant) {
    float wb[BLOCK], mb[BLOCK], vb[BLOCK];
    for (int64_t b = lo; b < hi; b += BLOCK) {
        int64_t e = b + BLOCK < hi ? b + BLOCK : hi, n = e - b;
        if (!w0) {
            if (update(w, g, m, v, NULL, NULL, NULL, b, e, hp, variant) != 0) return -1;
            params_out(w, p, p_kind, b, e);
            continue;
        }
        if (update(wb, g + b, mb, vb, w0 + b, m0 + b, v0 + b, 0, n, hp, variant) != 0) return -1;
        if (p_kind == 1)
            cast_bf16(wb, (uint16_t *)p + b, 0, n);
        else if (p_kind == 2)
            memcpy((float *)p + b, wb, (size_t)n * sizeof(float));
        stream_out(w + b, wb, n);
        stream_out(m + b, mb, n);
        stream_out(v + b, vb, n);
    }
#if defined(__AVX__)
    _mm_sfence(); /* the streamed lines are visible before the caller reports the update done */
#endif
    return 0;
}
