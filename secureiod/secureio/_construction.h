/*
 * The secureio packet construction's primitives, shared by _accel.c and _rxbatch.c
 * (PROTOCOL.md section 4): the Poly1305 one-time key is BLAKE3-256 of
 * LE64(PacketID ^ "github.c") || mac_seed, 32 bytes, so one BLAKE3 compression; the
 * payload is DJB ChaCha20 (64-bit nonce = PacketID, 64-bit block counter) and carries two
 * Poly1305 tags.
 * Header-only (static functions, included after Python.h): each extension module is its
 * own translation unit, sets POLY_XOR_PID and fetches the OpenSSL algorithms in its init
 * function. packet.py stays the reference; tests check both modules against it.
 *
 * ChaCha20 and Poly1305 over long inputs come from OpenSSL's libcrypto, short ones from
 * libsodium (chacha20_xor_ic and poly1305 below pick by length). Why: on the test box
 * (AVX-512) OpenSSL 3.0 takes 774 ns for 1,437 bytes of ChaCha20 and 375 ns for a
 * 1,437-byte Poly1305 tag where libsodium 1.0.18 (AVX2 at best) takes 1,296 and 959; but
 * each OpenSSL call costs ~200 ns of EVP dispatch, so below the crossovers (measured with
 * bench/crypto_crossover.c, see README "Crypto backend") libsodium is faster, e.g. 75 ns
 * against 330 for the 4-byte Length tag.
 */
#ifndef SECUREIOD_CONSTRUCTION_H
#define SECUREIOD_CONSTRUCTION_H

#include <limits.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <sodium.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static const uint32_t B3_IV[8] = {0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A,
                                  0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19};
/* Message word order per round: BLAKE3's permutation applied r times (the reference's
 * MSG_SCHEDULE), so the rounds index the block directly instead of permuting it. */
static const uint8_t B3_SCHEDULE[7][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15},
    {2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8},
    {3, 4, 10, 12, 13, 2, 7, 14, 6, 5, 9, 0, 11, 15, 8, 1},
    {10, 7, 12, 9, 14, 3, 13, 15, 4, 0, 11, 2, 5, 8, 1, 6},
    {12, 13, 9, 11, 15, 10, 14, 8, 7, 2, 5, 3, 0, 1, 6, 4},
    {9, 14, 11, 5, 8, 12, 15, 1, 13, 3, 0, 10, 2, 6, 4, 7},
    {11, 15, 5, 0, 1, 9, 8, 6, 14, 10, 2, 12, 3, 4, 7, 13},
};
/* First 8 bytes of "github.com/xaionaro-go/secureio " as a little-endian integer. */
static uint64_t POLY_XOR_PID;

static inline uint32_t rotr32(uint32_t w, int c) { return (w >> c) | (w << (32 - c)); }
static inline uint32_t load32(const uint8_t *p) {
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}
static inline uint64_t load64(const uint8_t *p) {
    return (uint64_t)load32(p) | ((uint64_t)load32(p + 4) << 32);
}
static inline void store32(uint8_t *p, uint32_t v) {
    p[0] = (uint8_t)v; p[1] = (uint8_t)(v >> 8); p[2] = (uint8_t)(v >> 16); p[3] = (uint8_t)(v >> 24);
}
static inline void store64(uint8_t *p, uint64_t v) {
    store32(p, (uint32_t)v); store32(p + 4, (uint32_t)(v >> 32));
}

#define G(a, b, c, d, mx, my)                      \
    do {                                           \
        s[a] = s[a] + s[b] + (mx);                 \
        s[d] = rotr32(s[d] ^ s[a], 16);            \
        s[c] = s[c] + s[d];                        \
        s[b] = rotr32(s[b] ^ s[c], 12);            \
        s[a] = s[a] + s[b] + (my);                 \
        s[d] = rotr32(s[d] ^ s[a], 8);             \
        s[c] = s[c] + s[d];                        \
        s[b] = rotr32(s[b] ^ s[c], 7);             \
    } while (0)

