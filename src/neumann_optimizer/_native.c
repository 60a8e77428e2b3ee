/* One pass per step of the Neumann optimizer on CPU (SPEC section 3), for float32 and float64.
 *
 * Compiled at first use by neumann_optimizer/_native.py with the system C compiler and OpenMP,
 * loaded with ctypes. Each parameter's g, w, m, v are read once and w, m, v written once (28
 * bytes per float32 parameter, Adam's traffic), and the same pass returns sum ||w - v||^2 of
 * the updated tensors: the norm the next step's regularizer needs, so no step reads w and v a
 * second time. The tensors of a group are split into one contiguous range of elements per
 * thread, so threads get equal work whatever the tensor sizes.
 *
 * Phases: 0 burn-in (w -= lr g), 1 reset (m = -lr g), 2 regular (d = g + coef (w - v)).
 * v NULL is the lean step of groups whose regularizers are both 0: no v and no norm (d = g), a
 * branch outside the loop.
 * A reset reads m (and scales it by 0): resets are rare, and one loop serves both.
 * g includes weight decay, g + wd w, always computed: with wd = 0 it is g exactly (for finite w),
 * and a branch in the loop made it 3x slower (measured). Sums of squares run in blocks of BLOCK
 * elements in the parameter type (vectorised), blocks added in double.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#else /* built without OpenMP (a compiler that rejects -fopenmp): one thread, the pragmas ignored */
static int omp_get_thread_num(void) { return 0; }
static int omp_get_num_threads(void) { return 1; }
#endif

#define BLOCK 1024
#define ALIGN 16 /* a thread's range starts on a multiple of 16 elements (one 64-byte line) */

/* The range [lo, hi) of the concatenation of ntensors tensors of sizes numel[] that thread
 * tid of nthreads handles. */
static void thread_range(int64_t total, int tid, int nthreads, int64_t *lo, int64_t *hi) {
    int64_t per = (total / nthreads + ALIGN - 1) / ALIGN * ALIGN;
    *lo = per * tid < total ? per * tid : total;
    *hi = per * (tid + 1) < total && tid + 1 < nthreads ? per * (tid + 1) : total;
}

static int64_t total_numel(int64_t ntensors, const int64_t *numel) {
    int64_t total = 0;
    for (int64_t i = 0; i < ntensors; ++i) total += numel[i];
    return total;
}

/* One thread for small groups: there a parallel region costs more than the work. */
static int threads_for(int64_t total, int nthreads) { return total < 32768 ? 1 : nthreads; }

/* Inside a parallel region: run the statement(s) after CONTINUE for each piece [s, e) of
 * tensor i that falls in this thread's range, while CONTINUE holds. */
#define FOR_MY_SEGMENTS(ntensors, numel, total, CONTINUE, ...)                                      \
    {                                                                                               \
        int64_t lo_, hi_, base_ = 0;                                                                \
        thread_range(total, omp_get_thread_num(), omp_get_num_threads(), &lo_, &hi_);               \
        for (int64_t i = 0; i < (ntensors) && base_ < hi_ && (CONTINUE); base_ += (numel)[i], ++i) { \
            int64_t s = lo_ > base_ ? lo_ - base_ : 0;                                              \
            int64_t e = hi_ - base_ < (numel)[i] ? hi_ - base_ : (numel)[i];                        \
            if (s < e) {                                                                            \
                __VA_ARGS__;                                                                        \
            }                                                                                       \
        }                                                                                           \
    }

