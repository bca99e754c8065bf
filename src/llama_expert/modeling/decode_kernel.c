/* The CPU decode kernel of one MoE adapter: out = base + alpha_l * MoE(h), token by token, in one call.
 *
 * Why C: at batch 1 a decode step's adapter work is a few thousand multiply-adds per layer, and PyTorch's
 * per-operation cost (a dozen small operations, about 7 us each on a 2-core VM) is larger than the work
 * itself; one call here does the routing, the chosen experts only and the residual add
 * (docs/design.md section 3, modeling/decode_kernel.py). Built on first use by decode_kernel.py with the
 * system C compiler; no PyTorch headers, so the build takes a fraction of a second.
 *
 * Two entry points: adapter_add (a bank beside the MLP: out = base + its delta) and layer_add (a bank that computes
 * the whole layer, mixlora: the routed part of the MLP's own computation). The plan names the router's and the
 * bank's parts by function pointer (looked up by name in this library by decode_kernel.py: "<form>_logits",
 * "<bank>_delta" or "<bank>_layer"), so a new form is a new function here and its name in Python, not a branch.
 *
 * Router input: the token's h, or (prefix_mean: sequence_aux_free, prototype) the mean of its sequence's
 * non-padding tokens so far, earlier passes' sum and count included (a Prefix; its totals after the last token of
 * each sequence are written back for the next pass).
 * Logits:  linear:    z = W_g x;
 *          prototype: z_i = -max(0, ||x - c||^2 - 2 (x - c).q_i + ||q_i||^2) / (d T), q_i = p_i - c, c the
 *                     prototypes' mean; with a null expert z_null = -(null_distance + null_slope / n) / T, n the
 *                     length of the token's prefix (1 when routing by the token).
 * Routing: top-k of (logits + bias) over the experts, gates = softmax of the chosen logits (or, with
 * normalise_all, each chosen expert's probability under the softmax of all logits: the switch router).
 * A choice numbered `real` or above is the null expert: its gate counts, its output is zero.
 * Banks (registered names of modeling/experts.py and modeling/lora_experts.py), with z = A h:
 *   shared_core:  t = z + sum_i g_i W2_i silu(W1_i z), delta = U t  (U = alpha_l * s * B);
 *   shared_down:  delta = sum_i g_i U_i z                             (U_i = alpha_l * s * B_i);
 *   lora_experts: delta = U_s z_s + sum_i g_i U_i z_i                 (z_i = A_i h, U_i = alpha_l * s * B_i).
 *   mixlora (layer_add): see mixlora_layer below.
 * Hidden states and the base output are float32 or bfloat16 (rounded to nearest even); weights float32.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct Plan Plan;
typedef void (*logits_fn)(const Plan *p, const float *x, float count, float *logits);
typedef void (*delta_fn)(const Plan *p, const float *z, const int *chosen, const float *gates, float *delta);
typedef void (*layer_fn)(const Plan *p, const float *x, const int *chosen, const float *gates, const float *u,
                         const float *v, float *m, float *down);

struct Plan {
    int32_t hidden, experts, real, top_k, normalise_all, rank, width;  /* experts: choices; real: computed ones */
    int32_t prefix_mean;    /* 1: route by the sequence's prefix mean (a Prefix is passed), 0: by the token */
    float divisor;          /* prototype: d * T */
    float null_logit;       /* prototype with a null expert: -null_distance / T ... */
    float null_slope;       /* ... plus this over the prefix's length: -null_slope / T */
    float alpha;            /* alpha_l, for a layer bank (a delta bank has it folded into up) */
    logits_fn logits;       /* linear_logits or prototype_logits */
    delta_fn delta;         /* <bank>_delta (adapter_add), or NULL */
    layer_fn layer;         /* <bank>_layer (layer_add), or NULL */
    const float *router_rows; /* linear: W_g [experts, hidden]; prototype: the centred prototypes [real, hidden] */
    const float *bias;      /* [experts] or NULL: steers the choice only */
    const float *centre;    /* prototype: [hidden], the prototypes' mean */
    const float *row_norms; /* prototype: [real], ||p_i - centre||^2 */
    const float *rows;      /* the bank's A: [rank, hidden]; mixlora: [real, 2 rank, hidden] */
    const float *core_in;   /* shared_core: [experts, rank, width]; mixlora: [real, 2 rank, width] */
    const float *core_out;  /* shared_core: [experts, width, rank]; mixlora: [real, rank, width] */
    const float *up;        /* shared_core: [hidden, rank]; shared_down: [real, rank, hidden];
                               lora_experts: [rank, hidden], the shared B_s rows then each expert's width rows;
                               mixlora: [real, rank, hidden] */
};