/*
 * BLAKE3-256 of exactly 32 bytes: one chunk, one block, root output. The rounds are fully
 * unrolled over a constant schedule so that the block and the state stay in registers
 * (236 ns per call with a loop that permuted the block in memory, 60 ns unrolled; it runs
 * once per datagram on both sides).
 */
static void blake3_32(const uint8_t in[32], uint8_t out[32]) {
    uint32_t m[16], s[16];
    for (int i = 0; i < 8; i++) m[i] = load32(in + 4 * i);
    for (int i = 8; i < 16; i++) m[i] = 0;
    for (int i = 0; i < 8; i++) s[i] = B3_IV[i];
    s[8] = B3_IV[0]; s[9] = B3_IV[1]; s[10] = B3_IV[2]; s[11] = B3_IV[3];
    s[12] = 0; s[13] = 0; s[14] = 32; s[15] = 1 | 2 | 8; /* CHUNK_START|CHUNK_END|ROOT */
#pragma GCC unroll 7
    for (int r = 0; r < 7; r++) {
        const uint8_t *w = B3_SCHEDULE[r];
        G(0, 4, 8, 12, m[w[0]], m[w[1]]);
        G(1, 5, 9, 13, m[w[2]], m[w[3]]);
        G(2, 6, 10, 14, m[w[4]], m[w[5]]);
        G(3, 7, 11, 15, m[w[6]], m[w[7]]);
        G(0, 5, 10, 15, m[w[8]], m[w[9]]);
        G(1, 6, 11, 12, m[w[10]], m[w[11]]);
        G(2, 7, 8, 13, m[w[12]], m[w[13]]);
        G(3, 4, 9, 14, m[w[14]], m[w[15]]);
    }
    for (int i = 0; i < 8; i++) store32(out + 4 * i, s[i] ^ s[i + 8]);
    sodium_memzero(m, sizeof m);
    sodium_memzero(s, sizeof s);
}

static void poly_key(const uint8_t *mac_seed, uint64_t pid, uint8_t out[32]) {
    uint8_t in[32];
    store64(in, pid ^ POLY_XOR_PID);
    memcpy(in + 8, mac_seed, 24);
    blake3_32(in, out);
    sodium_memzero(in, sizeof in);
}

/*
 * The Poly1305 keys of KEY_LANES PacketIDs under one mac seed at once. Every key is the
 * same single BLAKE3 compression with only the first two message words (the PacketID)
 * differing, so the lanes of GCC vector words run them side by side: portable (SSE2 on
 * any x86-64, plain C elsewhere) and 2.5 times faster per key than poly_key (54 ns against
 * 134 on the test box; 8 lanes beat 4 and 16). out[l] =
 * poly_key(mac_seed, pid[l]) for every lane l.
 */
#define KEY_LANES 8
typedef uint32_t lanes_t __attribute__((vector_size(4 * KEY_LANES)));

#define rotr_lanes(w, c) (((w) >> (c)) | ((w) << (32 - (c))))

#define GL(a, b, c, d, mx, my)                     \
    do {                                           \
        v[a] = v[a] + v[b] + (mx);                 \
        v[d] = rotr_lanes(v[d] ^ v[a], 16);        \
        v[c] = v[c] + v[d];                        \
        v[b] = rotr_lanes(v[b] ^ v[c], 12);        \
        v[a] = v[a] + v[b] + (my);                 \
        v[d] = rotr_lanes(v[d] ^ v[a], 8);         \
        v[c] = v[c] + v[d];                        \
        v[b] = rotr_lanes(v[b] ^ v[c], 7);         \
    } while (0)

