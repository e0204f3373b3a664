/*
 * secureiod.secureio._rxbatch: open a run of received datagrams (one UDP GRO read) in one call.
 *
 * Why: a GRO read hands over up to ~45 datagrams of one sender, and a bulk TCP flow sends
 * them as the fragments of one 64 KiB message. Opening them one by one costs a C call and
 * several microseconds of Python each (header checks, replay window, message parsing,
 * copying each fragment into the chain's buffer); the crypto is a small part of it. Here
 * the whole run is opened with the GIL released, and consecutive fragments of one chain
 * (consecutive PacketIDs, one key, contiguous chunks) are joined into one buffer, so the
 * session does its bookkeeping once per chain piece instead of once per datagram.
 *
 * This module decides nothing: it only reports what each datagram is. The replay window,
 * key-slot rules, fragment rules, counters and path validation stay in session.py,
 * replay.py and reassembly.py, which use these results as if the datagrams had been fed
 * one by one (tests/test_rx_batch.py checks that, with packet.py as the reference).
 *
 * The construction is _accel.c's (PROTOCOL.md section 4): the BLAKE3 single-block hash,
 * the key derivation and the choice between OpenSSL and libsodium for ChaCha20 and
 * Poly1305 are shared with it in _construction.h; tests check both against the Python code.
 *
 * Inputs are hostile: every length is checked before use, nothing is read past the end
 * of the buffer, allocation is bounded by the buffer's size, and bad data never raises.
 * Only a failure inside OpenSSL raises (MemoryError, RuntimeError), for the whole run:
 * nothing is reported from a run whose crypto did not run to the end.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <sodium.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define HEADER 44
#define HEAD_PLAIN 36
#define MSG_HEADER 9
#define FRAG_HEADER 24
#define FLAG_FRAGMENTED 0x02
#define MAX_KEYS 16
#define MAX_RUN (4 << 20)    /* far above any datagram run a socket returns (64 KiB) */
#define MAX_SEGMENTS 4096    /* UDP GRO coalesces at most 64 */
#define JOBS 16              /* datagram bodies decrypted together by chacha16_xor */

#include "_construction.h"

/* What one datagram of the run turned out to be. */
typedef struct {
    int status;           /* 0 opened; else _accel.open's codes 1..4 */
    int key_index;
    int fragment;         /* exactly one fragment message with a valid, non-empty chunk */
    uint32_t mtype;
    uint64_t pid, chain_id, start, total;
    Py_ssize_t off, len;  /* the datagram within the run */
    Py_ssize_t chunk_len; /* the chunk sits at plain + off + HEADER + MSG_HEADER + FRAG_HEADER */
} segment_t;

typedef struct {
    const uint8_t *stream[MAX_KEYS]; /* NULL: a CLEAR key (no encryption) */
    const uint8_t *seed[MAX_KEYS];
    Py_ssize_t count;
} keys_t;

static int parse_keys(PyObject *keys, keys_t *out) {
    Py_ssize_t n = PyTuple_GET_SIZE(keys);
    if (n > MAX_KEYS) {
        PyErr_SetString(PyExc_ValueError, "too many keys");
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *pair = PyTuple_GET_ITEM(keys, i);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
            PyErr_SetString(PyExc_TypeError, "keys must be (stream_key, mac_seed) pairs");
            return -1;
        }
        PyObject *stream = PyTuple_GET_ITEM(pair, 0), *seed = PyTuple_GET_ITEM(pair, 1);
        if (stream == Py_None) {
            out->stream[i] = NULL;
        } else if (PyBytes_Check(stream) && PyBytes_GET_SIZE(stream) == 32) {
            out->stream[i] = (const uint8_t *)PyBytes_AS_STRING(stream);
        } else {
            PyErr_SetString(PyExc_ValueError, "stream key must be None or 32 bytes");
            return -1;
        }
        if (!PyBytes_Check(seed) || PyBytes_GET_SIZE(seed) != 24) {
            PyErr_SetString(PyExc_ValueError, "mac seed must be 24 bytes");
            return -1;
        }
        out->seed[i] = (const uint8_t *)PyBytes_AS_STRING(seed);
    }
    out->count = n;
    return 0;
}

