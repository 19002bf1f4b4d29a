/* Fused CPU kernels for the NB and ZINB log-likelihood row sums and their gradients.
 *
 * Plain C, loaded with ctypes by cellvae/_kernels.py (no Python API, no torch headers). The
 * maths is that of
 * cellvae/distributions.py (see the docstrings of _NBLogProbSum and _ZINBLogProbSum there):
 *
 *   t = log(1 + mu/theta), q = theta/(theta + mu)
 *   NB   log p(x) = -theta t + [x > 0] rest,  rest = lgamma(x+theta) - lgamma(theta)
 *                                                    - lgamma(x+1) - x log(1 + theta/mu)
 *   ZINB log p(0) = log(w + (1 - w) exp(-theta t)), w = sigmoid(pi)
 *        log p(x) = -softplus(pi) - theta t + rest                       (x > 0)
 *
 * One pass over the dense (B, G) entries evaluates the x = 0 branch and its gradients for a
 * unit row gradient, in float32 with the vector maths of glibc's libmvec (the loops are
 * vectorised by the compiler; the __simd__ declarations below tell it those functions exist).
 * A second pass over the stored nonzeros, gathered into contiguous double arrays, evaluates
 * the x > 0 terms in float64 (lgamma and digamma by shift and Stirling series) and overwrites
 * the dense values at those positions. theta is per gene (G values), or per entry ((B, G):
 * dispersions per batch and gene, or per cell); other shapes are left to the torch code.
 *
 * The gradient outputs (each (B, G)) hold, for a unit gradient of each row sum:
 *   gmu = d/dmu, gpi = d/dpi (ZINB), gth = d/dtheta (summed over rows by the caller).
 */
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

extern float expf(float) __attribute__((__simd__("notinbranch")));
extern float logf(float) __attribute__((__simd__("notinbranch")));
extern float log1pf(float) __attribute__((__simd__("notinbranch")));
extern double exp(double) __attribute__((__simd__("notinbranch")));
extern double log(double) __attribute__((__simd__("notinbranch")));
extern double log1p(double) __attribute__((__simd__("notinbranch")));

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

/* This thread's share [*lo, *hi) of n items, inside a parallel region (all of them outside). */
static void thread_range(int64_t n, int64_t *lo, int64_t *hi) {
    int64_t nt = 1, t = 0;
#ifdef _OPENMP
    nt = omp_get_num_threads(), t = omp_get_thread_num();
#endif
    *lo = n * t / nt, *hi = n * (t + 1) / nt;
}

#define TINY 1e-30f /* below this p(0) the ZINB zero branch switches to its softplus form */
#define HALF_LOG_2PI 0.91893853320467274178

/* lgamma(z) and digamma(z) for z > 0, float64. Below 8, z is shifted to z + 8 with
 * lgamma(z) = lgamma(z + 8) - log P and digamma(z) = digamma(z + 8) - D / P, where
 * P = z (z+1) ... (z+7) and D = P * sum 1/(z+k) (its derivative: one division instead of
 * eight); then Stirling's series (truncation error below 1e-11 at z >= 8). Written without
 * branches so that the loops calling them vectorise. */
static inline void lgamma_digamma_pos(double z, double *lg, double *dg) {
    int small = z < 8.0;
    double zs = small ? z : 1.0; /* P and D stay small where they are not used */
    double P = 1.0, D = 0.0;
    for (int k = 0; k < 8; k++) {
        D = D * (zs + k) + P;
        P = P * (zs + k);
    }
    double zz = small ? z + 8.0 : z;
    double r = 1.0 / zz, r2 = r * r, lz = log(zz);
    double lser = r * (1.0 / 12 - r2 * (1.0 / 360 - r2 * (1.0 / 1260 - r2 * (1.0 / 1680))));
    double dser = r2 * (1.0 / 12 - r2 * (1.0 / 120 - r2 * (1.0 / 252 - r2 * (1.0 / 240 - r2 / 132))));
    *lg = (zz - 0.5) * lz - zz + HALF_LOG_2PI + lser - (small ? log(P) : 0.0);
    *dg = lz - 0.5 * r - dser - (small ? D / P : 0.0);
}

/* lgamma and digamma of n positive float32 values, in float64, in vector registers (the loop
 * is cloned for AVX2 / AVX-512: a per-entry protein theta takes it for every entry of a step;
 * the baseline build's two-lane SSE2 took 20 ns a value). */
CLONES static void lgamma_digamma_n(int64_t n, const float *restrict z, double *restrict lg,
                                    double *restrict dg) {
    for (int64_t k = 0; k < n; k++) lgamma_digamma_pos(z[k], lg + k, dg + k);
}

static inline double lgamma_pos(double z) {
    double lg, dg;
    lgamma_digamma_pos(z, &lg, &dg);
    return lg;
}

/* The softplus form of the ZINB zero branch for one entry, where w + (1-w) r underflows. */
static void zinb_zero_stable(float m, float th, float pi, float *lp0, float *gmu, float *gpi,
                             float *gth) {
    double t = log1p((double)m / th), b = -(double)pi - th * t;
    double sp_b = (b > 0 ? b : 0.0) + log1p(exp(-fabs(b)));
    double sp_mpi = (pi < 0 ? -(double)pi : 0.0) + log1p(exp(-fabs((double)pi)));
    double s = 1.0 / (1.0 + exp(-b)), w = 1.0 / (1.0 + exp(-(double)pi));
    double q = th / ((double)th + m);
    *lp0 = (float)(sp_b - sp_mpi);
    if (gmu) {
        *gpi = (float)((1.0 - w) - s);
        *gmu = (float)(-s * q);
        *gth = (float)(-s * (t + q - 1.0));
    }
}

/* A buffer kept from call to call by the thread that uses it; it only grows. Allocated and
 * freed each call, glibc served the nonzeros' ~1.6 MB (128 cells x 2,000 genes at 8%) by mmap
 * and handed it back, and its ~400 pages were faulted in again at every call: 0.7 ms of compute
 * took 2.8. */
typedef struct {
    void *p;
    size_t capacity;
} scratch;

/* Makes s->p hold at least bytes; returns 0, or -1 when out of memory (s is then unchanged). */
static int scratch_grow(scratch *s, size_t bytes) {
    if (bytes <= s->capacity) return 0;
    void *grown = realloc(s->p, bytes);
    if (!grown) return -1;
    s->p = grown, s->capacity = bytes;
    return 0;
}

/* Scratch for the gathered nonzeros of a minibatch: eleven arrays in one allocation. */
typedef struct {
    double *x, *m, *th, *pi, *lgc, *dgth, *out, *gmu, *gpi, *gth, *gz;
} nz_buf;

static __thread scratch nz_scratch;

static int nz_alloc(nz_buf *b, int64_t n) {
    size_t len = (size_t)(n > 0 ? n : 1);
    if (scratch_grow(&nz_scratch, sizeof(double) * 11 * len)) return -1;
    double *base = nz_scratch.p;
    double **f[] = {&b->x, &b->m, &b->th, &b->pi, &b->lgc, &b->dgth,
                    &b->out, &b->gmu, &b->gpi, &b->gth, &b->gz};
    for (int i = 0; i < 11; i++) *f[i] = base + (size_t)i * len;
    return 0;
}

/* The arguments of the nonzero passes: inputs gathered at the n nonzeros, outputs per nonzero. */
#define NZ_ARGS                                                                                   \
    int64_t n, double eps, const double *restrict x_, const double *restrict m_,                   \
        const double *restrict th_, const double *restrict pi_, const double *restrict lgc,       \
        const double *restrict dgth, double *restrict out, double *restrict gmu,                   \
        double *restrict gpi, double *restrict gth, double *restrict gz

/* The NB's terms that vanish at x = 0, for one nonzero, float64: returns lgamma(x + theta) -
 * lgamma(theta) - lgamma(x + 1) - x log(1 + theta/mu), and its derivatives by mu and theta.
 * lgc: lgamma(theta) + lgamma(x + 1); dgth: digamma(theta). */
static inline double nb_rest(double x, double m, double th, double lgc, double dgth, double eps,
                             double *d_mu, double *d_th) {
    double mc = m >= eps ? m : eps, x_over = x / (mc + th), lg, dg;
    lgamma_digamma_pos(x + th, &lg, &dg);
    *d_mu = m >= eps ? x_over * th / mc : 0.0;
    *d_th = dg - dgth - x_over;
    return lg - lgc - x * log1p(th / mc);
}

/* log(x!) = lgamma(x + 1) of the counts below LOG_FACT_N, filled when the library is loaded:
 * counts are integers, and a lookup while gathering the nonzeros spares the vectorised pass
 * one of its two lgamma evaluations. */
#define LOG_FACT_N 4096
static double log_fact[LOG_FACT_N];

__attribute__((constructor)) static void fill_log_fact(void) {
    for (int i = 0; i < LOG_FACT_N; i++) log_fact[i] = lgamma_pos(i + 1.0);
}

static inline double lgamma_x_plus_1(double x) {
    int table = x >= 0 && x < LOG_FACT_N && x == (double)(int)x;
    return table ? log_fact[(int)x] : lgamma_pos(x + 1.0);
}

/* x > 0 terms of the NB at the gathered nonzeros: what they add to the dense pass. */
CLONES static void nz_terms_nb(NZ_ARGS) {
    (void)pi_, (void)gpi, (void)gz;
    for (int64_t k = 0; k < n; k++) {
        double d_mu, d_th;
        out[k] = nb_rest(x_[k], m_[k], th_[k], lgc[k], dgth[k], eps, &d_mu, &d_th);
        gmu[k] = d_mu;
        gth[k] = d_th;
    }
}