static void poly_keys(const uint8_t *mac_seed, const uint64_t pid[KEY_LANES],
                      uint8_t out[KEY_LANES][32]) {
    lanes_t m[16], v[16];
    uint32_t lo[KEY_LANES], hi[KEY_LANES];
    for (int l = 0; l < KEY_LANES; l++) {
        uint64_t x = pid[l] ^ POLY_XOR_PID;
        lo[l] = (uint32_t)x;
        hi[l] = (uint32_t)(x >> 32);
    }
    memcpy(&m[0], lo, sizeof lo);
    memcpy(&m[1], hi, sizeof hi);
    for (int i = 2; i < 8; i++) m[i] = (lanes_t){0} + load32(mac_seed + 4 * (i - 2));
    for (int i = 8; i < 16; i++) m[i] = (lanes_t){0};
    for (int i = 0; i < 8; i++) v[i] = (lanes_t){0} + B3_IV[i];
    for (int i = 8; i < 12; i++) v[i] = (lanes_t){0} + B3_IV[i - 8];
    v[12] = (lanes_t){0};
    v[13] = (lanes_t){0};
    v[14] = (lanes_t){0} + 32;
    v[15] = (lanes_t){0} + (1 | 2 | 8); /* CHUNK_START|CHUNK_END|ROOT */
#pragma GCC unroll 7
    for (int r = 0; r < 7; r++) {
        const uint8_t *w = B3_SCHEDULE[r];
        GL(0, 4, 8, 12, m[w[0]], m[w[1]]);
        GL(1, 5, 9, 13, m[w[2]], m[w[3]]);
        GL(2, 6, 10, 14, m[w[4]], m[w[5]]);
        GL(3, 7, 11, 15, m[w[6]], m[w[7]]);
        GL(0, 5, 10, 15, m[w[8]], m[w[9]]);
        GL(1, 6, 11, 12, m[w[10]], m[w[11]]);
        GL(2, 7, 8, 13, m[w[12]], m[w[13]]);
        GL(3, 4, 9, 14, m[w[14]], m[w[15]]);
    }
    for (int i = 0; i < 8; i++) {
        lanes_t h = v[i] ^ v[i + 8];
        for (int l = 0; l < KEY_LANES; l++) store32(out[l] + 4 * i, h[l]);
    }
    sodium_memzero(m, sizeof m);
    sodium_memzero(v, sizeof v);
    sodium_memzero(lo, sizeof lo);
    sodium_memzero(hi, sizeof hi);
}

/*
 * ChaCha20 (DJB's: 64-bit nonce, 64-bit block counter) of many inputs under one key at
 * once: sixteen 64-byte blocks per pass in the lanes of AVX-512 registers, the blocks taken
 * from any of the inputs (a TSO segment's 45 fragments are 1,035 blocks: 65 full passes).
 * Why: OpenSSL's ChaCha20 must be set up again for every fragment's nonce, and in OpenSSL
 * 3.0 that set-up (EVP_EncryptInit_ex, which asks the provider for the IV length by name)
 * was 5-9 % of the sending daemon's CPU; a C microbenchmark of 45 fragments of 1,437 bytes:
 * 430 ns a fragment here against 616 for OpenSSL with its set-up. Only where the CPU has
 * AVX-512F (checked at run time: HAVE_CHACHA16) and SECUREIOD_NO_AVX512 is not set; tests
 * check it against libsodium and the Python reference, both ways.
 */
typedef struct {
    uint8_t *out;       /* may equal in */
    const uint8_t *in;
    size_t len;
    uint64_t nonce;     /* the 8 nonce bytes as a little-endian integer (a PacketID) */
} chacha_job_t;

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define CHACHA16_BUILT 1
#define C16_QR(a, b, c, d)                                 \
    do {                                                   \
        a = _mm512_add_epi32(a, b); d = _mm512_xor_si512(d, a); d = _mm512_rol_epi32(d, 16); \
        c = _mm512_add_epi32(c, d); b = _mm512_xor_si512(b, c); b = _mm512_rol_epi32(b, 12); \
        a = _mm512_add_epi32(a, b); d = _mm512_xor_si512(d, a); d = _mm512_rol_epi32(d, 8);  \
        c = _mm512_add_epi32(c, d); b = _mm512_xor_si512(b, c); b = _mm512_rol_epi32(b, 7);  \
    } while (0)

/* One pass: the key streams of 16 blocks, lane l = (counter lo/hi, nonce lo/hi)[l], as 16
 * registers each holding one block's 64 bytes. */