#define DEFINE_KERNELS(T, SUFFIX)                                                                     \
    static double seg_step_##SUFFIX(T *restrict w, const T *restrict g, T *restrict m, T *restrict v,   \
                                    int64_t n, int phase, T lr, T mu, T coef, T keep, T wd) {          \
        double total = 0.0;                                                                         \
        if (v == NULL) { /* the lean step: no v, no norm; w and m as fused Nesterov SGD (20 B) */     \
            const T mscale = phase == 1 ? 0 : mu;                                                    \
            if (phase == 0) {                                                                       \
                _Pragma("omp simd") for (int64_t k = 0; k < n; ++k) w[k] -= lr * (g[k] + wd * w[k]);   \
            } else {                                                                                \
                _Pragma("omp simd") for (int64_t k = 0; k < n; ++k) {                                \
                    T wk = w[k];                                                                    \
                    T d = g[k] + wd * wk;                                                           \
                    T mn = mscale * m[k] - lr * d;                                                  \
                    m[k] = mn;                                                                      \
                    w[k] = wk + mu * mn - lr * d;                                                   \
                }                                                                                   \
            }                                                                                       \
            return 0.0;                                                                             \
        }                                                                                           \
        for (int64_t s = 0; s < n; s += BLOCK) {                                                    \
            int64_t e = s + BLOCK < n ? s + BLOCK : n;                                               \
            T acc = 0;                                                                              \
            if (phase == 0) {                                                                       \
                _Pragma("omp simd reduction(+ : acc)") for (int64_t k = s; k < e; ++k) {             \
                    T wk = w[k];                                                                    \
                    T wn = wk - lr * (g[k] + wd * wk);                                              \
                    w[k] = wn;                                                                      \
                    T x = wn - v[k];                                                                \
                    acc += x * x;                                                                   \
                }                                                                                   \
            } else { /* a reset is the regular step with m and coef taken as 0 (exact for finite m) */ \
                const T mscale = phase == 1 ? 0 : mu, c = phase == 1 ? 0 : coef;                     \
                _Pragma("omp simd reduction(+ : acc)") for (int64_t k = s; k < e; ++k) {             \
                    T wk = w[k], vk = v[k];                                                         \
                    T d = g[k] + wd * wk + c * (wk - vk);                                           \
                    T mn = mscale * m[k] - lr * d;                                                  \
                    T wn = wk + mu * mn - lr * d;                                                   \
                    T vn = vk + keep * (wn - vk);                                                   \
                    m[k] = mn;                                                                      \
                    w[k] = wn;                                                                      \
                    v[k] = vn;                                                                      \
                    T x = wn - vn;                                                                  \
                    acc += x * x;                                                                   \
                }                                                                                   \
            }                                                                                       \
            total += (double)acc;                                                                   \
        }                                                                                           \
        return total;                                                                               \
    }                                                                                               \
                                                                                                    \
    static double seg_sqdist_##SUFFIX(const T *restrict w, const T *restrict v, int64_t n) {         \
        double total = 0.0;                                                                         \
        for (int64_t s = 0; s < n; s += BLOCK) {                                                    \
            int64_t e = s + BLOCK < n ? s + BLOCK : n;                                               \
            T acc = 0;                                                                              \
            _Pragma("omp simd reduction(+ : acc)") for (int64_t k = s; k < e; ++k) {                 \
                T x = w[k] - v[k];                                                                  \
                acc += x * x;                                                                       \
            }                                                                                       \
            total += (double)acc;                                                                   \
        }                                                                                           \
        return total;                                                                               \
    }                                                                                               \
                                                                                                    \
    static int seg_finite_##SUFFIX(const T *restrict g, int64_t n) {                                 \
        for (int64_t s = 0; s < n; s += BLOCK) {                                                    \
            int64_t e = s + BLOCK < n ? s + BLOCK : n;                                               \
            T acc = 0;                                                                              \
            _Pragma("omp simd reduction(+ : acc)") for (int64_t k = s; k < e; ++k) acc += g[k] * 0; \
            if (acc != 0) return 0; /* inf * 0 and NaN * 0 are NaN, and NaN != 0 */                 \
        }                                                                                           \
        return 1;                                                                                   \
    }                                                                                               \
                                                                                                    \
    double neumann_step_##SUFFIX(int64_t ntensors, T **w, T **g, T **m, T **v, const int64_t *numel,  \
                                 int phase, double lr, double mu, double coef, double keep, double wd, \
                                 int nthreads) {                                                     \
        int64_t total = total_numel(ntensors, numel);                                               \
        double sq = 0.0;                                                                            \
        _Pragma("omp parallel num_threads(threads_for(total, nthreads)) reduction(+ : sq)")         \
        FOR_MY_SEGMENTS(ntensors, numel, total, 1,                                                   \
                        sq += seg_step_##SUFFIX(w[i] + s, g[i] + s, m[i] + s, v ? v[i] + s : NULL, e - s, phase,   \
                                                (T)lr, (T)mu, (T)coef, (T)keep, (T)wd))              \
        return sq;                                                                                  \
    }                                                                                               \
                                                                                                    \
    double neumann_sqdist_##SUFFIX(int64_t ntensors, T **w, T **v, const int64_t *numel, int nthreads) { \
        int64_t total = total_numel(ntensors, numel);                                               \
        double sq = 0.0;                                                                            \
        _Pragma("omp parallel num_threads(threads_for(total, nthreads)) reduction(+ : sq)")         \
        FOR_MY_SEGMENTS(ntensors, numel, total, 1, sq += seg_sqdist_##SUFFIX(w[i] + s, v[i] + s, e - s)) \
        return sq;                                                                                  \
    }                                                                                               \
                                                                                                    \
    int neumann_all_finite_##SUFFIX(int64_t ntensors, T **g, const int64_t *numel, int nthreads) {   \
        int64_t total = total_numel(ntensors, numel);                                               \
        int ok = 1;                                                                                 \
        _Pragma("omp parallel num_threads(threads_for(total, nthreads)) reduction(&& : ok)")        \
        FOR_MY_SEGMENTS(ntensors, numel, total, ok, ok = seg_finite_##SUFFIX(g[i] + s, e - s))       \
        return ok;                                                                                  \
    }

DEFINE_KERNELS(float, f32)
DEFINE_KERNELS(double, f64)
