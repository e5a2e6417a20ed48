/* Single-pass AdamW on the host, for the CPU optimizer actors (fuyou_ray/cpu_adam.py compiles and loads it).

Why: the clipped step's optimizer phase is serial and bound by host memory bandwidth. The torch path makes
three passes over each element range - the clipping scale (grad.mul_), torch._fused_adamw_, and the cast of
the new master weights into the bf16 params slot - about 42 bytes of memory traffic per parameter. This
kernel makes one: it reads the gradient, master weights and both moments once (16 B) and writes the
weights, moments and bf16 params once (14 B; fp32 params, on the CPU fallback, 16 B), and it leaves the gradient unmodified.

It computes what the torch path computes, bit for bit: the gradient is scaled with one fp32 multiply
(grad.mul_), the update follows torch's CPU fused AdamW kernel (aten/src/ATen/native/cpu/FusedAdamKernel.cpp:
weight decay applied to the weights first, the first moment as lerp through an FMA, the second moment,
denominator and step in the same fp32 operations and order), and the params are the weights rounded to
bf16 to nearest even (c10::BFloat16; a NaN weight gives a NaN param, whose bits may differ from torch's
vectorised cast: runs refuse a non-finite gradient before any update). Whether torch's compiler contracted the second moment's multiply-add
into an FMA, and how its scalar remainder loop rounds, differs between builds: `variant` selects, and the
loader picks the variant that reproduces torch on this machine, or does not use the kernel.

Build: cc -O3 -march=native -fno-math-errno -ffp-contract=off -shared -fPIC (no -ffast-math: every
operation must round as IEEE fp32 does). */

#include <math.h>
#include <stdint.h>
#include <string.h>

/* variant bits: how torch's build rounds the multiply-adds it may have contracted into FMAs */
#define VEC_V 3        /* vector part, second moment: 0 v*b2 + (c2*g)*g, 1 fma(c2*g, g, v*b2), 2 fma(v, b2, (c2*g)*g) */
#define VEC_W 4        /* vector part, weights: fma(w, decay, step) instead of w*decay + step */
#define TAIL_V_SHIFT 3 /* bits 3-4: the scalar remainder's second moment, as VEC_V */
#define TAIL_W 32      /* the scalar remainder's weights, as VEC_W */
#define TAIL_M 64      /* the scalar remainder's first moment: fma(c1, g - m, m) instead of m + c1*(g - m) */

typedef struct {
    float grad_scale;    /* the clipping coefficient (1 = none) */
    float decay;         /* 1 - lr * weight_decay, rounded to fp32 (1 = no decay) */
    float lerp_weight;   /* 1 - beta1 */
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

static inline void body(float *restrict w, const float *restrict g, float *restrict m, float *restrict v,
                        int64_t lo, int64_t hi, const fy_adamw_hp *hp, int m_fma, int v_mode, int w_fma) {
    const float scale = hp->grad_scale, decay = hp->decay, b2 = hp->beta2, c2 = hp->c2;
    const float bc2 = hp->bc2_sqrt, eps = hp->eps, nss = hp->neg_step_size;
    /* torch's lerp: a small weight steps from m towards g, a large one back from g towards m */
    const int small = fabsf(hp->lerp_weight) < 0.5f;
    const float coeff = small ? hp->lerp_weight : hp->lerp_weight - 1.0f;
    /* Branch-free, so that it vectorises: x * 1 and fma(w, 1, s) are exact, so a scale or decay of 1
       computes what skipping them would. */
    for (int64_t i = lo; i < hi; i++) {
        float gi = g[i] * scale;
        float mi = m[i];
        float base = small ? mi : gi;
        mi = m_fma ? fmaf(coeff, gi - mi, base) : base + coeff * (gi - mi);
        float cg = c2 * gi;
        float vi = v_mode == 2 ? fmaf(v[i], b2, cg * gi)
                               : (v_mode == 1 ? fmaf(cg, gi, v[i] * b2) : v[i] * b2 + cg * gi);
        float denom = sqrtf(vi) / bc2 + eps;
        float step = (nss * mi) / denom;
        float wi = w_fma ? fmaf(w[i], decay, step) : w[i] * decay + step;
        w[i] = wi;
        m[i] = mi;
        v[i] = vi;
    }
}

static void cast_bf16(const float *restrict w, uint16_t *restrict p, int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; i++) p[i] = to_bf16(w[i]);
}

static void vector_part(float *w, const float *g, float *m, float *v, int64_t lo, int64_t hi,
                        const fy_adamw_hp *hp, int variant) {
    /* constant flags, one copy each, so the compiler vectorises each without branches */
    switch (variant & (VEC_V | VEC_W)) {
    case 0: body(w, g, m, v, lo, hi, hp, 1, 0, 0); break;
    case 1: body(w, g, m, v, lo, hi, hp, 1, 1, 0); break;
    case 2: body(w, g, m, v, lo, hi, hp, 1, 2, 0); break;
    case 4: body(w, g, m, v, lo, hi, hp, 1, 0, 1); break;
    case 5: body(w, g, m, v, lo, hi, hp, 1, 1, 1); break;
    default: body(w, g, m, v, lo, hi, hp, 1, 2, 1); break;
    }
}

static void params_out(const float *w, void *p, int p_kind, int64_t lo, int64_t hi) {
    if (p_kind == 1)
        cast_bf16(w, (uint16_t *)p, lo, hi);
    else if (p_kind == 2)
        memcpy((float *)p + lo, w + lo, (size_t)(hi - lo) * sizeof(float));
}

/* AdamW on elements [lo, hi); elements at or past `tail` take torch's scalar-remainder rounding. The new
   weights also go to `p` as bf16 (p_kind 1) or fp32 (2); p_kind 0: no params out. Block by block, so that
   the params are written from weights still in the L1 cache. */
void fy_adamw(float *w, const float *g, float *m, float *v, void *p, int p_kind, int64_t lo, int64_t hi,
              int64_t tail, const fy_adamw_hp *hp, int variant) {
    const int64_t block = 2048;
    int64_t split = tail < lo ? lo : (tail > hi ? hi : tail);
    for (int64_t b = lo; b < split; b += block) {
        int64_t e = b + block < split ? b + block : split;
        vector_part(w, g, m, v, b, e, hp, variant);
        params_out(w, p, p_kind, b, e);
    }
    body(w, g, m, v, split, hi, hp, (variant & TAIL_M) != 0, (variant >> TAIL_V_SHIFT) & 3,
         (variant & TAIL_W) != 0);
    params_out(w, p, p_kind, split, hi);
}