__attribute__((target("avx512f"))) static void chacha16_pass(const uint32_t key[8],
                                                             const uint32_t w12[16],
                                                             const uint32_t w13[16],
                                                             const uint32_t w14[16],
                                                             const uint32_t w15[16],
                                                             __m512i blk[16]) {
    __m512i s[16], x[16];
    s[0] = _mm512_set1_epi32(0x61707865);
    s[1] = _mm512_set1_epi32(0x3320646e);
    s[2] = _mm512_set1_epi32(0x79622d32);
    s[3] = _mm512_set1_epi32(0x6b206574);
    for (int i = 0; i < 8; i++) s[4 + i] = _mm512_set1_epi32((int)key[i]);
    s[12] = _mm512_loadu_si512(w12);
    s[13] = _mm512_loadu_si512(w13);
    s[14] = _mm512_loadu_si512(w14);
    s[15] = _mm512_loadu_si512(w15);
    for (int i = 0; i < 16; i++) x[i] = s[i];
    for (int r = 0; r < 10; r++) {
        C16_QR(x[0], x[4], x[8], x[12]);
        C16_QR(x[1], x[5], x[9], x[13]);
        C16_QR(x[2], x[6], x[10], x[14]);
        C16_QR(x[3], x[7], x[11], x[15]);
        C16_QR(x[0], x[5], x[10], x[15]);
        C16_QR(x[1], x[6], x[11], x[12]);
        C16_QR(x[2], x[7], x[8], x[13]);
        C16_QR(x[3], x[4], x[9], x[14]);
    }
    for (int i = 0; i < 16; i++) x[i] = _mm512_add_epi32(x[i], s[i]);
    /* Transpose 16x16 words: x[w] holds word w of every block; blk[l] is block l. */
    __m512i t[16], u[16];
    for (int i = 0; i < 16; i += 4) {
        t[i] = _mm512_unpacklo_epi32(x[i], x[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(x[i], x[i + 1]);
        t[i + 2] = _mm512_unpacklo_epi32(x[i + 2], x[i + 3]);
        t[i + 3] = _mm512_unpackhi_epi32(x[i + 2], x[i + 3]);
        u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);     /* element 0 of each 4 */
        u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]); /* element 1 */
        u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int k = 0; k < 4; k++) {
        __m512i v = _mm512_shuffle_i32x4(u[k], u[4 + k], 0x88);
        __m512i w = _mm512_shuffle_i32x4(u[k], u[4 + k], 0xDD);
        __m512i p = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0x88);
        __m512i q = _mm512_shuffle_i32x4(u[8 + k], u[12 + k], 0xDD);
        blk[k] = _mm512_shuffle_i32x4(v, p, 0x88);
        blk[8 + k] = _mm512_shuffle_i32x4(v, p, 0xDD);
        blk[4 + k] = _mm512_shuffle_i32x4(w, q, 0x88);
        blk[12 + k] = _mm512_shuffle_i32x4(w, q, 0xDD);
    }
}

/* out = in XOR ChaCha20(key, job.nonce, block counter from ic) for every job, the jobs'
 * blocks sixteen at a time. chacha16_pass spills key and key stream words to the stack,
 * where no C wipe reaches them: a caller wipes the stack once it is done (CHACHA16_SCRUB). */