/*
 * Open d[0:n] (one datagram) into plain[8:n] (plain has room for n bytes), exactly as
 * _accel.open and packet.open_python do: the first key whose header tag verifies decides.
 * Needs no Python object: runs without the GIL. An OpenSSL failure is left in c->error
 * (the caller then discards the whole run). pk0: the first key's Poly1305 key for this
 * datagram's PacketID, computed already (or NULL).
 *
 * In three steps: open_head finds the key and decrypts the first block, open_body the
 * rest, open_tail checks the payload's tag and reads the fragment header. With AVX-512,
 * open_group does the first two for sixteen datagrams at a time and shares open_tail.
 */

/* Returns the index of the key whose header tag verifies, with its Poly1305 key in pk and
 * the first block in plain + 8; or -1 with seg->status set (1 malformed, 2 no key). */
static int open_head(const uint8_t *d, Py_ssize_t n, const keys_t *keys, uint64_t mask,
                     uint8_t *plain, segment_t *seg, const uint8_t *pk0, uint8_t pk[32]) {
    seg->fragment = 0;
    if (n < HEADER) { seg->status = 1; return -1; }
    uint64_t pid = load64(d) ^ mask;
    if (pid == 0) { seg->status = 1; return -1; }
    seg->pid = pid;
    uint8_t pid8[8], head[64], tag[16];
    store64(pid8, pid);
    seg->status = 2;
    size_t first = (size_t)(n - 8) < sizeof head ? (size_t)(n - 8) : sizeof head;
    for (Py_ssize_t i = 0; i < keys->count; i++) {
        const uint8_t *sk = keys->stream[i];
        if (i == 0 && pk0 != NULL) memcpy(pk, pk0, 32);
        else poly_key(keys->seed[i], pid, pk);
        if (sk != NULL) crypto_stream_chacha20_xor_ic(head, d + 8, first, pid8, 0, sk);
        else memcpy(head, d + 8, first);
        crypto_onetimeauth_poly1305(tag, head + 32, 4, pk);
        if (crypto_verify_16(tag, head) != 0) continue;
        memcpy(plain + 8, head, first);
        sodium_memzero(head, sizeof head);
        return (int)i;
    }
    sodium_memzero(head, sizeof head);
    return -1;
}

/* The bytes after the first block, decrypted (or copied, under a CLEAR key). */
static int open_body(const uint8_t *d, Py_ssize_t n, const uint8_t *sk, uint8_t *plain,
                     uint64_t pid, crypto_t *c) {
    if ((size_t)(n - 8) <= 64) return 0;
    uint8_t *p = plain + 8 + 64;
    size_t rest = (size_t)(n - 8) - 64;
    if (sk == NULL) {
        memcpy(p, d + 8 + 64, rest);
        return 0;
    }
    uint8_t pid8[8];
    store64(pid8, pid);
    return chacha20_xor_ic(c, p, d + 8 + 64, rest, pid8, 1, sk);
}

/* The payload's tag and Length checked, the fragment header read: seg->status 0, 3 or 4. */
static void open_tail(Py_ssize_t n, uint8_t *plain, segment_t *seg, crypto_t *c, int key,
                      const uint8_t pk[32]) {
    Py_ssize_t body_len = n - HEADER;
    uint8_t tag[16];
    uint8_t *p = plain + 8;
    if (poly1305(c, tag, p + HEAD_PLAIN, (size_t)body_len, pk) < 0) return;
    if (crypto_verify_16(tag, p + 16) != 0) { seg->status = 3; return; }
    if ((Py_ssize_t)load32(p + 32) != body_len) { seg->status = 4; return; }
    seg->status = 0;
    seg->key_index = key;
    /* One fragment message filling the packet, with a chunk the fragment rules allow
       to be joined (non-empty, inside TotalMessageLength): anything else the session
       handles datagram by datagram. */
    const uint8_t *m = p + HEAD_PLAIN;
    if (body_len >= MSG_HEADER + FRAG_HEADER) {
        uint32_t length = load32(m + 4);
        uint8_t flags = m[8];
        if ((flags & FLAG_FRAGMENTED) && (Py_ssize_t)length + MSG_HEADER == body_len) {
            uint64_t total = load64(m + MSG_HEADER + 16);
            uint64_t start = load64(m + MSG_HEADER + 8);
            uint64_t chunk = (uint64_t)length - FRAG_HEADER;
            if (chunk > 0 && total > 0 && start <= total && chunk <= total - start) {
                seg->fragment = 1;
                seg->mtype = load32(m);
                seg->chain_id = load64(m + MSG_HEADER);
                seg->start = start;
                seg->total = total;
                seg->chunk_len = (Py_ssize_t)chunk;
            }
        }
    }
}