/* ZINB at the gathered nonzeros, float64: the positive branch minus the zero branch (for the
 * row sums), the positive branch's gradients, which replace the dense pass's, and the zero
 * branch's derivative by theta, -s (t + q - 1) with s = sigmoid(-pi - theta t) (the dense
 * pass's value there, which sums of the theta derivatives over rows take out again). */
CLONES static void nz_terms_zinb(NZ_ARGS) {
    for (int64_t k = 0; k < n; k++) {
        double m = m_[k], th = th_[k], pi = pi_[k], d_mu, d_th;
        double rest = nb_rest(x_[k], m, th, lgc[k], dgth[k], eps, &d_mu, &d_th);
        double t = log1p(m / th), q = th / (th + m);
        double e = exp(-fabs(pi));
        double sp_pi = (pi > 0 ? pi : 0.0) + log1p(e); /* softplus(pi) */
        double w = (pi >= 0 ? 1.0 : e) / (1.0 + e);   /* sigmoid(pi) */
        double bb = -pi - th * t;                      /* log p(0), softplus form */
        double eb = exp(-fabs(bb));
        double lp0 = (bb > 0 ? bb : 0.0) + log1p(eb) - (sp_pi - pi);
        double s = (bb >= 0 ? 1.0 : eb) / (1.0 + eb); /* sigmoid(bb) */
        out[k] = rest - th * t - sp_pi - lp0; /* the caller skips stored zeros */
        gpi[k] = -w;
        gmu[k] = d_mu - q;
        gth[k] = d_th - (t + q - 1.0);
        gz[k] = -s * (t + q - 1.0);
    }
}

/* The largest argument -x of expf(-x) in the dense pass. A variable, not a constant: gcc rewrites
 * expf(-(x > 80 ? 80 : x)) as x > 80 ? expf(-80) : expf(-x), which calls expf at -x anyway. */
float cv_exp_arg_max = 80.0f;

/* The x = 0 branch of the ZINB for one entry, float32: returns p(0) = w + (1 - w) r, with
 * t = log(1 + mu/theta), r = exp(-theta t) and w = sigmoid(pi). No argument of expf goes below
 * -lim (80): out of its range (below about -87.3) libmvec evaluates the vector's lanes one at a
 * time, 3x slower for a minibatch with pi = -90. The clamp changes r or w only where they are
 * below 2e-35, which p(0) cannot see unless both are that small, and then p(0) < TINY sends the
 * entry to the float64 softplus form. NaNs pass through (x > lim is false for them). */
static inline float zinb_p0(float m, float th, float pi, float lim, float *t, float *rr,
                            float *w) {
    *t = log1pf(m / th);
    float u = th * *t, a = fabsf(pi);
    *rr = expf(-(u > lim ? lim : u));
    float e = expf(-(a > lim ? lim : a));
    *w = (pi >= 0.0f ? 1.0f : e) / (1.0f + e);
    return *w + (1.0f - *w) * *rr;
}

/* Dense x = 0 pass of the ZINB over one row of G entries: stores its sum in *out and returns
 * how many p(0) fell below TINY. The theta derivatives are stored in gt scaled by sc, or with
 * add_gt added to it unscaled (sums over rows, scaled at the end); gp is scaled by sc. */
CLONES static int64_t zinb_dense_row(int64_t G, const float *restrict m_,
                                   const float *restrict theta, const float *restrict pi_,
                                   float *restrict out, float *restrict gm, float *restrict gp,
                                   float *restrict gt, int add_gt, float sc) {
    int64_t n_small = 0;
    const float lim = cv_exp_arg_max;
    float acc = 0.0f;
    if (gm) {
        for (int64_t g = 0; g < G; g++) {
            float m = m_[g], th = theta[g], t, rr, w;
            float p0 = zinb_p0(m, th, pi_[g], lim, &t, &rr, &w), omw = 1.0f - w;
            acc += logf(p0);
            n_small += p0 < TINY;
            float s = omw * rr / p0, q = th / (th + m);
            gp[g] = (omw - s) * sc;
            gm[g] = -s * q;
            float d_th = -s * (t + q - 1.0f);
            gt[g] = add_gt ? gt[g] + d_th : d_th * sc;
        }
    } else {
        for (int64_t g = 0; g < G; g++) {
            float t, rr, w, p0 = zinb_p0(m_[g], theta[g], pi_[g], lim, &t, &rr, &w);
            acc += logf(p0);
            n_small += p0 < TINY;
        }
    }
    *out = acc;
    return n_small;
}

/* Dense -theta t pass of the NB over one row (gt as in zinb_dense_row). */
CLONES static void nb_dense_row(int64_t G, const float *restrict m_, const float *restrict theta,
                                float *restrict out, float *restrict gm, float *restrict gt,
                                int add_gt, float sc) {
    float acc = 0.0f;
    if (gm) {
        for (int64_t g = 0; g < G; g++) {
            float m = m_[g], th = theta[g];
            float t = log1pf(m / th), q = th / (th + m);
            acc -= th * t;
            gm[g] = -q;
            float d_th = 1.0f - t - q;
            gt[g] = add_gt ? gt[g] + d_th : d_th * sc;
        }
    } else {
        for (int64_t g = 0; g < G; g++) acc -= theta[g] * log1pf(m_[g] / theta[g]);
    }
    *out = acc;
}

/* The largest of G > 0 values, in vector registers: finite maths here only, which lets gcc use
 * vmaxps (a chain of scalar comparisons took most of softmax_row's time). A NaN among the
 * values may or may not be returned; the softmax of its row is NaN either way. */
CLONES __attribute__((optimize("finite-math-only", "no-signed-zeros"))) static float
row_max(int64_t G, const float *restrict h) {
    float mx = h[0];
    for (int64_t g = 1; g < G; g++) mx = fmaxf(mx, h[g]);
    return mx;
}

/* mu = lib * softmax(h) over one row of G logits (the decoder's gene proportions times the
 * library size). The arguments of expf are clamped at -lim as in zinb_p0: a proportion below
 * e^-80 (about 2e-35) of a row's largest is raised to that, which the likelihood cannot see,
 * since the NB's log takes mu floored at eps (1e-8) and lib stays far below 1e27. */
CLONES static void softmax_row(int64_t G, const float *restrict h, float lib, float *restrict m) {
    const float lim = cv_exp_arg_max;
    float mx = row_max(G, h), s = 0.0f;
    for (int64_t g = 0; g < G; g++) {
        float u = mx - h[g];
        m[g] = expf(-(u > lim ? lim : u));
        s += m[g];
    }
    float c = lib / s;
    for (int64_t g = 0; g < G; g++) m[g] *= c;
}

/* The unit row gradient by mu turned into the one by the logits h, in place, for
 * mu = lib * s with s = softmax(h): d/dh_k = mu_k (gmu_k - c) with c = sum_j s_j gmu_j, the
 * derivative by lib, which is returned. c is dot(mu, gmu) / lib, or, for a library of 0 (mu
 * and the logits' gradient vanish, c does not), summed from the softmax again. Both come out
 * multiplied by sc (the row gradient the caller expects; 1 for a unit one). */
CLONES static float softmax_grad_row(int64_t G, float lib, const float *restrict h,
                                     const float *restrict m, float *restrict gm, float sc) {
    double dot = 0.0, total = 0.0;
    if (lib > 0.0f) {
        for (int64_t g = 0; g < G; g++) dot += (double)m[g] * gm[g];
        total = lib;
    } else {
        const float lim = cv_exp_arg_max, mx = row_max(G, h);
        for (int64_t g = 0; g < G; g++) {
            float u = mx - h[g], e = expf(-(u > lim ? lim : u));
            total += e;
            dot += (double)e * gm[g];
        }
    }
    float c = (float)(dot / total);
    for (int64_t g = 0; g < G; g++) {
        float v = m[g] * (gm[g] - c);
        gm[g] = v * sc;
    }
    return c * sc;
}

/* lgamma and digamma of a per-entry theta at the gathered nonzeros (a per-gene theta has
 * them computed once per call, G values): lgc += lgamma(theta), dgth = digamma(theta). */
CLONES static void th_at_nonzeros(int64_t n, const double *restrict th, double *restrict lgc,
                                  double *restrict dgth) {
    for (int64_t k = 0; k < n; k++) {
        double lg, dg;
        lgamma_digamma_pos(th[k], &lg, &dg);
        lgc[k] += lg;
        dgth[k] = dg;
    }
}

/* Gathers the stored entries [k0, k1) into the scratch and evaluates their x > 0 terms; returns
 * 1 (and evaluates nothing) when one of them lies outside the (B, G) minibatch. */
static int nz_range(int64_t k0, int64_t k1, int64_t B, int64_t G, const float *mu,
                    const float *theta, int64_t th_ld, const float *pi, const int64_t *row,
                    const int64_t *col, const float *val, const double *lgth,
                    const double *dgth, double eps, const nz_buf *b) {
    for (int64_t k = k0; k < k1; k++) {
        int64_t c = col[k], i = row[k] * G + c;
        if (row[k] < 0 || row[k] >= B || c < 0 || c >= G) return 1;
        b->x[k] = val[k];
        b->m[k] = mu[i];
        b->th[k] = theta[row[k] * th_ld + c];
        b->pi[k] = pi ? pi[i] : 0.0;
        b->lgc[k] = lgamma_x_plus_1(val[k]) + (lgth ? lgth[c] : 0.0);
        b->dgth[k] = dgth ? dgth[c] : 0.0;
    }
    if (!lgth) th_at_nonzeros(k1 - k0, b->th + k0, b->lgc + k0, b->dgth + k0);
    (pi ? nz_terms_zinb : nz_terms_nb)(k1 - k0, eps, b->x + k0, b->m + k0, b->th + k0,
                                       b->pi + k0, b->lgc + k0, b->dgth + k0, b->out + k0,
                                       b->gmu + k0, b->gpi + k0, b->gth + k0, b->gz + k0);
    return 0;
}