__attribute__((target("avx512f"))) static void chacha16_xor(const uint8_t key[32],
                                                            const chacha_job_t *jobs,
                                                            size_t njobs, uint64_t ic) {
    uint32_t k[8];
    for (int i = 0; i < 8; i++) k[i] = load32(key + 4 * i);
    uint32_t w12[16], w13[16], w14[16], w15[16];
    uint8_t *lane_out[16];
    const uint8_t *lane_in[16];
    size_t lane_len[16];
    __m512i blk[16];
    int n = 0;
    size_t j = 0, off = 0;
    for (;;) {
        /* fill the lanes with the next blocks */
        while (n < 16 && j < njobs) {
            const chacha_job_t *jb = &jobs[j];
            if (off >= jb->len) { j++; off = 0; continue; }
            uint64_t ctr = ic + off / 64;
            w12[n] = (uint32_t)ctr;
            w13[n] = (uint32_t)(ctr >> 32);
            w14[n] = (uint32_t)jb->nonce;
            w15[n] = (uint32_t)(jb->nonce >> 32);
            lane_out[n] = jb->out + off;
            lane_in[n] = jb->in + off;
            lane_len[n] = jb->len - off < 64 ? jb->len - off : 64;
            n++;
            off += 64;
        }
        if (n == 0) break;
        for (int l = n; l < 16; l++) { w12[l] = w13[l] = w14[l] = w15[l] = 0; }
        chacha16_pass(k, w12, w13, w14, w15, blk);
        for (int l = 0; l < n; l++) {
            if (lane_len[l] == 64) {
                __m512i d = _mm512_loadu_si512(lane_in[l]);
                _mm512_storeu_si512(lane_out[l], _mm512_xor_si512(d, blk[l]));
            } else {
                uint8_t ks[64];
                _mm512_storeu_si512(ks, blk[l]);
                for (size_t b = 0; b < lane_len[l]; b++) lane_out[l][b] = lane_in[l][b] ^ ks[b];
                sodium_memzero(ks, sizeof ks);
            }
        }
        n = 0;
    }
    sodium_memzero(blk, sizeof blk);
    sodium_memzero(k, sizeof k);
}
#else
#define CHACHA16_BUILT 0
static void chacha16_xor(const uint8_t key[32], const chacha_job_t *jobs, size_t njobs,
                         uint64_t ic) {
    (void)key; (void)jobs; (void)njobs; (void)ic;
}
#endif

/* Bytes of stack to clear after a call's last chacha16_xor (sodium_stackzero): its frames
 * take about 2 KiB (review 9b found key and key stream words there without it). */
#define CHACHA16_SCRUB 8192

/* Set by the module's init: the CPU runs chacha16_xor and the environment allows it. */
static int HAVE_CHACHA16;

/*
 * OpenSSL's algorithms, fetched once by the module's init function into its module state
 * and only read afterwards (fetched algorithm objects may be shared between threads).
 */
typedef struct {
    EVP_CIPHER *chacha20;
    EVP_MAC *poly1305;
} algorithms_t;

static int algorithms_fetch(algorithms_t *a) {
    a->chacha20 = EVP_CIPHER_fetch(NULL, "ChaCha20", NULL);
    a->poly1305 = EVP_MAC_fetch(NULL, "POLY1305", NULL);
    return a->chacha20 != NULL && a->poly1305 != NULL ? 0 : -1;
}

static void algorithms_free(algorithms_t *a) {
    EVP_CIPHER_free(a->chacha20);
    EVP_MAC_free(a->poly1305);
    a->chacha20 = NULL;
    a->poly1305 = NULL;
}

/*
 * The module init both extensions share: libsodium, the PacketID constant, then the module
 * with the OpenSSL algorithms as its state. Without OpenSSL's ChaCha20 or POLY1305 (a
 * FIPS-only or restricted OPENSSL_CONF) every input goes to libsodium: slower on long
 * inputs, never off; the module's OPENSSL attribute says which.
 */