typedef struct {
    int64_t length;            /* tokens per sequence in this call: token n is of sequence n / length */
    const uint8_t *mask;       /* [tokens]: 0 for padding, or NULL (no padding) */
    const float *before_total; /* [sequences, hidden] and [sequences]: what earlier passes left, or NULL (none) */
    const float *before_count;
    float *after_total;        /* [sequences, hidden] and [sequences]: the totals for the next pass, or NULL */
    float *after_count;
} Prefix;

static float load(const void *data, int bf16, long i) {
    if (!bf16) return ((const float *)data)[i];
    uint32_t bits = (uint32_t)((const uint16_t *)data)[i] << 16;
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

static void store(void *data, int bf16, long i, float value) {
    if (!bf16) { ((float *)data)[i] = value; return; }
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) bits |= 0x00400000u;       /* NaN stays a (quiet) NaN */
    else bits += 0x7fffu + ((bits >> 16) & 1u);                        /* round to nearest even */
    ((uint16_t *)data)[i] = (uint16_t)(bits >> 16);
}

static void project(const float *rows, int count, int d, const float *x, float *out) {
    for (int row = 0; row < count; row++) {
        const float *w = rows + (long)row * d;
        float acc = 0.f;
        for (int c = 0; c < d; c++) acc += w[c] * x[c];
        out[row] = acc;
    }
}

/* exp(x) with about libm's accuracy for silu (worst relative error of silu about 2.2e-7, against 1.7e-7 with expf,
 * over -80..80): Cody-Waite reduction to r in [-ln2/2, ln2/2] and Cephes' degree-6 polynomial, with no call and no
 * branch, so that the loops over the MLP's width vectorise (expf is a call per element: ten times slower, and it
 * made silu most of a mixlora call's time; fminf and fmaxf in the clamp stop the vectoriser too). The fmaf steps
 * keep -fassociative-math from merging the split ln 2. Beyond the float range it gives inf and 0, and NaN for NaN,
 * as expf does (so silu(-inf) is NaN, as in PyTorch). Every silu of the kernel uses it (shared_core's cores too). */
static inline float exp_approx(float x) {
    const float c = x > -87.f ? (x < 88.f ? x : 88.f) : -87.f;  /* NaN becomes -87: the integer part stays defined */
    const float n = floorf(fmaf(c, 1.44269504f, 0.5f));
    const float r = fmaf(n, 2.12194440e-4f, fmaf(n, -0.693359375f, c));
    float p = 1.9875691500e-4f;
    p = fmaf(p, r, 1.3981999507e-3f);
    p = fmaf(p, r, 8.3334519073e-3f);
    p = fmaf(p, r, 4.1665795894e-2f);
    p = fmaf(p, r, 1.6666665459e-1f);
    p = fmaf(p, r, 5.0000001201e-1f);
    p = fmaf(p, r * r, r + 1.f);
    const int32_t bits = ((int32_t)n + 127) << 23;  /* 2^n: n lies in -126..127 */
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    const float value = p * scale;
    return x > 88.f ? INFINITY : (x < -87.f ? 0.f : (x == x ? value : x));
}

static float silu(float x) { return x / (1.f + exp_approx(-x)); }

void linear_logits(const Plan *p, const float *x, float count, float *logits) {
    (void)count;
    project(p->router_rows, p->experts, p->hidden, x, logits);
}

