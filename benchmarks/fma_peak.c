/* The CPU's multiply-accumulate peak, for openvino_profile.py's bound: THREADS threads, each running twelve
 * independent chains of vector fused multiply-adds, so that nothing but the throughput of the FMA units limits
 * them (twelve chains cover the latency of two FMA pipes). fp32 runs VFMADD on 256-bit and, where the compiler
 * targets AVX-512, on 512-bit registers, and reports the faster (CPUs that split 512-bit operations run both at
 * one rate); bf16 runs VDPBF16PS, two MACs per 32-bit lane. Prints the MACs per second summed over the threads,
 * in GMAC/s.
 *
 *     cc -O2 -march=native -pthread fma_peak.c -o fma_peak && ./fma_peak fp32|bf16 THREADS SECONDS
 *
 * Exits 3 when the CPU (or compiler) has no such instruction, 2 on bad arguments. */
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CHAINS(X) X(0) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11)

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

typedef double (*kernel_fn)(long iterations); /* returns a value that depends on every chain */

/* NAME: twelve chains of VEC accumulators (DECLARE_VEC), each stepped by STEP_NAME with the constant operands b
 * and c, summed (SUM_VEC) and their LANES lanes added into a double at the end */
#define KERNEL(NAME, VEC, SET1, STORE, LANES, OPERAND, B, C)                                                      \
    static double NAME(long iterations) {                                                                      \
        const OPERAND b = B, c = C;                                                                            \
        CHAINS(DECLARE_##VEC)                                                                                  \
        for (long k = 0; k < iterations; k++) { CHAINS(STEP_##NAME) }                                          \
        VEC s = SET1(0.0f);                                                                                    \
        CHAINS(SUM_##VEC)                                                                                      \
        float out[LANES];                                                                                      \
        STORE(out, s);                                                                                         \
        double total = 0;                                                                                      \
        for (int i = 0; i < LANES; i++) total += out[i];                                                       \
        return total;                                                                                          \
    }

#if defined(__AVX2__) && defined(__FMA__)
#define DECLARE___m256(i) __m256 a##i = _mm256_set1_ps((float)(i));
#define SUM___m256(i) s = _mm256_add_ps(s, a##i);
#define STEP_fp32_ymm(i) a##i = _mm256_fmadd_ps(a##i, b, c);
KERNEL(fp32_ymm, __m256, _mm256_set1_ps, _mm256_storeu_ps, 8, __m256,
       _mm256_set1_ps(0.999999f), _mm256_set1_ps(1e-7f))
#endif

#if defined(__AVX512F__)
#define DECLARE___m512(i) __m512 a##i = _mm512_set1_ps((float)(i));
#define SUM___m512(i) s = _mm512_add_ps(s, a##i);
#define STEP_fp32_zmm(i) a##i = _mm512_fmadd_ps(a##i, b, c);
KERNEL(fp32_zmm, __m512, _mm512_set1_ps, _mm512_storeu_ps, 16, __m512,
       _mm512_set1_ps(0.999999f), _mm512_set1_ps(1e-7f))
#endif

#if defined(__AVX512BF16__)
#define STEP_bf16_zmm(i) a##i = _mm512_dpbf16_ps(a##i, b, c);
KERNEL(bf16_zmm, __m512, _mm512_set1_ps, _mm512_storeu_ps, 16, __m512bh,
       (__m512bh)_mm512_set1_epi16(0x3f80), (__m512bh)_mm512_set1_epi16(0x3380)) /* b = 1, c = 6e-8 */
#endif

struct job {
    kernel_fn kernel;
    long iterations;
    double result;
};

static void *run_job(void *arg) {
    struct job *job = arg;
    job->result = job->kernel(job->iterations);
    return NULL;
}

/* GMAC/s of THREADS threads each running KERNEL for ITERATIONS steps of twelve instructions */
static double rate(kernel_fn kernel, int macs_per_instruction, int threads, long iterations) {
    pthread_t ids[256];
    struct job jobs[256];
    double sink = 0, start = now();
    for (int t = 0; t < threads; t++) {
        jobs[t] = (struct job){kernel, iterations, 0};
        pthread_create(&ids[t], NULL, run_job, &jobs[t]);
    }
    for (int t = 0; t < threads; t++) {
        pthread_join(ids[t], NULL);
        sink += jobs[t].result;
    }
    double seconds = now() - start;
    if (sink == 12345.678) fputs("", stderr); /* keeps the results live */
    return (double)threads * iterations * 12 * macs_per_instruction / seconds / 1e9;
}

/* the rate over about SECONDS, after a calibration run sizes the iteration count */
static double measure(kernel_fn kernel, int macs_per_instruction, int threads, double seconds) {
    long probe = 1000000;
    double probe_rate = rate(kernel, macs_per_instruction, threads, probe);
    long iterations = (long)(seconds * probe_rate * 1e9 / ((double)threads * 12 * macs_per_instruction));
    return rate(kernel, macs_per_instruction, threads, iterations > probe ? iterations : probe);
}

int main(int argc, char **argv) {
    int threads = argc == 4 ? atoi(argv[2]) : 0;
    double seconds = argc == 4 ? atof(argv[3]) : 0;
    if (argc != 4 || threads < 1 || threads > 256 || !(seconds > 0) ||
        (strcmp(argv[1], "fp32") != 0 && strcmp(argv[1], "bf16") != 0)) {
        fputs("usage: fma_peak fp32|bf16 THREADS(1-256) SECONDS\n", stderr);
        return 2;
    }
    double best = 0;
    if (strcmp(argv[1], "fp32") == 0) {
#if defined(__AVX2__) && defined(__FMA__)
        best = measure(fp32_ymm, 8, threads, seconds / 2);
#endif
#if defined(__AVX512F__)
        double wide = measure(fp32_zmm, 16, threads, seconds / 2);
        best = wide > best ? wide : best;
#endif
    } else {
#if defined(__AVX512BF16__)
        best = measure(bf16_zmm, 32, threads, seconds);
#endif
    }
    if (best == 0) {
        fprintf(stderr, "this CPU (or compiler) has no %s FMA instruction to measure\n", argv[1]);
        return 3;
    }
    printf("%.2f\n", best);
    return 0;
}