static PyObject *construction_module(struct PyModuleDef *def) {
    if (sodium_init() < 0) {
        PyErr_SetString(PyExc_ImportError, "libsodium failed to initialise");
        return NULL;
    }
    POLY_XOR_PID = load64((const uint8_t *)"github.c");
#if CHACHA16_BUILT
    __builtin_cpu_init();
    HAVE_CHACHA16 = __builtin_cpu_supports("avx512f") && getenv("SECUREIOD_NO_AVX512") == NULL;
#endif
    PyObject *m = PyModule_Create(def);
    if (m == NULL) return NULL;
    int openssl = algorithms_fetch(PyModule_GetState(m)) == 0;
    if (!openssl) {
        algorithms_free(PyModule_GetState(m));
        ERR_clear_error();
    }
    if (PyModule_AddObjectRef(m, "OPENSSL", openssl ? Py_True : Py_False) < 0 ||
        PyModule_AddObjectRef(m, "AVX512", HAVE_CHACHA16 ? Py_True : Py_False) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

/*
 * Crossovers, in bytes of input, from which OpenSSL beats libsodium once its contexts
 * exist (bench/crypto_crossover.c: ChaCha20 at 128 B 216 ns against 282, Poly1305 at 192 B 165 against 197).
 * A one-packet call (seal, open) creates its contexts for that one packet (measured: 210 ns
 * for the cipher's, 70 ns for the MAC's), so it uses OpenSSL only from where the saving
 * pays for that: ChaCha20 from 1024 B (586 ns against 374), Poly1305 from 384 B (312
 * against 201).
 */
#define CHACHA_OSSL_MIN 128
#define POLY_OSSL_MIN 192
#define SINGLE_CHACHA_OSSL_MIN 1024
#define SINGLE_POLY_OSSL_MIN 384

enum { CRYPTO_OK = 0, CRYPTO_NOMEM = 1, CRYPTO_FAILED = 2 };

/*
 * One call's OpenSSL contexts: created on first use, reused for every packet of that call
 * (a run of fragments), freed (and cleansed, which EVP_*_free do) at its end. Per call,
 * never global: the calls release the GIL and may run in several threads at once.
 */
typedef struct {
    const algorithms_t *alg;
    size_t chacha_min, poly_min; /* lengths from which OpenSSL is used */
    EVP_CIPHER_CTX *cipher;
    const uint8_t *cipher_key;   /* the key `cipher` holds; the caller keeps it alive */
    EVP_MAC_CTX *mac;
    int error;                   /* CRYPTO_*: once set, every later call fails too */
} crypto_t;

/* `single`: a one-packet call, which pays for the contexts only on long inputs. */
static void crypto_init(crypto_t *c, const algorithms_t *alg, int single) {
    memset(c, 0, sizeof *c);
    c->alg = alg;
    c->chacha_min = single ? SINGLE_CHACHA_OSSL_MIN : CHACHA_OSSL_MIN;
    c->poly_min = single ? SINGLE_POLY_OSSL_MIN : POLY_OSSL_MIN;
    if (alg->chacha20 == NULL || alg->poly1305 == NULL) { /* not fetched: libsodium only */
        c->chacha_min = SIZE_MAX;
        c->poly_min = SIZE_MAX;
    }
}

static void crypto_release(crypto_t *c) {
    EVP_CIPHER_CTX_free(c->cipher);
    EVP_MAC_CTX_free(c->mac);
    c->cipher = NULL;
    c->mac = NULL;
    c->cipher_key = NULL;
}

static int crypto_fail(crypto_t *c, int error) {
    if (c->error == CRYPTO_OK) c->error = error;
    return -1;
}

/*
 * out = in XOR ChaCha20(key, nonce8, block counter starting at ic), DJB's variant (64-bit
 * nonce, 64-bit counter), as crypto_stream_chacha20_xor_ic. OpenSSL's 16-byte IV is the
 * initial state words 12..15: LE64(counter) || nonce, and it carries the counter across
 * 32 bits (no input here comes near 2^32 blocks: a secureio packet is below 2^32 + 44 bytes).
 * out == in is allowed. Returns 0, or -1 with c->error set (out is then garbage).
 */
static int chacha20_xor_ic(crypto_t *c, uint8_t *out, const uint8_t *in, size_t len,
                           const uint8_t nonce[8], uint64_t ic, const uint8_t key[32]) {
    if (c->error != CRYPTO_OK) return -1;
    if (len < c->chacha_min || len > INT_MAX) { /* EVP takes an int length */
        crypto_stream_chacha20_xor_ic(out, in, (unsigned long long)len, nonce, ic, key);
        return 0;
    }
    uint8_t iv[16];
    store64(iv, ic);
    memcpy(iv + 8, nonce, 8);
    if (c->cipher == NULL) {
        c->cipher = EVP_CIPHER_CTX_new();
        if (c->cipher == NULL) return crypto_fail(c, CRYPTO_NOMEM);
        if (EVP_EncryptInit_ex(c->cipher, c->alg->chacha20, NULL, key, iv) != 1)
            return crypto_fail(c, CRYPTO_FAILED);
        c->cipher_key = key;
    } else if (EVP_EncryptInit_ex(c->cipher, NULL, NULL, c->cipher_key == key ? NULL : key, iv) != 1) {
        return crypto_fail(c, CRYPTO_FAILED);
    }
    c->cipher_key = key;
    int n = 0;
    if (EVP_EncryptUpdate(c->cipher, out, &n, in, (int)len) != 1 || (size_t)n != len)
        return crypto_fail(c, CRYPTO_FAILED);
    return 0;
}

/* tag = Poly1305(key, in[0:len]). Returns 0, or -1 with c->error set (tag is then garbage). */
static int poly1305(crypto_t *c, uint8_t tag[16], const uint8_t *in, size_t len,
                    const uint8_t key[32]) {
    if (c->error != CRYPTO_OK) return -1;
    if (len < c->poly_min) {
        crypto_onetimeauth_poly1305(tag, in, (unsigned long long)len, key);
        return 0;
    }
    if (c->mac == NULL) {
        c->mac = EVP_MAC_CTX_new(c->alg->poly1305);
        if (c->mac == NULL) return crypto_fail(c, CRYPTO_NOMEM);
    }
    size_t n = 0;
    if (EVP_MAC_init(c->mac, key, 32, NULL) != 1 || EVP_MAC_update(c->mac, in, len) != 1 ||
        EVP_MAC_final(c->mac, tag, &n, 16) != 1 || n != 16)
        return crypto_fail(c, CRYPTO_FAILED);
    return 0;
}

/*
 * Seal one packet in place, as packet.seal does: `o` holds 44 + mlen bytes with the
 * messages already at o + 44; this writes LE64(pid ^ mask), both Poly1305 tags and
 * LE32(mlen), then (stream_key not NULL) encrypts bytes 8.. in place. One function for
 * _accel.seal and _fastpath's hop, so the two cannot drift apart. mlen <= 2^32 - 1 and
 * pid != 0 are the caller's to check (inline: _rxbatch.c does not use it, and gcc warns about
 * unused plain statics). The Poly1305 key is wiped before returning. Returns
 * 0, or -1 with c->error set: then bytes 8.. are not a valid datagram (the MAC runs before
 * the cipher, so the messages are intact if the cipher is libsodium-only, i.e.
 * c->chacha_min == SIZE_MAX).
 */
static inline int seal_in_place(crypto_t *c, uint8_t *o, size_t mlen, const uint8_t *stream_key,
                                const uint8_t *mac_seed, uint64_t pid, uint64_t mask) {
    uint8_t pk[32], pid8[8];
    poly_key(mac_seed, pid, pk);
    store64(o, pid ^ mask);
    store64(pid8, pid);
    store32(o + 40, (uint32_t)mlen);
    crypto_onetimeauth_poly1305(o + 8, o + 40, 4, pk);
    int rc = poly1305(c, o + 24, o + 44, mlen, pk);
    sodium_memzero(pk, sizeof pk);
    if (rc == 0 && stream_key != NULL)
        rc = chacha20_xor_ic(c, o + 8, o + 8, 36 + mlen, pid8, 0, stream_key);
    return rc;
}

/* After a failed call, GIL held: the Python exception for c->error. Always NULL. */
static PyObject *crypto_raise(const crypto_t *c) {
    char reason[256] = "no reason given";
    unsigned long e = ERR_get_error();
    if (e != 0) ERR_error_string_n(e, reason, sizeof reason);
    ERR_clear_error();
    if (c->error == CRYPTO_NOMEM) return PyErr_NoMemory();
    PyErr_Format(PyExc_RuntimeError, "OpenSSL ChaCha20/Poly1305 failed: %s", reason);
    return NULL;
}

#endif /* SECUREIOD_CONSTRUCTION_H */