/* Where the theta derivatives are summed over the rows instead of stored (B, G): one row of G
 * float sums per block of ROWS_PER_SUM rows (it stays in cache while the block's rows add to
 * it), added up in float64 in block order at the end, so that the sums do not depend on the
 * number of threads. */
#define ROWS_PER_SUM 16

typedef struct {
    float *blocks; /* (n_blocks, G) */
    int64_t n_blocks;
} th_sums;

static __thread scratch sum_scratch;

static int th_sums_alloc(th_sums *t, int64_t B, int64_t G) {
    t->n_blocks = (B + ROWS_PER_SUM - 1) / ROWS_PER_SUM;
    size_t len = (size_t)t->n_blocks * G;
    if (scratch_grow(&sum_scratch, sizeof(float) * len)) return -1;
    t->blocks = sum_scratch.p;
    memset(t->blocks, 0, sizeof(float) * len);
    return 0;
}

/* The nonzeros' part of cv_nb_zinb: gather, evaluate, scatter into out and the gradients (or,
 * with sums, add the theta derivatives to the sums of their rows' block; gpi scaled by sc). */
static int nz_pass(int64_t B, int64_t G, const float *mu, const float *theta, int64_t th_ld,
                   const float *pi, int64_t n, const int64_t *row, const int64_t *col,
                   const float *val,
                   const double *lgth, const double *dgth, double eps, float *out, float *gmu,
                   float *gpi, float *gth, float sc, const th_sums *sums, int n_threads) {
    int zinb = pi != NULL, with_grad = gmu != NULL;
    nz_buf b;
    if (nz_alloc(&b, n)) return -1;
    int bad = 0;
    const int64_t chunk = 4096; /* entries per task: a few tasks per thread, none too small */
#pragma omp parallel for num_threads(n_threads) schedule(static) reduction(| : bad)
    for (int64_t k0 = 0; k0 < n; k0 += chunk) {
        int64_t k1 = k0 + chunk < n ? k0 + chunk : n;
        bad |= nz_range(k0, k1, B, G, mu, theta, th_ld, pi, row, col, val, lgth, dgth, eps, &b);
    }
    if (bad) return -2;
    /* Scatter: each thread owns a range of rows (of whole blocks with sums) and takes their
     * entries in order, so every output is written by one thread in the serial order, whatever
     * the order of the entries. */
#pragma omp parallel num_threads(n_threads)
    {
        int64_t r0, r1;
        if (sums) {
            thread_range(sums->n_blocks, &r0, &r1);
            r0 *= ROWS_PER_SUM, r1 *= ROWS_PER_SUM;
        } else {
            thread_range(B, &r0, &r1);
        }
        for (int64_t k = 0; k < n; k++) {
            int64_t r = row[k], c = col[k], i = r * G + c;
            if (r < r0 || r >= r1) continue;
            if (zinb && !(b.x[k] > 0)) continue; /* stored zeros keep the zero branch */
            out[r] += (float)b.out[k];
            if (!with_grad) continue;
            float *th_sum = sums ? sums->blocks + r / ROWS_PER_SUM * G + c : NULL;
            if (zinb) {
                gmu[i] = (float)b.gmu[k];
                gpi[i] = (float)b.gpi[k] * sc;
                if (th_sum)
                    *th_sum += (float)(b.gth[k] - b.gz[k]);
                else
                    gth[i] = (float)b.gth[k] * sc;
            } else {
                gmu[i] += (float)b.gmu[k];
                if (th_sum)
                    *th_sum += (float)b.gth[k];
                else
                    gth[i] += (float)b.gth[k] * sc;
            }
        }
    }
    return 0;
}

/* Row sums of the log-likelihood of a (B, G) minibatch and, when gmu is not NULL, the
 * gradients of a unit row gradient. (row, col, val) are its n stored entries, in any order;
 * pi and gpi are NULL for the NB. theta is floored at eps by the caller: per gene (G values,
 * th_ld = 0), or per entry ((B, G) with row stride th_ld = G); lgth / dgth are lgamma /
 * digamma of a per-gene theta (G values, float64), NULL for a per-entry one, whose are
 * computed at the nonzeros. The dense pass (by rows) and
 * the nonzeros' terms (by ranges of entries) run on n_threads OpenMP threads: torch's own
 * runtime and thread pool, since torch loaded its libgomp.so.1 first. Each output is computed
 * by one thread in a fixed order, so the results do not depend on n_threads.
 * With logits (B, G) and lib (B) not NULL, mu is an output: lib * softmax(logits) by rows,
 * computed in the dense pass, and gmu comes back as the gradient by the logits, glib (B) as the
 * one by lib (the decoder's softmax and its backward fused with the likelihood: each row's
 * values stay in cache between the steps).
 * There, with gth_sum (G) not NULL instead of gth, the gradients are those of a row gradient
 * of sc (not 1) and the theta derivatives come back summed over the rows: the backward pass of
 * a loss that is sc times the sum of the row sums (a mean: sc = 1/B) then has nothing left to
 * compute, and no (B, G) array of theta derivatives is written. A per-entry theta with logits
 * takes sc too, its derivatives stored (B, G) in gth. Returns 0; -1 when out of
 * memory; -2 when an entry lies outside the (B, G) minibatch; -3 for gth_sum without logits
 * and gmu, with gth, or with a per-entry theta, and for a per-entry theta with lgth or dgth;
 * 1 when some ZINB p(0) underflowed and sc is not 1 (rare: the caller repeats the call for a
 * unit row gradient). */
int cv_nb_zinb(int64_t B, int64_t G, float *mu, const float *theta, const float *pi,
               int64_t n, const int64_t *row, const int64_t *col, const float *val,
               const double *lgth, const double *dgth, double eps, float *out, float *gmu,
               float *gpi, float *gth, const float *logits, const float *lib, float *glib,
               float sc, float *gth_sum, int n_threads, int64_t th_ld) {
    int zinb = pi != NULL, with_grad = gmu != NULL;
    th_sums sums_buf, *sums = NULL;
    if (th_ld && (lgth || dgth)) return -3;
    if (gth_sum) {
        if (!logits || !with_grad || gth || th_ld) return -3;
        if (th_sums_alloc(&sums_buf, B, G)) return -1;
        sums = &sums_buf;
    } else if (!(th_ld && logits && with_grad)) {
        sc = 1.0f; /* unit gradients; a per-entry theta's are scaled by sc in place (gth) */
    }
    /* with sums, the rows go by blocks, and each block's derivatives into its own sums */
    const int64_t per = sums ? ROWS_PER_SUM : 1, n_tasks = (B + per - 1) / per;
    int64_t n_small = 0;
#pragma omp parallel for num_threads(n_threads) schedule(static) reduction(+ : n_small)
    for (int64_t task = 0; task < n_tasks; task++) {
        int64_t r1 = (task + 1) * per < B ? (task + 1) * per : B;
        for (int64_t r = task * per; r < r1; r++) {
            int64_t o = r * G;
            float *gt = !with_grad ? NULL : sums ? sums->blocks + task * G : gth + o;
            if (logits) softmax_row(G, logits + o, lib[r], mu + o);
            const float *th = theta + r * th_ld;
            if (zinb)
                n_small += zinb_dense_row(G, mu + o, th, pi + o, out + r,
                                          with_grad ? gmu + o : NULL, with_grad ? gpi + o : NULL,
                                          gt, sums != NULL, sc);
            else
                nb_dense_row(G, mu + o, th, out + r, with_grad ? gmu + o : NULL, gt,
                             sums != NULL, sc);
        }
    }
    if (n_small && (sums || sc != 1.0f)) return 1;
    if (n_small) { /* rare: both ZINB probabilities underflow somewhere; fix those entries */
        const float lim = cv_exp_arg_max;
        for (int64_t r = 0; r < B; r++) {
            double acc = 0.0;
            int fixed = 0;
            for (int64_t g = 0; g < G; g++) {
                int64_t i = r * G + g;
                float m = mu[i], th = theta[r * th_ld + g], t, rr, w;
                float p0 = zinb_p0(m, th, pi[i], lim, &t, &rr, &w), lp0 = logf(p0);
                if (p0 < TINY) {
                    zinb_zero_stable(m, th, pi[i], &lp0, with_grad ? gmu + i : NULL,
                                     with_grad ? gpi + i : NULL, with_grad ? gth + i : NULL);
                    fixed = 1;
                }
                acc += lp0;
            }
            if (fixed) out[r] = (float)acc;
        }
    }
    if (n > 0) {
        int status = nz_pass(B, G, mu, theta, th_ld, pi, n, row, col, val, lgth, dgth, eps,
                             out, gmu, gpi, gth, sc, sums, n_threads);
        if (status) return status;
    }
    if (logits && with_grad) {
#pragma omp parallel for num_threads(n_threads) schedule(static)
        for (int64_t r = 0; r < B; r++)
            glib[r] = softmax_grad_row(G, lib[r], logits + r * G, mu + r * G, gmu + r * G, sc);
    }
    if (sums) {
        for (int64_t g = 0; g < G; g++) {
            double total = 0.0;
            for (int64_t k = 0; k < sums->n_blocks; k++) total += sums->blocks[k * G + g];
            gth_sum[g] = (float)total * sc;
        }
    }
    return 0;
}

#define MIXTURE_CHUNK 256

/* One NB component of the protein mixture, float64: returns
 * a = -theta log(1 + mu/theta) - x log(1 + theta/max(mu, eps)) and its derivatives by mu
 * (none through the floor) and theta. */