static void open_one(const uint8_t *d, Py_ssize_t n, const keys_t *keys, uint64_t mask,
                     uint8_t *plain, segment_t *seg, crypto_t *c, const uint8_t *pk0) {
    uint8_t pk[32];
    int key = open_head(d, n, keys, mask, plain, seg, pk0, pk);
    if (key >= 0 && open_body(d, n, keys->stream[key], plain, seg->pid, c) == 0)
        open_tail(n, plain, seg, c, key, pk);
    sodium_memzero(pk, sizeof pk);
}

/*
 * The AVX-512 path of open_one for up to JOBS datagrams of a run (segs[in_group[q]]), whose
 * first blocks jobs[q] (into heads[q]) are to be decrypted under the first key, with
 * group_pk[q] that key's Poly1305 key for each: the first blocks together, then the bodies
 * of those whose header tag verified under the first key, together too; every other
 * datagram goes to open_one, which tries each key as before. Same results as open_one.
 */
static void open_group(const uint8_t *d, segment_t *segs, uint8_t *plain, const keys_t *keys,
                       uint64_t mask, crypto_t *c, chacha_job_t *jobs, uint8_t (*heads)[64],
                       uint8_t (*group_pk)[32], const Py_ssize_t *in_group, int count) {
    const uint8_t *sk = keys->stream[0];
    chacha16_xor(sk, jobs, (size_t)count, 0);
    int bodies[JOBS], nb = 0;
    for (int q = 0; q < count && c->error == CRYPTO_OK; q++) {
        segment_t *s = &segs[in_group[q]];
        uint8_t tag[16];
        crypto_onetimeauth_poly1305(tag, heads[q] + 32, 4, group_pk[q]);
        if (crypto_verify_16(tag, heads[q]) != 0) {
            open_one(d + s->off, s->len, keys, mask, plain + s->off, s, c, group_pk[q]);
            continue;
        }
        memcpy(plain + s->off + 8, heads[q], jobs[q].len);
        if ((size_t)(s->len - 8) <= 64) {
            open_tail(s->len, plain + s->off, s, c, 0, group_pk[q]);
            continue;
        }
        jobs[nb] = (chacha_job_t){plain + s->off + 8 + 64, d + s->off + 8 + 64,
                                  (size_t)(s->len - 8 - 64), s->pid};
        bodies[nb++] = q;
    }
    if (c->error != CRYPTO_OK) return;
    chacha16_xor(sk, jobs, (size_t)nb, 1);
    for (int b = 0; b < nb && c->error == CRYPTO_OK; b++) {
        int q = bodies[b];
        segment_t *s = &segs[in_group[q]];
        open_tail(s->len, plain + s->off, s, c, 0, group_pk[q]);
    }
}

static int joins(const segment_t *prev, const segment_t *s) {
    return s->status == 0 && s->fragment && s->key_index == prev->key_index &&
           prev->pid != UINT64_MAX && s->pid == prev->pid + 1 && s->mtype == prev->mtype &&
           s->chain_id == prev->chain_id && s->total == prev->total &&
           s->start == prev->start + (uint64_t)prev->chunk_len;
}

/*
 * open_run(data, segment_size, keys, packet_id_mask) -> list of groups, in datagram order:
 *   int i                        datagram i did not open (the caller feeds it the usual way)
 *   (i, key_index, pid, msgs)    datagram i opened; msgs: its plaintext message area
 *   (i, count, key_index, first_pid, type, chain_id, total, start, chunks, wire_bytes)
 *                                datagrams i..i+count-1 opened under one key with
 *                                consecutive PacketIDs, each one fragment of chain_id, the
 *                                chunks contiguous from `start`: `chunks` is them joined.
 * Datagram k is data[k*segment_size : (k+1)*segment_size] (the last may be shorter).
 */
