/*
 * ChaCha20 and Poly1305 per call by input size: libsodium against OpenSSL 3's EVP, best of
 * 7 rounds, ns. It chose the crossovers in secureiod/secureio/_construction.h (from which
 * length the C accelerator hands a call to OpenSSL) and prints README "Crypto backend"'s
 * table. `make bench-crossover` builds it (gcc, libsodium-dev, libssl-dev) and runs it.
 * A benchmark, not a test: the crossovers depend on the CPU (AVX-512 or not).
 */
#include <openssl/evp.h>
#include <sodium.h>
#include <stdio.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static unsigned char key[32] = {1}, buf[70000], tag[16], nonce[8];

#define BEST(expr, n, out)                                     \
    do {                                                       \
        double best_ = 1e9;                                    \
        for (int r = 0; r < 7; r++) {                          \
            double t0 = now();                                 \
            for (int i = 0; i < (n); i++) {                    \
                key[1] = (unsigned char)i;                     \
                expr;                                          \
            }                                                  \
            double d = (now() - t0) / (n) * 1e9;               \
            if (d < best_) best_ = d;                          \
        }                                                      \
        (out) = best_;                                         \
    } while (0)

int main(void) {
    if (sodium_init() < 0) return 1;
    EVP_MAC *mac = EVP_MAC_fetch(NULL, "POLY1305", NULL);
    EVP_CIPHER *chacha = EVP_CIPHER_fetch(NULL, "ChaCha20", NULL);
    if (mac == NULL || chacha == NULL) return 1;
    EVP_MAC_CTX *m = EVP_MAC_CTX_new(mac);
    EVP_CIPHER_CTX *c = EVP_CIPHER_CTX_new();
    unsigned char iv[16] = {0};
    if (m == NULL || c == NULL || EVP_EncryptInit_ex(c, chacha, NULL, key, iv) != 1) return 1;
    const size_t sizes[] = {4, 16, 32, 64, 96, 128, 192, 256, 320, 384, 448, 512, 640, 768,
                            1024, 1437, 4096, 8009, 65536};
    printf("%6s %14s %14s %15s %15s\n", "bytes", "poly1305 sodium", "poly1305 ossl",
           "chacha20 sodium", "chacha20 ossl");
    for (unsigned k = 0; k < sizeof sizes / sizeof *sizes; k++) {
        size_t len = sizes[k];
        int n = len > 8000 ? 3000 : 30000;
        double a, b, cc, d;
        size_t tl;
        int ol;
        BEST(crypto_onetimeauth_poly1305(tag, buf, len, key), n, a);
        BEST((EVP_MAC_init(m, key, 32, NULL), EVP_MAC_update(m, buf, len),
              EVP_MAC_final(m, tag, &tl, 16)),
             n, b);
        BEST(crypto_stream_chacha20_xor_ic(buf, buf, len, nonce, 0, key), n, cc);
        BEST((iv[8] = (unsigned char)i, EVP_EncryptInit_ex(c, NULL, NULL, key, iv),
              EVP_EncryptUpdate(c, buf, &ol, buf, (int)len)),
             n, d);
        printf("%6zu %14.0f %14.0f %15.0f %15.0f\n", len, a, b, cc, d);
    }
    EVP_MAC_CTX_free(m);
    EVP_CIPHER_CTX_free(c);
    EVP_MAC_free(mac);
    EVP_CIPHER_free(chacha);
    return 0;
}