static inline double mixture_part(double x, double m, double th, double eps, double *d_mu,
                                  double *d_th) {
    double mc = m >= eps ? m : eps, t = log1p(m / th);
    *d_mu = -th / (th + m) + (m >= eps ? x * th / (mc * (mc + th)) : 0.0);
    *d_th = -t + m / (th + m) - x / (mc + th);
    return -th * t - x * log1p(th / mc);
}

/* The totalVI protein likelihood, a two-component NB mixture with a shared theta per protein,
 * for each of the B x P entries (float64 inside, float32 out):
 *   log p(x) = lgamma(x + theta) - lgamma(theta) - lgamma(x + 1)
 *              + logaddexp(a1, a2 - pi) - softplus(-pi)
 * with a_k the component terms of mixture_part (mu1 background, mu2 foreground, pi the logit
 * of the background). With g1 not NULL, also the derivatives of each entry by mu1, mu2, pi and
 * theta. lgth / dgth: lgamma / digamma of theta (one value per entry of the row; theta floored
 * at eps by the caller).
 * Rows are split among n_threads OpenMP threads; each entry is computed alone, so the results
 * do not depend on n_threads. */
CLONES static void mixture_terms(int64_t P, const float *restrict mu1, const float *restrict mu2,
                                 const float *restrict theta, const float *restrict pi,
                                 const float *restrict x, const double *restrict lgx,
                                 const double *restrict lgth, const double *restrict dgth,
                                 double eps, float *restrict out, float *restrict g1,
                                 float *restrict g2, float *restrict gpi, float *restrict gth) {
    for (int64_t p = 0; p < P; p++) {
        double xv = x[p], th = theta[p], lg, dg, d1, d2, t1, t2;
        lgamma_digamma_pos(xv + th, &lg, &dg);
        double a1 = mixture_part(xv, mu1[p], th, eps, &d1, &t1);
        double b = mixture_part(xv, mu2[p], th, eps, &d2, &t2) - pi[p];
        double hi = a1 > b ? a1 : b, lo = a1 > b ? b : a1;
        double e = exp(lo - hi), lse = hi + log1p(e);
        double w_hi = 1.0 / (1.0 + e), w_lo = e / (1.0 + e);
        double w1 = a1 > b ? w_hi : w_lo, w2 = a1 > b ? w_lo : w_hi;
        double q = pi[p], ea = exp(-fabs(q));
        double sp = (q < 0 ? -q : 0.0) + log1p(ea); /* softplus(-pi) */
        double sig = (q <= 0 ? 1.0 : ea) / (1.0 + ea); /* sigmoid(-pi) */
        out[p] = (float)(lg - lgth[p] - lgx[p] + lse - sp);
        if (g1) {
            g1[p] = (float)(w1 * d1);
            g2[p] = (float)(w2 * d2);
            gpi[p] = (float)(sig - w2);
            gth[p] = (float)(dg - dgth[p] + w1 * t1 + w2 * t2);
        }
    }
}

/* One row of P proteins. lgth / dgth: lgamma / digamma of a per-protein theta (P values), or
 * NULL for a per-entry one (theta is then this row's P values), evaluated here. */
static void mixture_row(int64_t P, const float *restrict mu1, const float *restrict mu2,
                               const float *restrict theta, const float *restrict pi,
                               const float *restrict x, const double *restrict lgth,
                               const double *restrict dgth, double eps, float *restrict out,
                               float *restrict g1, float *restrict g2, float *restrict gpi,
                               float *restrict gth) {
    double lgx[MIXTURE_CHUNK]; /* lgamma(x + 1), looked up first: the loop below vectorises */
    double lgt[MIXTURE_CHUNK], dgt[MIXTURE_CHUNK]; /* a per-entry theta's */
    for (int64_t p0 = 0; p0 < P; p0 += MIXTURE_CHUNK) {
        int64_t n = P - p0 < MIXTURE_CHUNK ? P - p0 : MIXTURE_CHUNK;
        for (int64_t k = 0; k < n; k++) lgx[k] = lgamma_x_plus_1(x[p0 + k]);
        if (!lgth) lgamma_digamma_n(n, theta + p0, lgt, dgt);
        mixture_terms(n, mu1 + p0, mu2 + p0, theta + p0, pi + p0, x + p0, lgx,
                      lgth ? lgth + p0 : lgt, lgth ? dgth + p0 : dgt, eps, out + p0,
                      g1 ? g1 + p0 : NULL, g1 ? g2 + p0 : NULL, g1 ? gpi + p0 : NULL,
                      g1 ? gth + p0 : NULL);
    }
}

/* theta per protein (th_ld = 0; lgth / dgth its lgamma / digamma) or per entry ((B, P) with
 * th_ld = P; lgth and dgth NULL). */
void cv_nb_mixture(int64_t B, int64_t P, const float *mu1, const float *mu2, const float *theta,
                   const float *pi, const float *x, const double *lgth, const double *dgth,
                   double eps, float *out, float *g1, float *g2, float *gpi, float *gth,
                   int n_threads, int64_t th_ld) {
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t r = 0; r < B; r++) {
        int64_t o = r * P;
        mixture_row(P, mu1 + o, mu2 + o, theta + r * th_ld, pi + o, x + o, lgth, dgth, eps,
                    out + o, g1 ? g1 + o : NULL, g1 ? g2 + o : NULL, g1 ? gpi + o : NULL,
                    g1 ? gth + o : NULL);
    }
}

/* totalVI's protein terms per cell: the reconstruction rec = -sum_t m log p(x_t) (the mixture
 * above) and the KL of the background kl = sum_t m KL(N(alpha, beta^2) || N(pm, exp(2 pls))),
 *   KL = pls - log beta + (beta^2 + (alpha - pm)^2) / (2 exp(2 pls)) - 1/2,
 * over the proteins t that the cell's batch measured: m = mask[c, t] for its code c = codes[r];
 * the prior's mean pm = prior_m[t, c] and log scale pls = prior_ls[t, c] ((P, n_codes) arrays).
 * lp: (B, P) scratch for log p. With g1 not NULL, stores the derivatives of rec by mu1, mu2,
 * pi and the per-entry theta (g1, g2, gpi, gth) and of kl by alpha, beta and pls (ga, gb, gls),
 * all (B, P), zero where m = 0 (the derivative of kl by pm is -ga). theta per protein or per
 * entry as in cv_nb_mixture (th_ld). Returns -2 for a code outside [0, n_codes), else 0. Rows
 * are split among n_threads threads, each computed alone. */
int cv_protein_terms(int64_t B, int64_t P, const float *mu1, const float *mu2,
                     const float *theta, const float *pi, const float *x, const float *alpha,
                     const float *beta, const int64_t *codes, int64_t n_codes,
                     const uint8_t *mask, const float *prior_m, const float *prior_ls,
                     const double *lgth, const double *dgth, double eps, float *lp, float *rec,
                     float *kl, float *g1, float *g2, float *gpi, float *gth, float *ga,
                     float *gb, float *gls, int n_threads, int64_t th_ld) {
    for (int64_t r = 0; r < B; r++)
        if (codes[r] < 0 || codes[r] >= n_codes) return -2;
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t r = 0; r < B; r++) {
        int64_t o = r * P, c = codes[r];
        mixture_row(P, mu1 + o, mu2 + o, theta + r * th_ld, pi + o, x + o, lgth, dgth, eps,
                    lp + o, g1 ? g1 + o : NULL, g1 ? g2 + o : NULL, g1 ? gpi + o : NULL,
                    g1 ? gth + o : NULL);
        double rec_r = 0.0, kl_r = 0.0;
        for (int64_t t = 0; t < P; t++) {
            int64_t i = o + t;
            if (!mask[c * P + t]) {
                if (g1) g1[i] = g2[i] = gpi[i] = gth[i] = ga[i] = gb[i] = gls[i] = 0.0f;
                continue;
            }
            double a = alpha[i], b = beta[i], ls = prior_ls[t * n_codes + c];
            double d = a - prior_m[t * n_codes + c], iv = exp(-2.0 * ls), s = b * b + d * d;
            rec_r -= lp[i];
            kl_r += ls - log(b) + 0.5 * s * iv - 0.5;
            if (g1) {
                g1[i] = -g1[i];
                g2[i] = -g2[i];
                gpi[i] = -gpi[i];
                gth[i] = -gth[i];
                ga[i] = (float)(d * iv);
                gb[i] = (float)(b * iv - 1.0 / b);
                gls[i] = (float)(1.0 - s * iv);
            }
        }
        rec[r] = (float)rec_r;
        kl[r] = (float)kl_r;
    }
    return 0;
}

/* The gradients of cv_protein_terms for the upstream gradients grad_rec and grad_kl (B each):
 * d_mu1, d_mu2, d_pi = g1, g2, gpi times grad_rec and d_a, d_b = ga, gb times grad_kl per row
 * ((B, P) each); d_theta (P) = sum_r grad_rec[r] gth[r], or for a per-entry theta (th_ld not
 * 0) d_theta (B, P) = gth times grad_rec per row; d_pm and d_pls (P, n_codes) sum -ga grad_kl
 * and gls grad_kl over the rows of each code. Each output is summed by one thread in row
 * order. */
