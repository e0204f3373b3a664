/*
 * The secureio packet construction's key derivation, shared by _accel.c and _rxbatch.c
 * (PROTOCOL.md section 4): the Poly1305 one-time key is BLAKE3-256 of
 * LE64(PacketID ^ "github.c") || mac_seed, 32 bytes, so one BLAKE3 compression.
 * Header-only (static functions): each extension module is its own translation unit and
 * sets POLY_XOR_PID in its init function. packet.py stays the reference; tests check both
 * modules against it.
 */
#ifndef SECUREIOD_CONSTRUCTION_H
#define SECUREIOD_CONSTRUCTION_H

#include <sodium.h>
#include <stdint.h>
#include <string.h>

static const uint32_t B3_IV[8] = {0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A,
                                  0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19};
static const uint8_t B3_PERM[16] = {2, 6, 3, 10, 7, 0, 4, 13, 1, 11, 12, 5, 9, 14, 15, 8};
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

/* BLAKE3-256 of exactly 32 bytes: one chunk, one block, root output. */
static void blake3_32(const uint8_t in[32], uint8_t out[32]) {
    uint32_t m[16], t[16], s[16];
    for (int i = 0; i < 8; i++) m[i] = load32(in + 4 * i);
    for (int i = 8; i < 16; i++) m[i] = 0;
    for (int i = 0; i < 8; i++) s[i] = B3_IV[i];
    s[8] = B3_IV[0]; s[9] = B3_IV[1]; s[10] = B3_IV[2]; s[11] = B3_IV[3];
    s[12] = 0; s[13] = 0; s[14] = 32; s[15] = 1 | 2 | 8; /* CHUNK_START|CHUNK_END|ROOT */
    for (int r = 0; r < 7; r++) {
        G(0, 4, 8, 12, m[0], m[1]);
        G(1, 5, 9, 13, m[2], m[3]);
        G(2, 6, 10, 14, m[4], m[5]);
        G(3, 7, 11, 15, m[6], m[7]);
        G(0, 5, 10, 15, m[8], m[9]);
        G(1, 6, 11, 12, m[10], m[11]);
        G(2, 7, 8, 13, m[12], m[13]);
        G(3, 4, 9, 14, m[14], m[15]);
        for (int i = 0; i < 16; i++) t[i] = m[B3_PERM[i]];
        memcpy(m, t, sizeof m);
    }
    for (int i = 0; i < 8; i++) store32(out + 4 * i, s[i] ^ s[i + 8]);
    sodium_memzero(m, sizeof m);
    sodium_memzero(t, sizeof t);
    sodium_memzero(s, sizeof s);
}

static void poly_key(const uint8_t *mac_seed, uint64_t pid, uint8_t out[32]) {
    uint8_t in[32];
    store64(in, pid ^ POLY_XOR_PID);
    memcpy(in + 8, mac_seed, 24);
    blake3_32(in, out);
    sodium_memzero(in, sizeof in);
}

#endif /* SECUREIOD_CONSTRUCTION_H */
