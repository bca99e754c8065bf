/* The CPU decode kernel of one MoE adapter: out = base + alpha_l * MoE(h), token by token, in one call.
 *
 * Why C: at batch 1 a decode step's adapter work is a few thousand multiply-adds per layer, and PyTorch's
 * per-operation cost (a dozen small operations, about 7 us each on a 2-core VM) is larger than the work
 * itself; one call here does the routing, the chosen experts only and the residual add
 * (docs/design.md section 3, modeling/decode_kernel.py). Built on first use by decode_kernel.py with the
 * system C compiler; no PyTorch headers, so the build takes a fraction of a second.
 *
 * Routing: top-k of (logits + bias) over the experts, gates = softmax of the chosen logits (or, with
 * normalise_all, each chosen expert's probability under the softmax of all logits: the switch router).
 * A choice numbered `real` or above is the null expert: its gate counts, its output is zero.
 * Banks (registered names of modeling/experts.py and modeling/lora_experts.py):
 *   shared_core:  t = z + sum_i g_i W2_i silu(W1_i z), delta = U t  (z = A h, U = alpha_l * s * B);
 *   shared_down:  delta = sum_i g_i U_i z                             (U_i = alpha_l * s * B_i);
 *   lora_experts: delta = U_s z_s + sum_i g_i U_i z_i                 (z_i = A_i h, U_i = alpha_l * s * B_i).
 * Hidden states and the base output are float32 or bfloat16 (rounded to nearest even); weights float32.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    int32_t hidden, experts, real, top_k, normalise_all, rank, width;  /* experts: choices; real: computed ones */
    const float *rows;     /* [experts + rank, hidden]: the router's W_g on top of the bank's A */
    const float *bias;     /* [experts] or NULL: steers the choice only */
    const float *core_in;  /* shared_core: [experts, rank, width] */
    const float *core_out; /* shared_core: [experts, width, rank] */
    const float *up;       /* shared_core: [hidden, rank]; shared_down: [real, rank, hidden];
                              lora_experts: [rank, hidden], the shared B_s rows then each expert's width rows */
} Plan;

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

/* logits and z of one token, the chosen experts and their gates */
static void route(const Plan *p, const float *x, float *projected, int *chosen, float *gates) {
    const int d = p->hidden, e = p->experts, m = p->experts + p->rank;
    for (int row = 0; row < m; row++) {
        const float *w = p->rows + (long)row * d;
        float acc = 0.f;
        for (int c = 0; c < d; c++) acc += w[c] * x[c];
        projected[row] = acc;
    }
    unsigned char taken[e];
    memset(taken, 0, (size_t)e);
    for (int s = 0; s < p->top_k; s++) {
        int best = -1;
        float best_value = 0.f;
        for (int i = 0; i < e; i++) {
            float v = projected[i] + (p->bias ? p->bias[i] : 0.f);
            if (!taken[i] && (best < 0 || v > best_value)) { best = i; best_value = v; }
        }
        taken[best] = 1;
        chosen[s] = best;
    }
    float top = -INFINITY, total = 0.f;
    for (int i = 0; i < e; i++)
        if (p->normalise_all || taken[i]) top = projected[i] > top ? projected[i] : top;
    for (int i = 0; i < e; i++)
        if (p->normalise_all || taken[i]) total += expf(projected[i] - top);
    for (int s = 0; s < p->top_k; s++) gates[s] = expf(projected[chosen[s]] - top) / total;
}

/* Token n's router input x (from h) and its routing: the first step of every bank's kernel. */
static void route_token(const Plan *p, const void *h, int bf16, long n, float *x, float *projected, int *chosen,
                        float *gates) {
    for (int c = 0; c < p->hidden; c++) x[c] = load(h, bf16, n * p->hidden + c);
    route(p, x, projected, chosen, gates);
}

static void finish(const Plan *p, const float *delta, const void *base, void *out, int bf16, long offset) {
    for (int c = 0; c < p->hidden; c++) store(out, bf16, offset + c, load(base, bf16, offset + c) + delta[c]);
}

void shared_core_add(const Plan *p, long tokens, const void *h, const void *base, void *out, int bf16) {
    const int d = p->hidden, r = p->rank, w = p->width;
    float x[d], projected[p->experts + r], gates[p->top_k], t[r], a[w], delta[d];
    int chosen[p->top_k];
    for (long n = 0; n < tokens; n++) {
        route_token(p, h, bf16, n, x, projected, chosen, gates);
        const float *z = projected + p->experts;
        for (int j = 0; j < r; j++) t[j] = z[j];
        for (int s = 0; s < p->top_k; s++) {
            if (chosen[s] >= p->real) continue;  /* the null expert */
            const float *w1 = p->core_in + (long)chosen[s] * r * w, *w2 = p->core_out + (long)chosen[s] * w * r;
            for (int q = 0; q < w; q++) a[q] = 0.f;
            for (int j = 0; j < r; j++)
                for (int q = 0; q < w; q++) a[q] += z[j] * w1[j * w + q];
            for (int q = 0; q < w; q++) {
                float v = gates[s] * a[q] / (1.f + expf(-a[q]));
                for (int j = 0; j < r; j++) t[j] += v * w2[q * r + j];
            }
        }
        for (int c = 0; c < d; c++) {
            const float *u = p->up + (long)c * r;
            float acc = 0.f;
            for (int j = 0; j < r; j++) acc += u[j] * t[j];
            delta[c] = acc;
        }
        finish(p, delta, base, out, bf16, n * d);
    }
}

void shared_down_add(const Plan *p, long tokens, const void *h, const void *base, void *out, int bf16) {
    const int d = p->hidden, r = p->rank;
    float x[d], projected[p->experts + r], gates[p->top_k], delta[d];
    int chosen[p->top_k];
    for (long n = 0; n < tokens; n++) {
        route_token(p, h, bf16, n, x, projected, chosen, gates);
        const float *z = projected + p->experts;
        for (int c = 0; c < d; c++) delta[c] = 0.f;
        for (int s = 0; s < p->top_k; s++)
            for (int j = 0; j < r && chosen[s] < p->real; j++) {
                const float *u = p->up + ((long)chosen[s] * r + j) * d;
                float scale = gates[s] * z[j];
                for (int c = 0; c < d; c++) delta[c] += scale * u[c];
            }
        finish(p, delta, base, out, bf16, n * d);
    }
}

void lora_experts_add(const Plan *p, long tokens, const void *h, const void *base, void *out, int bf16) {
    const int d = p->hidden, r = p->rank, w = p->width, shared = p->rank - p->real * p->width;
    float x[d], projected[p->experts + r], gates[p->top_k], delta[d];
    int chosen[p->top_k];
    for (long n = 0; n < tokens; n++) {
        route_token(p, h, bf16, n, x, projected, chosen, gates);
        const float *z = projected + p->experts;
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
        finish(p, delta, base, out, bf16, n * d);
    }
}