void cv_protein_terms_backward(int64_t B, int64_t P, const float *grad_rec, const float *grad_kl,
                               const int64_t *codes, int64_t n_codes, const float *g1,
                               const float *g2, const float *gpi, const float *gth,
                               const float *ga, const float *gb, const float *gls, float *d_mu1,
                               float *d_mu2, float *d_pi, float *d_a, float *d_b, float *d_theta,
                               float *d_pm, float *d_pls, int n_threads, int64_t th_ld) {
#pragma omp parallel num_threads(n_threads)
    {
        int64_t t0, t1, r0, r1;
        thread_range(P, &t0, &t1);
        for (int64_t t = t0; t < t1; t++) {
            if (!th_ld) {
                double dth = 0.0;
                for (int64_t r = 0; r < B; r++) dth += (double)grad_rec[r] * gth[r * P + t];
                d_theta[t] = (float)dth;
            }
            for (int64_t c = 0; c < n_codes; c++) d_pm[t * n_codes + c] = d_pls[t * n_codes + c] = 0;
            for (int64_t r = 0; r < B; r++) {
                int64_t i = r * P + t, j = t * n_codes + codes[r];
                d_pm[j] -= ga[i] * grad_kl[r];
                d_pls[j] += gls[i] * grad_kl[r];
            }
        }
        thread_range(B, &r0, &r1);
        for (int64_t r = r0; r < r1; r++) {
            float gr = grad_rec[r], gk = grad_kl[r];
            for (int64_t t = 0; t < P; t++) {
                int64_t i = r * P + t;
                d_mu1[i] = g1[i] * gr;
                d_mu2[i] = g2[i] * gr;
                d_pi[i] = gpi[i] * gr;
                d_a[i] = ga[i] * gk;
                d_b[i] = gb[i] * gk;
                if (th_ld) d_theta[i] = gth[i] * gr;
            }
        }
    }
}

/* lgamma and digamma of n positive float32 values, in float64 (theta's G values). */
void cv_lgamma_digamma(int64_t n, const float *z, double *lg, double *dg) {
    lgamma_digamma_n(n, z, lg, dg);
}

/* 16 floats in one vector (a zmm register in the avx512f clone, four xmm ones in the default
 * clone); loaded and stored with memcpy, which allows any alignment. */
typedef float v16f __attribute__((vector_size(64)));

static inline v16f load16(const float *p) {
    v16f v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Whether 16 vectors of sums fit in registers: 32 zmm registers with AVX-512, against 16 ymm
 * (AVX2) or xmm ones, where sixteen 16-float vectors spill. */
static int wide_blocks(void) {
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
    __builtin_cpu_init(); /* idempotent; needed before the first query in some load orders */
    return __builtin_cpu_supports("avx512f");
#else
    return 0;
#endif
}

/* Outputs [j0, j0 + 16 nv) of a row of cv_csr_dense (nv <= 16 vectors, a constant once
 * inlined): starting from the bias, or 0, they add val * (each entry's row of w) in local
 * vectors. Summed in the output row itself, each entry waited on the stores of the one before
 * (twice the time of torch's embedding_bag). */
static inline __attribute__((always_inline, optimize("fp-contract=fast"))) void
csr_block(int nv, int64_t j0, int64_t lo, int64_t hi, int64_t n_out, const int64_t *col,
          const float *val, const float *restrict w, const float *bias, float *restrict o) {
    v16f acc[16];
    for (int v = 0; v < nv; v++) acc[v] = bias ? load16(bias + j0 + 16 * v) : (v16f){0};
    for (int64_t k = lo; k < hi; k++) {
        const float *wc = w + col[k] * n_out + j0;
        v16f a = (v16f){0} + val[k];
        for (int v = 0; v < nv; v++) acc[v] += a * load16(wc + 16 * v);
    }
    memcpy(o + j0, acc, sizeof(v16f) * nv);
}

/* csr_block in 8-float vectors (nv <= 8), for the clones without AVX-512: there, 16-float
 * vectors are split through the stack (1,100 of csr_dense_rows' 1,660 AVX2 instructions
 * loaded or stored on the stack; 5.4 ms for a 256 x 2,000 minibatch at 9% into 256 outputs,
 * against 3.1 ms for the dense product; 1.0 ms with these, AMD EPYC, 2 threads), and eight
 * ymm sums leave registers for the loads. */
typedef float v8f __attribute__((vector_size(32)));

static inline __attribute__((always_inline, optimize("fp-contract=fast"))) void
csr_block8(int nv, int64_t j0, int64_t lo, int64_t hi, int64_t n_out, const int64_t *col,
           const float *val, const float *restrict w, const float *bias, float *restrict o) {
    v8f acc[8];
    for (int v = 0; v < nv; v++) {
        if (bias)
            memcpy(&acc[v], bias + j0 + 8 * v, sizeof(v8f));
        else
            acc[v] = (v8f){0};
    }
    for (int64_t k = lo; k < hi; k++) {
        const float *wc = w + col[k] * n_out + j0;
        v8f a = (v8f){0} + val[k], x;
        for (int v = 0; v < nv; v++) {
            memcpy(&x, wc + 8 * v, sizeof x);
            acc[v] += a * x;
        }
    }
    memcpy(o + j0, acc, sizeof(v8f) * nv);
}

/* Rows [r0, r1) of cv_csr_dense; returns 1 on a bad offset or column. The outputs are summed
 * 256, 128 and then 16 at a time with AVX-512 (else 64 and then 8 at a time, csr_block8), then
 * one by one. Every output's sum takes the same steps (fused multiply-adds in the entries'
 * order) in any of these, so the blocks do not change the result. 256 at a time, TOTALVI's 256
 * outputs read each entry once: its weight gradient (below) 180 -> 145 µs hot. */
CLONES __attribute__((optimize("fp-contract=fast"))) static int
csr_dense_rows(int64_t r0, int64_t r1, int64_t n_rows, int64_t n_cols, int64_t n_out, int64_t n,
               const int64_t *offsets, const int64_t *col, const float *val,
               const float *restrict w, const float *bias, float *restrict out) {
    const int wide = wide_blocks();
    for (int64_t r = r0; r < r1; r++) {
        int64_t lo = offsets[r], hi = r + 1 < n_rows ? offsets[r + 1] : n;
        if (lo < 0 || hi < lo || hi > n || (r == 0 && lo != 0)) return 1;
        for (int64_t k = lo; k < hi; k++)
            if (col[k] < 0 || col[k] >= n_cols) return 1;
        float *restrict o = out + r * n_out;
        int64_t j0 = 0;
        if (wide) {
            for (; j0 + 256 <= n_out; j0 += 256)
                csr_block(16, j0, lo, hi, n_out, col, val, w, bias, o);
            for (; j0 + 128 <= n_out; j0 += 128)
                csr_block(8, j0, lo, hi, n_out, col, val, w, bias, o);
            for (; j0 + 16 <= n_out; j0 += 16)
                csr_block(1, j0, lo, hi, n_out, col, val, w, bias, o);
        } else {
            for (; j0 + 64 <= n_out; j0 += 64)
                csr_block8(8, j0, lo, hi, n_out, col, val, w, bias, o);
            for (; j0 + 8 <= n_out; j0 += 8)
                csr_block8(1, j0, lo, hi, n_out, col, val, w, bias, o);
        }
        for (int64_t j = j0; j < n_out; j++) o[j] = bias ? bias[j] : 0.0f;
        if (j0 == n_out) continue;
        for (int64_t k = lo; k < hi; k++) {
            const float a = val[k], *restrict wc = w + col[k] * n_out;
            for (int64_t j = j0; j < n_out; j++) o[j] += a * wc[j];
        }
    }
    return 0;
}

/* out (n_rows, n_out) = bias + X W for a CSR minibatch X (n_rows, n_cols) with n stored entries:
 * row r's entries are [offsets[r], offsets[r + 1]) (offsets[0] = 0, the last row's end at n),
 * with columns col and values val; W is (n_cols, n_out), all float32 and contiguous, bias
 * (n_out) or NULL. The sparse first layer's forward product: each output row starts from the
 * bias and adds val * (that entry's row of W) in the entries' order, on the thread that owns the
 * row, so the result does not depend on n_threads. Returns 0; -2 when the first offset is not 0,
 * an offset decreases or leaves [0, n], or a column leaves [0, n_cols) (out is then undefined). */
int cv_csr_dense(int64_t n_rows, int64_t n_cols, int64_t n_out, int64_t n,
                 const int64_t *offsets, const int64_t *col, const float *val, const float *w,
                 const float *bias, float *out, int n_threads) {
    int bad = 0;
#pragma omp parallel num_threads(n_threads) reduction(| : bad)
    {
        int64_t r0, r1;
        thread_range(n_rows, &r0, &r1);
        bad |= csr_dense_rows(r0, r1, n_rows, n_cols, n_out, n, offsets, col, val, w, bias, out);
    }
    return bad ? -2 : 0;
}

static __thread scratch t_scratch; /* cv_csr_t_dense's counts, places and sorted entries */

/* out (n_cols, n_out) = X^T dy for a CSR minibatch X with n stored entries (row, col, val) and
 * dy (n_rows, n_out), both float32 and contiguous: the weight gradient of the sparse first
 * layer. A stable counting sort puts the entries in column order (each thread counts and places
 * a share of them); then each thread sums, for its range of columns, the rows of dy of each
 * column's entries in registers with csr_dense_rows: X^T in CSR form is the forward product's
 * problem. (Added into the output row itself, every entry loaded and stored that row again:
 * 543 µs of a TOTALVI step at 2,000 x 256.) Each output is summed by one thread in the entries'
 * order, so the result does not depend on n_threads. Returns 0; -1 when out of memory; -2 when
 * an entry lies outside the (n_rows, n_cols) minibatch (out is then undefined). */
int cv_csr_t_dense(int64_t n_rows, int64_t n_cols, int64_t n_out, int64_t n,
                   const int64_t *row, const int64_t *col, const float *val, const float *dy,
                   float *out, int n_threads) {
    if (n_threads < 1) n_threads = 1;
    /* per thread, n_cols counts (then next places) and a flag; column starts; sorted entries */
    size_t stride = (size_t)n_cols + 1, n_pos = (size_t)n_threads * stride + (size_t)n_cols;
    size_t bytes = sizeof(int64_t) * (n_pos + (size_t)n) + sizeof(float) * (size_t)n;
    if (scratch_grow(&t_scratch, bytes)) return -1;
    int64_t *starts = t_scratch.p, *counts = starts + n_cols, *rows = counts + n_threads * stride;
    float *vals = (float *)(rows + n);
    int bad = 0, bad_col = 0;
#pragma omp parallel num_threads(n_threads) reduction(| : bad)
    {
        int nt = 1, t = 0;
#ifdef _OPENMP
        nt = omp_get_num_threads(), t = omp_get_thread_num();
#endif
        int64_t k0, k1, c0, c1, *mine = counts + t * stride;
        thread_range(n, &k0, &k1);
        memset(mine, 0, sizeof(int64_t) * stride);
        for (int64_t k = k0; k < k1; k++) {
            int64_t c = col[k];
            if (c >= 0 && c < n_cols) mine[c]++;
            else mine[n_cols] = 1;
        }
#pragma omp barrier
#pragma omp single
        { /* counts -> places: column by column, thread by thread, so each column keeps the
           * entries' order */
            int64_t at = 0;
            for (int u = 0; u < nt; u++) bad_col |= (int)counts[u * stride + n_cols];
            for (int64_t c = 0; c < n_cols; c++) {
                starts[c] = at;
                for (int u = 0; u < nt; u++) {
                    int64_t count = counts[u * stride + c];
                    counts[u * stride + c] = at;
                    at += count;
                }
            }
        } /* (a barrier) */
        if (!bad_col) {
            for (int64_t k = k0; k < k1; k++) {
                int64_t at = mine[col[k]]++;
                rows[at] = row[k];
                vals[at] = val[k];
            }
        }
#pragma omp barrier
        thread_range(n_cols, &c0, &c1);
        if (!bad_col)
            bad |= csr_dense_rows(c0, c1, n_cols, n_rows, n_out, n, starts, rows, vals, dy, NULL,
                                  out);
    }
    return bad || bad_col ? -2 : 0;
}

/* The sums of the n_rows rows of a CSR minibatch (offsets and n as in cv_csr_dense), float32
 * (exact for counts below 2^24). Returns 0; -2 for offsets as cv_csr_dense refuses them. */
int cv_csr_row_sums(int64_t n_rows, int64_t n, const int64_t *offsets, const float *val,
                    float *out) {
    for (int64_t r = 0; r < n_rows; r++) {
        int64_t lo = offsets[r], hi = r + 1 < n_rows ? offsets[r + 1] : n;
        if (lo < 0 || hi < lo || hi > n || (r == 0 && lo != 0)) return -2;
        float s = 0.0f;
        for (int64_t k = lo; k < hi; k++) s += val[k];
        out[r] = s;
    }
    return 0;
}

/* Where each of the n_sel rows idx of a CSR matrix with n_rows rows begins in their gathered
 * batch (offsets), and the batch's number of entries, returned; -1 when an index lies outside
 * [0, n_rows). The rows' pointers are independent loads, so their cache misses overlap. */
int64_t cv_csr_offsets(int64_t n_sel, const int64_t *idx, const void *indptr, int ptr64,
                       int64_t n_rows, int64_t *offsets) {
    const int32_t *p32 = indptr;
    const int64_t *p64 = indptr;
    int64_t total = 0;
    for (int64_t r = 0; r < n_sel; r++) {
        int64_t i = idx[r];
        if (i < 0 || i >= n_rows) return -1;
        offsets[r] = total;
        total += ptr64 ? p64[i + 1] - p64[i] : (int64_t)p32[i + 1] - p32[i];
    }
    return total;
}

/* The stored entries of CSR rows idx[0 .. n_sel): for the r-th selected row, its entries go to
 * out_row (= r), out_col (int64) and out_val from position offsets[r] on, in their stored order.
 * indptr and indices are int32 or int64 (ptr64, ind64); offsets (int64) come from
 * cv_csr_offsets. One contiguous copy per row, rows split between n_threads
 * threads: the reads of 128 random rows of a large matrix wait on memory, so each row's first
 * lines are prefetched a few rows ahead. */
void cv_gather_csr(int64_t n_sel, const int64_t *idx, const void *indptr, int ptr64,
                   const void *indices, int ind64, const float *values, const int64_t *offsets,
                   int64_t *out_row, int64_t *out_col, float *out_val, int n_threads) {
    const int32_t *p32 = indptr, *i32 = indices;
    const int64_t *p64 = indptr, *i64 = indices;
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t r = 0; r < n_sel; r++) {
        if (r + 4 < n_sel) {
            int64_t ahead = ptr64 ? p64[idx[r + 4]] : p32[idx[r + 4]];
            __builtin_prefetch(values + ahead);
            __builtin_prefetch(ind64 ? (const void *)(i64 + ahead) : (const void *)(i32 + ahead));
        }
        int64_t i = idx[r], s = ptr64 ? p64[i] : p32[i], e = ptr64 ? p64[i + 1] : p32[i + 1];
        int64_t o = offsets[r] - s;
        for (int64_t k = s; k < e; k++) {
            out_row[o + k] = r;
            out_col[o + k] = ind64 ? i64[k] : i32[k];
            out_val[o + k] = values[k];
        }
    }
}