static PyObject *rx_open_run(PyObject *self, PyObject *args) {
    Py_buffer data;
    Py_ssize_t seg_size;
    PyObject *keys_obj, *o_mask;
    unsigned long long mask;
    if (!PyArg_ParseTuple(args, "y*nO!O", &data, &seg_size, &PyTuple_Type, &keys_obj, &o_mask))
        return NULL;
    /* As _accel: "K" would wrap -1 or 2^64 + x into a different mask without a word. */
    if (!PyLong_Check(o_mask)) {
        PyErr_SetString(PyExc_TypeError, "packet_id_mask must be an int");
        PyBuffer_Release(&data);
        return NULL;
    }
    mask = PyLong_AsUnsignedLongLong(o_mask);
    if (mask == (unsigned long long)-1 && PyErr_Occurred()) {
        PyBuffer_Release(&data);
        return NULL;
    }
    PyObject *out = NULL;
    segment_t *segs = NULL;
    uint8_t *plain = NULL;
    keys_t keys;
    Py_ssize_t n = data.len;
    if (seg_size <= 0 || n > MAX_RUN) {
        PyErr_SetString(PyExc_ValueError, "segment size must be positive and the run at most 4 MiB");
        goto done;
    }
    if (parse_keys(keys_obj, &keys) < 0) goto done;
    Py_ssize_t nseg = n == 0 ? 0 : 1 + (n - 1) / seg_size;
    if (nseg > MAX_SEGMENTS) {
        PyErr_SetString(PyExc_ValueError, "a run of more than 4096 datagrams");
        goto done;
    }
    out = PyList_New(0);
    if (out == NULL || nseg == 0) goto done;
    segs = PyMem_RawCalloc((size_t)nseg, sizeof *segs);
    plain = PyMem_RawMalloc((size_t)n);
    if (segs == NULL || plain == NULL) {
        Py_CLEAR(out);
        PyErr_NoMemory();
        goto done;
    }
    const uint8_t *d = (const uint8_t *)data.buf;
    crypto_t c;
    crypto_init(&c, PyModule_GetState(self), 0);
    uint8_t pks[KEY_LANES][32];
    uint64_t lane_pid[KEY_LANES];
    /* With chacha16 and an encrypting first key: bodies decrypted JOBS at a time. */
    int multi = HAVE_CHACHA16 && keys.count > 0 && keys.stream[0] != NULL;
    chacha_job_t jobs[JOBS];
    Py_ssize_t in_group[JOBS];
    uint8_t group_pk[JOBS][32], heads[JOBS][64];
    int nh = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t k = 0; k < nseg && c.error == CRYPTO_OK; k++) {
        segment_t *s = &segs[k];
        s->off = k * seg_size;
        s->len = n - s->off < seg_size ? n - s->off : seg_size;
        /* The first key's Poly1305 keys KEY_LANES datagrams at a time (most datagrams open
           under it); one by one for a short tail. A lane whose datagram is too short to
           have a PacketID computes a key nobody uses. */
        const uint8_t *pk0 = NULL;
        Py_ssize_t block = k - k % KEY_LANES;
        if (keys.count > 0 && nseg - block >= 3) {
            if (k == block) {
                for (int l = 0; l < KEY_LANES; l++) {
                    Py_ssize_t off = block + l < nseg ? (block + l) * seg_size : n;
                    lane_pid[l] = n - off >= HEADER ? load64(d + off) ^ (uint64_t)mask : 0;
                }
                poly_keys(keys.seed[0], lane_pid, pks);
            }
            pk0 = pks[k - block];
        }
        if (!multi) {
            open_one(d + s->off, s->len, &keys, (uint64_t)mask, plain + s->off, s, &c, pk0);
            continue;
        }
        /* The first block waits to be decrypted with the group's others under the first key
           (open_head's work, sixteen at a time). */
        s->fragment = 0;
        s->status = 1;
        if (s->len < HEADER) goto next;
        uint64_t pid = load64(d + s->off) ^ (uint64_t)mask;
        if (pid == 0) goto next;
        s->pid = pid;
        s->status = 2;
        if (pk0 != NULL) memcpy(group_pk[nh], pk0, 32);
        else poly_key(keys.seed[0], pid, group_pk[nh]);
        size_t first = (size_t)(s->len - 8) < 64 ? (size_t)(s->len - 8) : 64;
        jobs[nh] = (chacha_job_t){heads[nh], d + s->off + 8, first, pid};
        in_group[nh++] = k;
    next:
        if (nh == JOBS || (k + 1 == nseg && nh > 0)) {
            open_group(d, segs, plain, &keys, (uint64_t)mask, &c, jobs, heads, group_pk,
                       in_group, nh);
            nh = 0;
        }
    }
    sodium_memzero(pks, sizeof pks);
    sodium_memzero(group_pk, sizeof group_pk);
    sodium_memzero(heads, sizeof heads);
    if (multi) sodium_stackzero(CHACHA16_SCRUB);
    crypto_release(&c);
    Py_END_ALLOW_THREADS
    if (c.error != CRYPTO_OK) {
        Py_CLEAR(out);
        crypto_raise(&c);
        goto done;
    }

    for (Py_ssize_t i = 0; i < nseg;) {
        segment_t *s = &segs[i];
        PyObject *group;
        if (s->status != 0) {
            /* (i, 1): malformed (short, PacketID 0, Length disagrees); (i, 2): no key's tag
             * verifies. The session counts it from this, without opening it again. */
            group = Py_BuildValue("(ni)", i, (s->status == 1 || s->status == 4) ? 1 : 2);
            i++;
        } else if (!s->fragment) {
            group = Py_BuildValue(
                "niKy#", i, s->key_index, (unsigned long long)s->pid,
                (const char *)plain + s->off + HEADER, s->len - HEADER);
            i++;
        } else {
            Py_ssize_t j = i + 1, joined = s->chunk_len, wire = s->len;
            while (j < nseg && joins(&segs[j - 1], &segs[j])) {
                joined += segs[j].chunk_len;
                wire += segs[j].len;
                j++;
            }
            PyObject *chunks = PyBytes_FromStringAndSize(NULL, joined);
            if (chunks == NULL) { Py_CLEAR(out); goto done; }
            uint8_t *c = (uint8_t *)PyBytes_AS_STRING(chunks);
            for (Py_ssize_t k = i; k < j; k++) {
                memcpy(c, plain + segs[k].off + HEADER + MSG_HEADER + FRAG_HEADER,
                       (size_t)segs[k].chunk_len);
                c += segs[k].chunk_len;
            }
            group = Py_BuildValue(
                "nniKkKKKNn", i, j - i, s->key_index, (unsigned long long)s->pid,
                (unsigned long)s->mtype, (unsigned long long)s->chain_id,
                (unsigned long long)s->total, (unsigned long long)s->start, chunks, wire);
            i = j;
        }
        if (group == NULL || PyList_Append(out, group) < 0) {
            Py_XDECREF(group);
            Py_CLEAR(out);
            goto done;
        }
        Py_DECREF(group);
    }
done:
    PyMem_RawFree(plain); /* plaintext, handed on anyway: not cleared, unlike keys */
    PyMem_RawFree(segs);
    PyBuffer_Release(&data);
    return out;
}

static PyMethodDef methods[] = {
    {"open_run", rx_open_run, METH_VARARGS, "Open a run of equal-size datagrams (see rxbatch.py)."},
    {NULL, NULL, 0, NULL},
};

static void module_free(void *m) {
    algorithms_t *alg = PyModule_GetState((PyObject *)m);
    if (alg != NULL) algorithms_free(alg);
}

/* The module state is the fetched OpenSSL algorithms (_construction.h). */
static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_rxbatch", NULL, sizeof(algorithms_t), methods, NULL, NULL, NULL,
    module_free};

PyMODINIT_FUNC PyInit__rxbatch(void) { return construction_module(&module); }