/* As PrototypeRouter.logits: the origin moved to the prototypes' mean, (||x||^2 - 2 x.q) + ||q||^2, clamped at 0 */
void prototype_logits(const Plan *p, const float *x, float count, float *logits) {
    const int d = p->hidden;
    float centred[d], norm = 0.f;
    for (int c = 0; c < d; c++) { centred[c] = x[c] - p->centre[c]; norm += centred[c] * centred[c]; }
    project(p->router_rows, p->real, d, centred, logits);
    for (int i = 0; i < p->real; i++) {
        float squared = (norm - 2.f * logits[i]) + p->row_norms[i];
        logits[i] = -(squared > 0.f ? squared : 0.f) / p->divisor;
    }
    if (p->experts > p->real) logits[p->real] = p->null_logit + p->null_slope / (count > 1.f ? count : 1.f);
}

/* The chosen experts and their gates from the logits */
static void choose(const Plan *p, const float *logits, int *chosen, float *gates) {
    const int e = p->experts;
    unsigned char taken[e];
    memset(taken, 0, (size_t)e);
    for (int s = 0; s < p->top_k; s++) {
        int best = -1;
        float best_value = 0.f;
        for (int i = 0; i < e; i++) {
            float v = logits[i] + (p->bias ? p->bias[i] : 0.f);
            if (!taken[i] && (best < 0 || v > best_value)) { best = i; best_value = v; }
        }
        taken[best] = 1;
        chosen[s] = best;
    }
    float top = -INFINITY, total = 0.f;
    for (int i = 0; i < e; i++)
        if (p->normalise_all || taken[i]) top = logits[i] > top ? logits[i] : top;
    for (int i = 0; i < e; i++)
        if (p->normalise_all || taken[i]) total += expf(logits[i] - top);
    for (int s = 0; s < p->top_k; s++) gates[s] = expf(logits[chosen[s]] - top) / total;
}

/* Token n's prefix mean, as routing/prefix_state.py computes it: this call's masked running sum (accumulated in
 * double, as PyTorch's CPU cumsum does, then rounded), plus the earlier passes' total, over max(1, count). */
static const float *prefix_mean(const Plan *p, const Prefix *s, const float *x, long n, double *sum, double *count,
                                float *mean, float *length) {
    const int d = p->hidden;
    const long b = n / s->length, t = n % s->length;
    const int last = t == s->length - 1;
    if (t == 0) { for (int c = 0; c < d; c++) sum[c] = 0.0; *count = 0.0; }
    if (!s->mask || s->mask[n]) { for (int c = 0; c < d; c++) sum[c] += x[c]; *count += 1.0; }
    const float total_count = (float)*count + (s->before_count ? s->before_count[b] : 0.f);
    const float divisor = total_count > 1.f ? total_count : 1.f;
    for (int c = 0; c < d; c++) {
        const float total = (float)sum[c] + (s->before_total ? s->before_total[b * d + c] : 0.f);
        mean[c] = total / divisor;
        if (last && s->after_total) s->after_total[b * d + c] = total;
    }
    if (last && s->after_count) s->after_count[b] = total_count;
    *length = total_count;
    return mean;
}

/* Token n's hidden state into x, its logits routed into chosen and gates (prefix: the running sums) */
static void route(const Plan *p, const Prefix *s, const void *h, int bf16, long n, float *x, double *sum,
                  double *count, float *mean, float *logits, int *chosen, float *gates) {
    const int d = p->hidden;
    for (int c = 0; c < d; c++) x[c] = load(h, bf16, n * d + c);
    float length = 1.f;
    const float *input = p->prefix_mean && s ? prefix_mean(p, s, x, n, sum, count, mean, &length) : x;
    p->logits(p, input, length, logits);
    choose(p, logits, chosen, gates);
}