/* Batch norm (training: the minibatch's statistics), ReLU and dropout of a hidden layer, forward
 * and backward, for y (B, H) float32 contiguous: the block after every Linear of the networks,
 * which in torch is ~12 operators and four autograd nodes for a 128 x 128 tensor.
 *
 *   xhat = (y - mean) invstd, invstd = 1 / sqrt(var + eps)   (mean, biased var over the B rows)
 *   out = relu(gamma xhat + beta) * drop,   drop = scale where lane >= threshold, else 0
 *
 * lanes are the dropout's random int16 values; with lanes NULL and use_seed set, the kernel makes
 * them as it goes, the values cv_random_lanes(B * H, seed) would write (no (B, H) array to fill
 * and read back: 28 -> ~5 us a 256 x 256 layer in a totalVI step); with neither, no dropout
 * (drop = 1). Each thread owns a range of columns and takes them in chunks of BN_CHUNK, rows in
 * order, so the results do not depend on the number of threads. Sums are kept in float64. The
 * loops have no branches (the ReLU and dropout are selects): with random masks, branches were
 * mispredicted at every other entry, 4x slower.
 *
 * The batch norm's input is y plus, for each of n_cov covariates, its learned vector of the
 * row's category: cov[k] is a (n_cats[k], H) table and codes[k] (B) the rows' categories (the
 * covariates injected into every layer, which torch adds with an embedding and an add, and
 * sums back with an embedding backward: ~50 us a layer at 256 x 256). The sum is formed in
 * the order of torch's y + e_1 + e_2 ...: by the forward pass's first pass into out, where its
 * other passes read it, and again row by row where the backward pass reads it. y itself is
 * never written. */
#define BN_CHUNK 64

/* Output k (from 0) of SplitMix64 (Steele, Lea and Flood, OOPSLA 2014) started at seed. */
static inline uint64_t splitmix64(uint64_t seed, int64_t k) {
    uint64_t z = seed + (uint64_t)(k + 1) * 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* Row b, columns [j0, j0 + w) of the batch norm's input: y's row itself without covariates,
 * else y plus the covariates' vectors, formed in t. */
static inline __attribute__((always_inline)) const float *
bn_input(int64_t b, int64_t H, int64_t j0, int64_t w, const float *restrict y, int n_cov,
         const float *const *cov, const int64_t *const *codes, float *restrict t) {
    const float *yr = y + b * H + j0;
    if (n_cov == 0) return yr;
    const float *e = cov[0] + codes[0][b] * H + j0;
    for (int64_t j = 0; j < w; j++) t[j] = yr[j] + e[j];
    for (int k = 1; k < n_cov; k++) {
        e = cov[k] + codes[k][b] * H + j0;
        for (int64_t j = 0; j < w; j++) t[j] += e[j];
    }
    return t;
}

/* Columns [j0, j0 + w) of the forward pass. */
CLONES static void bn_fwd_chunk(int64_t B, int64_t H, int64_t j0, int64_t w,
                                const float *restrict y, int n_cov, const float *const *cov,
                                const int64_t *const *codes, const float *restrict gamma,
                                const float *restrict beta, float *restrict running_mean,
                                float *restrict running_var, double m, double eps,
                                const int16_t *restrict lanes, int use_seed, uint64_t seed,
                                int threshold, float scale, float *restrict out,
                                float *restrict mean_out, float *restrict invstd_out) {
    double sum[BN_CHUNK] = {0}, ss[BN_CHUNK] = {0};
    float mean[BN_CHUNK], invstd[BN_CHUNK], g[BN_CHUNK], bt[BN_CHUNK], t[BN_CHUNK];
    /* with covariates, the first pass leaves the input in out, where the others read it */
    const float *in = n_cov ? out : y;
    for (int64_t b = 0; b < B; b++) {
        const float *v = bn_input(b, H, j0, w, y, n_cov, cov, codes, t);
        if (n_cov)
            for (int64_t j = 0; j < w; j++) out[b * H + j0 + j] = v[j];
        for (int64_t j = 0; j < w; j++) sum[j] += v[j];
    }
    for (int64_t j = 0; j < w; j++) sum[j] /= (double)B;
    for (int64_t b = 0; b < B; b++)
        for (int64_t j = 0; j < w; j++) {
            double d = in[b * H + j0 + j] - sum[j];
            ss[j] += d * d;
        }
    for (int64_t j = 0; j < w; j++) {
        double var = ss[j] / (double)B, unbiased = B > 1 ? ss[j] / (double)(B - 1) : var;
        mean[j] = mean_out[j0 + j] = (float)sum[j];
        invstd[j] = invstd_out[j0 + j] = (float)(1.0 / sqrt(var + eps));
        g[j] = gamma[j0 + j], bt[j] = beta[j0 + j];
        running_mean[j0 + j] = (float)((1.0 - m) * running_mean[j0 + j] + m * sum[j]);
        running_var[j0 + j] = (float)((1.0 - m) * running_var[j0 + j] + m * unbiased);
    }
    for (int64_t b = 0; b < B; b++) {
        const float *yr = in + b * H + j0;
        float *o = out + b * H + j0;
        for (int64_t j = 0; j < w; j++) {
            float v = (yr[j] - mean[j]) * invstd[j] * g[j] + bt[j];
            o[j] = v > 0.0f ? v : 0.0f;
        }
        if (lanes != NULL || use_seed) {
            int16_t made[BN_CHUNK + 8]; /* the words covering [s, s + w): at most 17 */
            const int16_t *l;
            if (lanes != NULL) {
                l = lanes + b * H + j0;
            } else {
                int64_t s = b * H + j0, k0 = s / 4, k1 = (s + w + 3) / 4;
                for (int64_t k = k0; k < k1; k++) {
                    uint64_t z = splitmix64(seed, k);
                    memcpy(made + 4 * (k - k0), &z, sizeof z);
                }
                l = made + (s - 4 * k0);
            }
            for (int64_t j = 0; j < w; j++) o[j] *= l[j] >= threshold ? scale : 0.0f;
        }
    }
}

/* The forward pass: out, and the mean and invstd (H each) that the backward pass needs; the
 * running statistics are updated in place (momentum m; the variance unbiased, as in torch).
 * Returns 0, or 1 (and computes nothing) when a code lies outside its table's n_cats[k] rows. */
int cv_bn_relu_drop_fwd(int64_t B, int64_t H, const float *y, int n_cov, const float *const *cov,
                        const int64_t *const *codes, const int64_t *n_cats, const float *gamma,
                        const float *beta, float *running_mean, float *running_var, double m,
                        double eps, const int16_t *lanes, int use_seed, uint64_t seed,
                        int threshold, float scale, float *out, float *mean_out,
                        float *invstd_out, int n_threads) {
    for (int k = 0; k < n_cov; k++)
        for (int64_t b = 0; b < B; b++)
            if (codes[k][b] < 0 || codes[k][b] >= n_cats[k]) return 1;
#pragma omp parallel num_threads(n_threads)
    {
        int64_t c0, c1;
        thread_range(H, &c0, &c1);
        for (int64_t j0 = c0; j0 < c1; j0 += BN_CHUNK)
            bn_fwd_chunk(B, H, j0, c1 - j0 < BN_CHUNK ? c1 - j0 : BN_CHUNK, y, n_cov, cov,
                         codes, gamma, beta, running_mean, running_var, m, eps, lanes, use_seed,
                         seed, threshold, scale, out, mean_out, invstd_out);
    }
    return 0;
}

/* Columns [j0, j0 + w) of the backward pass (see cv_bn_relu_drop_bwd). */
CLONES static void bn_bwd_chunk(int64_t B, int64_t H, int64_t j0, int64_t w,
                                const float *restrict y, int n_cov, const float *const *cov,
                                const int64_t *const *codes, float *const *gcov,
                                const float *restrict out,
                                const float *restrict gamma, const float *restrict mean,
                                const float *restrict invstd, float scale,
                                const float *restrict dout, float *restrict dy,
                                float *restrict dgamma, float *restrict dbeta) {
    double sd[BN_CHUNK] = {0}, sdx[BN_CHUNK] = {0};
    float mu[BN_CHUNK], is[BN_CHUNK], k[BN_CHUNK], t[BN_CHUNK];
    for (int64_t j = 0; j < w; j++)
        mu[j] = mean[j0 + j], is[j] = invstd[j0 + j], k[j] = gamma[j0 + j] * invstd[j0 + j];
    for (int64_t b = 0; b < B; b++) {
        const float *o = out + b * H + j0, *dr = dout + b * H + j0;
        float *d = dy + b * H + j0;
        const float *v = bn_input(b, H, j0, w, y, n_cov, cov, codes, t);
        for (int64_t j = 0; j < w; j++) {
            d[j] = o[j] > 0.0f ? dr[j] * scale : 0.0f;
            sd[j] += d[j];
            sdx[j] += (double)d[j] * ((v[j] - mu[j]) * is[j]);
        }
    }
    for (int64_t j = 0; j < w; j++) {
        dbeta[j0 + j] = (float)sd[j];
        dgamma[j0 + j] = (float)sdx[j];
        sd[j] /= (double)B;
        sdx[j] /= (double)B;
    }
    for (int64_t b = 0; b < B; b++) {
        float *d = dy + b * H + j0;
        const float *v = bn_input(b, H, j0, w, y, n_cov, cov, codes, t);
        for (int64_t j = 0; j < w; j++)
            d[j] = k[j] * (float)(d[j] - sd[j] - ((v[j] - mu[j]) * is[j]) * sdx[j]);
        for (int c = 0; c < n_cov; c++) { /* each table's row of the category sums dy */
            float *g = gcov[c] + codes[c][b] * H + j0;
            for (int64_t j = 0; j < w; j++) g[j] += d[j];
        }
    }
}

/* The backward pass from the incoming gradient dout, given the forward pass's input y (and
 * covariates) and output out: dy (B, H), dgamma and dbeta (H each). An entry passed the ReLU and
 * the dropout where its output is positive (scale: the dropout's, 1 without), so with
 * d = dout * scale there, else 0:
 *   dbeta = sum_b d, dgamma = sum_b d xhat, dy = gamma invstd (d - dbeta / B - xhat dgamma / B)
 * and each covariate's table gradient gcov[k] (zeroed by the caller) gets, in the row of a
 * category, the sum of dy over the rows of that category, rows in order. */
void cv_bn_relu_drop_bwd(int64_t B, int64_t H, const float *y, int n_cov, const float *const *cov,
                         const int64_t *const *codes, float *const *gcov, const float *out,
                         const float *gamma, const float *mean, const float *invstd, float scale,
                         const float *dout, float *dy, float *dgamma, float *dbeta,
                         int n_threads) {
#pragma omp parallel num_threads(n_threads)
    {
        int64_t c0, c1;
        thread_range(H, &c0, &c1);
        for (int64_t j0 = c0; j0 < c1; j0 += BN_CHUNK)
            bn_bwd_chunk(B, H, j0, c1 - j0 < BN_CHUNK ? c1 - j0 : BN_CHUNK, y, n_cov, cov, codes,
                         gcov, out, gamma, mean, invstd, scale, dout, dy, dgamma, dbeta);
    }
}

/* n random int16 values for the dropout masks: the four 16-bit lanes of each output of
 * SplitMix64, in the machine's byte order (lowest lane first on x86). Counter-based (output k
 * depends only on seed and k), so the loop vectorises. */
CLONES void cv_random_lanes(int64_t n, uint64_t seed, int16_t *out) {
    int64_t words = n / 4;
    for (int64_t k = 0; k < words; k++) {
        uint64_t z = splitmix64(seed, k);
        memcpy(out + 4 * k, &z, sizeof z);
    }
    uint64_t z = splitmix64(seed, words);
    memcpy(out + 4 * words, &z, sizeof(int16_t) * (size_t)(n % 4));
}

/* ---- bfloat16 products: the outputs and incoming gradients of cellvae.nn._BF16Linear ----
 * A bfloat16 value is the top half of a float32: widening is a shift; narrowing rounds to the
 * nearest even, NaN to 0x7FC0, the rounding of torch's Tensor.to(torch.bfloat16). */
static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    return (u & 0x7FFFFFFFu) > 0x7F800000u ? (uint16_t)0x7FC0u : (uint16_t)r;
}

typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));

/* One row of one part: dst[j] = src[j] + bias[j] (bias may be NULL). */
CLONES static void widen_row(int64_t n, const uint16_t *restrict src, const float *restrict bias,
                             float *restrict dst) {
    int64_t j = 0;
    for (; j + 16 <= n; j += 16) {
        v16h h;
        memcpy(&h, src + j, sizeof h);
        v16f f = (v16f)(__builtin_convertvector(h, v16u) << 16), b;
        if (bias) {
            memcpy(&b, bias + j, sizeof b);
            f += b;
        }
        memcpy(dst + j, &f, sizeof f);
    }
    for (; j < n; j++) dst[j] = bias ? bf16_to_f32(src[j]) + bias[j] : bf16_to_f32(src[j]);
}

/* The bfloat16 product out (B rows of N = sum of sizes values) split by columns into n_parts
 * float32 (B, sizes[i]) outputs dst[i], each plus its bias[i] (NULL: none). Rows are split
 * between the threads. */
void cv_bf16_split_widen(int64_t B, int64_t N, const uint16_t *out, int n_parts,
                         const int64_t *sizes, const float *const *bias, float *const *dst,
                         int n_threads) {
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t b = 0; b < B; b++) {
        int64_t o = 0;
        for (int i = 0; i < n_parts; i++) {
            widen_row(sizes[i], out + b * N + o, bias[i], dst[i] + b * sizes[i]);
            o += sizes[i];
        }
    }
}

#define NARROW_CHUNK 256 /* columns per block: their sums stay in registers / L1 */

/* f32_to_bf16 of 16 values (written with vectors: gcc did not vectorise the scalar form). */
static inline v16h narrow16(v16f f) {
    v16u u = (v16u)f;
    v16u r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    v16u nan = (v16u)((u & 0x7FFFFFFFu) > 0x7F800000u); /* all ones where NaN */
    return __builtin_convertvector((r & ~nan) | (0x7FC0u & nan), v16h);
}