void adapter_add(const Plan *p, long tokens, const void *h, const void *base, void *out, int bf16, const Prefix *s) {
    const int d = p->hidden;
    float x[d], mean[d], logits[p->experts], z[p->rank > 0 ? p->rank : 1], gates[p->top_k], delta[d];
    double sum[d], count = 0.0;
    int chosen[p->top_k];
    for (long n = 0; n < tokens; n++) {
        route(p, s, h, bf16, n, x, sum, &count, mean, logits, chosen, gates);
        project(p->rows, p->rank, d, x, z);
        p->delta(p, z, chosen, gates, delta);
        for (int c = 0; c < d; c++) store(out, bf16, n * d + c, load(base, bf16, n * d + c) + delta[c]);
    }
}

void shared_core_delta(const Plan *p, const float *z, const int *chosen, const float *gates, float *delta) {
    const int d = p->hidden, r = p->rank, w = p->width;
    float t[r], a[w];
    for (int j = 0; j < r; j++) t[j] = z[j];
    for (int s = 0; s < p->top_k; s++) {
        if (chosen[s] >= p->real) continue;  /* the null expert */
        const float *w1 = p->core_in + (long)chosen[s] * r * w, *w2 = p->core_out + (long)chosen[s] * w * r;
        for (int q = 0; q < w; q++) a[q] = 0.f;
        for (int j = 0; j < r; j++)
            for (int q = 0; q < w; q++) a[q] += z[j] * w1[j * w + q];
        for (int q = 0; q < w; q++) {
            float v = gates[s] * silu(a[q]);
            for (int j = 0; j < r; j++) t[j] += v * w2[q * r + j];
        }
    }
    project(p->up, d, r, t, delta);
}

void shared_down_delta(const Plan *p, const float *z, const int *chosen, const float *gates, float *delta) {
    const int d = p->hidden, r = p->rank;
    for (int c = 0; c < d; c++) delta[c] = 0.f;
    for (int s = 0; s < p->top_k; s++)
        for (int j = 0; j < r && chosen[s] < p->real; j++) {
            const float *u = p->up + ((long)chosen[s] * r + j) * d;
            float scale = gates[s] * z[j];
            for (int c = 0; c < d; c++) delta[c] += scale * u[c];
        }
}

void lora_experts_delta(const Plan *p, const float *z, const int *chosen, const float *gates, float *delta) {
    const int d = p->hidden, w = p->width, shared = p->rank - p->real * p->width;
    for (int c = 0; c < d; c++) delta[c] = 0.f;
    for (int j = 0; j < shared; j++) {
        const float *u = p->up + (long)j * d;
        for (int c = 0; c < d; c++) delta[c] += z[j] * u[c];
    }
    for (int s = 0; s < p->top_k; s++)
        for (int j = 0; j < w && chosen[s] < p->real; j++) {
            const long row = shared + (long)chosen[s] * w + j;
            const float *u = p->up + row * d;
            float scale = gates[s] * z[row];
            for (int c = 0; c < d; c++) delta[c] += scale * u[c];
        }
}

/* A layer bank's call: token by token, route, then the bank's <bank>_layer with the token's rows of u = W1 h,
 * v = W3 h and m = act(u) * v (the frozen projections, computed by PyTorch as the MLP computes them; float32 or
 * bfloat16 like h; bfloat16 rows are read into float32 copies, m written back rounded once). The bank leaves W2's
 * input in m (in place) and its own output beside W2 in down (float32 [tokens, hidden]). Returns 0, or -1 when the
 * copies' memory cannot be had (nothing written). */
int layer_add(const Plan *p, long tokens, const void *h, const void *u, const void *v, void *m, float *down,
              int bf16, const Prefix *s) {
    const int d = p->hidden, width = p->width;
    float x[d], mean[d], logits[p->experts], gates[p->top_k];
    double sum[d], count = 0.0;
    int chosen[p->top_k];
    float *rows = bf16 ? malloc(sizeof(float) * (size_t)width * 3) : NULL;  /* u, v, m of the token */
    if (bf16 && !rows) return -1;
    for (long n = 0; n < tokens; n++) {
        route(p, s, h, bf16, n, x, sum, &count, mean, logits, chosen, gates);
        if (!bf16) {
            p->layer(p, x, chosen, gates, (const float *)u + n * width, (const float *)v + n * width,
                     (float *)m + n * width, down + n * d);
            continue;
        }
        for (int q = 0; q < width; q++) {
            rows[q] = load(u, 1, n * width + q);
            rows[width + q] = load(v, 1, n * width + q);
            rows[2 * width + q] = load(m, 1, n * width + q);
        }
        p->layer(p, x, chosen, gates, rows, rows + width, rows + 2 * width, down + n * d);
        for (int q = 0; q < width; q++) store(m, 1, n * width + q, rows[2 * width + q]);
    }
    free(rows);
    return 0;
}