/* Columns [j0, j0 + w) of part src (row length n) into dst (row length N, offset by o), and
 * their sums over the rows, in order, into sum (unless NULL). */
CLONES static void narrow_chunk(int64_t B, int64_t n, int64_t j0, int64_t w,
                                const float *restrict src, int64_t N, int64_t o,
                                uint16_t *restrict dst, float *restrict sum) {
    v16f acc[NARROW_CHUNK / 16];
    float tail[16] = {0};
    int64_t nv = w / 16;
    for (int64_t v = 0; v < nv; v++) acc[v] = (v16f){0};
    for (int64_t b = 0; b < B; b++) {
        const float *s = src + b * n + j0;
        uint16_t *d = dst + b * N + o + j0;
        for (int64_t v = 0; v < nv; v++) {
            v16f x = load16(s + 16 * v);
            v16h h = narrow16(x);
            memcpy(d + 16 * v, &h, sizeof h);
            acc[v] += x;
        }
        for (int64_t j = 16 * nv; j < w; j++) {
            d[j] = f32_to_bf16(s[j]);
            tail[j - 16 * nv] += s[j];
        }
    }
    if (!sum) return;
    memcpy(sum + j0, acc, sizeof(v16f) * (size_t)nv);
    for (int64_t j = 16 * nv; j < w; j++) sum[j0 + j] = tail[j - 16 * nv];
}

/* The incoming float32 gradients src[i] (B, sizes[i]) of those outputs, side by side as one
 * bfloat16 (B, N) block dst, and, where sums[i] is not NULL, their column sums (the biases'
 * gradients), summed in float32 over the rows in order. Columns are split between the
 * threads, so the sums do not depend on their number. */
static inline int64_t narrow_chunks(int64_t n) { return (n + NARROW_CHUNK - 1) / NARROW_CHUNK; }

void cv_bf16_join_narrow(int64_t B, int64_t N, int n_parts, const int64_t *sizes,
                         const float *const *src, uint16_t *dst, float *const *sums,
                         int n_threads) {
    int64_t n_chunks = 0;
    for (int i = 0; i < n_parts; i++) n_chunks += narrow_chunks(sizes[i]);
#pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t c = 0; c < n_chunks; c++) {
        int64_t k = c, o = 0;
        int i = 0;
        while (k >= narrow_chunks(sizes[i])) {
            k -= narrow_chunks(sizes[i]);
            o += sizes[i++];
        }
        int64_t j0 = k * NARROW_CHUNK;
        int64_t w = sizes[i] - j0 < NARROW_CHUNK ? sizes[i] - j0 : NARROW_CHUNK;
        narrow_chunk(B, sizes[i], j0, w, src[i], N, o, dst, sums[i]);
    }
}

/* ---------------------------------------------------------------- Adam
 * torch.optim.Adam's update (L2 weight decay added to the gradient, no amsgrad) of n_t float32
 * tensors in one call, after one read-only pass that looks for a gradient that is not finite:
 * where one is, nothing is written (the step is skipped, as under torch.amp.GradScaler) and 1
 * is returned. The values of all tensors are split evenly between the threads, whatever their
 * sizes. steps[t] points at tensor t's step count, which is advanced by one before its bias
 * corrections are computed (float64, then rounded), unless the step is skipped. Where copies
 * is not NULL and copies[t] is not, that bfloat16 copy of tensor t (same layout) is written
 * with its new values (the rounding of Tensor.to(torch.bfloat16)): the weights of
 * cellvae.nn's bfloat16 products, cast once in the update while they are in cache, not again
 * in the next forward pass. */

/* 1 when one of the n values is an inf or a NaN (all exponent bits set). */
CLONES static int any_nonfinite(int64_t n, const float *restrict g) {
    uint32_t bad = 0;
    for (int64_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, g + i, sizeof u);
        bad |= (u & 0x7F800000u) == 0x7F800000u;
    }
    return bad != 0;
}

CLONES static void adam_range(int64_t n, float *restrict p, const float *restrict g,
                              float *restrict m, float *restrict v, float w1, float b2, float w2,
                              float wd, float step_size, float bc2_sqrt, float eps) {
    for (int64_t i = 0; i < n; i++) { /* the operations and roundings of torch.optim.Adam */
        float gi = g[i] + wd * p[i];
        float mi = m[i] + w1 * (gi - m[i]); /* lerp(m, g, w1), w1 = 1 - b1 */
        float vi = b2 * v[i] + w2 * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] += -step_size * (mi / (sqrtf(vi) / bc2_sqrt + eps));
    }
}

/* This thread's part [*a, *b) of tensor t, which holds the values [off, off + size) of all. */
static int my_part(int64_t off, int64_t size, int64_t total, int64_t *a, int64_t *b) {
    int64_t lo, hi;
    thread_range(total, &lo, &hi);
    *a = lo > off ? lo : off;
    *b = hi < off + size ? hi : off + size;
    return *a < *b;
}

/* dst[i] = f32_to_bf16(src[i]) for n values. */
CLONES static void narrow_run(int64_t n, const float *restrict src, uint16_t *restrict dst) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        v16h h = narrow16(load16(src + i));
        memcpy(dst + i, &h, sizeof h);
    }
    for (; i < n; i++) dst[i] = f32_to_bf16(src[i]);
}

#define ADAM_CHUNK 4096 /* values updated, then narrowed while in L1 / L2 */

int cv_adam(int n_t, const int64_t *sizes, float *const *p, const float *const *g,
            float *const *m, float *const *v, float *const *steps, uint16_t *const *copies,
            double lr, double b1, double b2, double wd, double eps, int n_threads) {
    int64_t total = 0;
    for (int t = 0; t < n_t; t++) total += sizes[t];
    int bad = 0;
#pragma omp parallel num_threads(n_threads) reduction(| : bad)
    {
        int64_t off = 0, a, b;
        for (int t = 0; t < n_t; off += sizes[t++])
            if (my_part(off, sizes[t], total, &a, &b)) bad |= any_nonfinite(b - a, g[t] + a - off);
    }
    if (bad) return 1;
#pragma omp parallel num_threads(n_threads)
    {
        int64_t off = 0, a, b;
        for (int t = 0; t < n_t; off += sizes[t++]) {
            if (!my_part(off, sizes[t], total, &a, &b)) continue;
            double s = *steps[t] + 1.0, bc1 = 1.0 - pow(b1, s), bc2 = 1.0 - pow(b2, s);
            uint16_t *copy = copies ? copies[t] : NULL;
            for (int64_t k = a - off; k < b - off; k += ADAM_CHUNK) {
                int64_t n = b - off - k < ADAM_CHUNK ? b - off - k : ADAM_CHUNK;
                adam_range(n, p[t] + k, g[t] + k, m[t] + k, v[t] + k, (float)(1.0 - b1),
                           (float)b2, (float)(1.0 - b2), (float)wd, (float)(lr / bc1),
                           (float)sqrt(bc2), (float)eps);
                if (copy) narrow_run(n, p[t] + k, copy + k);
            }
        }
    }
    for (int t = 0; t < n_t; t++) *steps[t] += 1.0f;
    return 0;
}

/* ---------------------------------------------------------------- the latent sample
 * q(z | x) = N(m, v) from the encoder's two heads, side by side in mu = (B, 2L): m = mu[:, :L],
 * v = exp(mu[:, L:]) + var_eps; the sample z = m + sqrt(v) n (n standard normal, given) and
 * KL(q || N(0, I)) per row, 0.5 sum (v + m^2 - log v - 1). Float32, as the torch code. */
void cv_normal_sample_fwd(int64_t B, int64_t L, const float *mu, const float *noise,
                          float var_eps, float *m, float *v, float *z, float *kl) {
    for (int64_t b = 0; b < B; b++) {
        float acc = 0.0f;
        for (int64_t j = 0; j < L; j++) {
            int64_t i = b * L + j;
            float mj = mu[b * 2 * L + j], vj = expf(mu[b * 2 * L + L + j]) + var_eps;
            m[i] = mj;
            v[i] = vj;
            z[i] = mj + sqrtf(vj) * noise[i];
            acc += vj + mj * mj - logf(vj) - 1.0f;
        }
        kl[b] = 0.5f * acc;
    }
}

/* Its backward pass: the gradient by the heads' outputs mu, into d (B, 2L), from those of m, v,
 * z (B, L) and kl (B) (each may be NULL: no gradient). With e = exp(mu[:, L:]) and v = e +
 * var_eps: d/dm = gm + gz + gkl m; d/dmu_v = e (gv + gz n / (2 sqrt v) + gkl (1 - 1/v) / 2). */
void cv_normal_sample_bwd(int64_t B, int64_t L, const float *mu, const float *noise,
                          float var_eps, const float *gm, const float *gv, const float *gz,
                          const float *gkl, float *d) {
    for (int64_t b = 0; b < B; b++) {
        float k = gkl ? gkl[b] : 0.0f;
        for (int64_t j = 0; j < L; j++) {
            int64_t i = b * L + j;
            float mj = mu[b * 2 * L + j], e = expf(mu[b * 2 * L + L + j]), vj = e + var_eps;
            float dm = k * mj, dv = k * 0.5f * (1.0f - 1.0f / vj);
            if (gm) dm += gm[i];
            if (gz) {
                dm += gz[i];
                dv += gz[i] * noise[i] / (2.0f * sqrtf(vj));
            }
            if (gv) dv += gv[i];
            d[b * 2 * L + j] = dm;
            d[b * 2 * L + L + j] = dv * e;
        }
    }
}