/* mixlora (modeling/experts.py MixLoRAExperts), expert i on the chosen slots (none for the null expert):
 *   u_i = u + D1_i C1_i x,  v_i = v + D3_i C3_i x,  m_i = silu(u_i) * v_i      (s folded into D1_i, D3_i)
 *   m <- m + alpha_l sum_i g_i (m_i - silu(u) * v)   (W2's input; the difference of two products computed here
 *                                                     alike, so that zero deltas (step 0) change nothing)
 *   down = sum_i g_i U_i C2_i m_i                    (U_i = alpha_l s D2_i)
 * rows: C1_i then C3_i [2r, hidden]; core_in: D1_i then D3_i [2r, width]; core_out: C2_i [r, width]; up: U_i.
 * The MLP's width is walked in blocks that stay in the first-level cache, each weight read once. */
#define BLOCK 64

void mixlora_layer(const Plan *p, const float *x, const int *chosen, const float *gates, const float *u,
                   const float *v, float *m, float *down) {
    const int d = p->hidden, r = p->rank, width = p->width, k = p->top_k;
    float z[k][2 * r], zd[k][r];
    int real = 0;
    for (int c = 0; c < d; c++) down[c] = 0.f;
    for (int slot = 0; slot < k; slot++) {
        if (chosen[slot] >= p->real) continue;  /* the null expert */
        real = 1;
        project(p->rows + (long)chosen[slot] * 2 * r * d, 2 * r, d, x, z[slot]);
        for (int j = 0; j < r; j++) zd[slot][j] = 0.f;
    }
    if (!real) return;  /* the null expert alone: the frozen MLP's own m */
    for (int q0 = 0; q0 < width; q0 += BLOCK) {
        const int n = width - q0 < BLOCK ? width - q0 : BLOCK;
        float plain[BLOCK], change[BLOCK], ui[BLOCK], vi[BLOCK];
        for (int q = 0; q < n; q++) { plain[q] = silu(u[q0 + q]) * v[q0 + q]; change[q] = 0.f; }
        for (int slot = 0; slot < k; slot++) {
            const int i = chosen[slot];
            if (i >= p->real) continue;
            const float *d1 = p->core_in + (long)i * 2 * r * width + q0, *d3 = d1 + (long)r * width;
            const float *c2 = p->core_out + (long)i * r * width + q0;
            for (int q = 0; q < n; q++) { ui[q] = u[q0 + q]; vi[q] = v[q0 + q]; }
            for (int j = 0; j < r; j++)
                for (int q = 0; q < n; q++) {
                    ui[q] += z[slot][j] * d1[(long)j * width + q];
                    vi[q] += z[slot][r + j] * d3[(long)j * width + q];
                }
            for (int q = 0; q < n; q++) {
                ui[q] = silu(ui[q]) * vi[q];  /* m_i */
                change[q] += gates[slot] * (ui[q] - plain[q]);
            }
            for (int j = 0; j < r; j++) {
                float acc = 0.f;
                for (int q = 0; q < n; q++) acc += c2[(long)j * width + q] * ui[q];
                zd[slot][j] += acc;
            }
        }
        for (int q = 0; q < n; q++) m[q0 + q] += p->alpha * change[q];
    }
    for (int slot = 0; slot < k; slot++)
        for (int j = 0; j < r && chosen[slot] < p->real; j++) {
            const float *up = p->up + ((long)chosen[slot] * r + j) * d;
            const float scale = gates[slot] * zd[slot][j];
            for (int c = 0; c < d; c++) down[c] += scale * up[c];
        }
}
