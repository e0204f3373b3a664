/*
 * secureiod.secureio._accel: the per-packet crypto of secureio in one C call.
 *
 * Why: in Python each packet costs one BLAKE3 call, one ChaCha20 context and two Poly1305
 * calls through `cryptography`, about 11 us to seal and 13 us to open at MTU size, most
 * of it per-call overhead. This module does the same construction (PROTOCOL.md section 4,
 * and packet.py, which stays the reference implementation and the fallback) in one call:
 * ChaCha20 (DJB, 64-bit nonce) and Poly1305 from OpenSSL for long inputs and libsodium
 * for short ones (_construction.h says why and where the crossovers are), BLAKE3 for the
 * 32-byte Poly1305 key input implemented here (a single compression: the input is one
 * block).
 *
 * Tags are compared in constant time (crypto_verify_16). Inputs are hostile: every length
 * is checked before use and nothing is read past the end of a buffer. An OpenSSL failure
 * raises (MemoryError, RuntimeError): it never yields a wrong tag or plaintext.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <sodium.h>
#include <endian.h>
#include <stdint.h>
#include <string.h>

#define HEADER 44
#define HEAD_PLAIN 36

#include "_construction.h"

/* A key argument: None or 32 bytes for the stream key, 24 bytes of mac seed. */
static int parse_key(PyObject *stream, PyObject *seed, const uint8_t **sk, const uint8_t **ms) {
    if (stream == Py_None) {
        *sk = NULL;
    } else if (PyBytes_Check(stream) && PyBytes_GET_SIZE(stream) == 32) {
        *sk = (const uint8_t *)PyBytes_AS_STRING(stream);
    } else {
        PyErr_SetString(PyExc_ValueError, "stream key must be None or 32 bytes");
        return -1;
    }
    if (!PyBytes_Check(seed) || PyBytes_GET_SIZE(seed) != 24) {
        PyErr_SetString(PyExc_ValueError, "mac seed must be 24 bytes");
        return -1;
    }
    *ms = (const uint8_t *)PyBytes_AS_STRING(seed);
    return 0;
}

/* An int in 0..2^64-1, else OverflowError/TypeError ("K" would wrap -1 and 2^64 silently). */
static int get_u64(PyObject *o, unsigned long long *out) {
    if (!PyLong_Check(o)) {
        PyErr_SetString(PyExc_TypeError, "an int is required");
        return -1;
    }
    *out = PyLong_AsUnsignedLongLong(o);
    return (*out == (unsigned long long)-1 && PyErr_Occurred()) ? -1 : 0;
}

/* seal(stream_key | None, mac_seed, packet_id, messages, packet_id_mask) -> bytes */
static PyObject *accel_seal(PyObject *self, PyObject *args) {
    PyObject *stream, *seed, *o_pid, *o_mask;
    unsigned long long pid = 0, mask = 0;
    Py_buffer msg;
    if (!PyArg_ParseTuple(args, "OOOy*O", &stream, &seed, &o_pid, &msg, &o_mask)) return NULL;
    const uint8_t *sk, *ms;
    if (get_u64(o_pid, &pid) < 0 || get_u64(o_mask, &mask) < 0 ||
        parse_key(stream, seed, &sk, &ms) < 0 || pid == 0 || (size_t)msg.len > 0xFFFFFFFFu) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "bad packet id or length");
        PyBuffer_Release(&msg);
        return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, HEADER + msg.len);
    if (out == NULL) {
        PyBuffer_Release(&msg);
        return NULL;
    }
    uint8_t *o = (uint8_t *)PyBytes_AS_STRING(out);
    crypto_t c;
    crypto_init(&c, PyModule_GetState(self), 1);
    memcpy(o + HEADER, msg.buf, msg.len);
    int rc = seal_in_place(&c, o, (size_t)msg.len, sk, ms, pid, mask);
    PyBuffer_Release(&msg);
    crypto_release(&c);
    if (rc < 0) {
        Py_DECREF(out);
        return crypto_raise(&c);
    }
    return out;
}

/*
 * open(data, keys, packet_id_mask) -> (packet_id, key_index, messages) | int
 * keys: a tuple of (stream_key | None, mac_seed) pairs, tried in order.
 * Error codes: 1 malformed (short, packet id 0), 2 no key verifies the header,
 * 3 header verified but the messages tag not, 4 Length disagrees with the datagram.
 */
static PyObject *accel_open(PyObject *self, PyObject *args) {
    Py_buffer data;
    PyObject *keys, *o_mask;
    unsigned long long mask = 0;
    if (!PyArg_ParseTuple(args, "y*O!O", &data, &PyTuple_Type, &keys, &o_mask)) return NULL;
    if (get_u64(o_mask, &mask) < 0) {
        PyBuffer_Release(&data);
        return NULL;
    }
    PyObject *result = NULL;
    crypto_t c;
    crypto_init(&c, PyModule_GetState(self), 1);
    const uint8_t *d = (const uint8_t *)data.buf;
    Py_ssize_t n = data.len;
    if (n < HEADER) { result = PyLong_FromLong(1); goto done; }
    uint64_t pid = load64(d) ^ mask;
    if (pid == 0) { result = PyLong_FromLong(1); goto done; }
    uint8_t pid8[8], pk[32], head[64], tag[16];
    store64(pid8, pid);
    Py_ssize_t nkeys = PyTuple_GET_SIZE(keys);
    Py_ssize_t body_len = n - HEADER;
    for (Py_ssize_t i = 0; i < nkeys; i++) {
        PyObject *pair = PyTuple_GET_ITEM(keys, i);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
            PyErr_SetString(PyExc_TypeError, "keys must be (stream_key, mac_seed) pairs");
            goto done;
        }
        const uint8_t *sk, *ms;
        if (parse_key(PyTuple_GET_ITEM(pair, 0), PyTuple_GET_ITEM(pair, 1), &sk, &ms) < 0) goto done;
        poly_key(ms, pid, pk);
        size_t first = (size_t)(n - 8) < sizeof head ? (size_t)(n - 8) : sizeof head;
        if (sk != NULL) crypto_stream_chacha20_xor_ic(head, d + 8, first, pid8, 0, sk);
        else memcpy(head, d + 8, first);
        crypto_onetimeauth_poly1305(tag, head + 32, 4, pk);
        if (crypto_verify_16(tag, head) != 0) continue;
        PyObject *plain = PyBytes_FromStringAndSize(NULL, n - 8);
        if (plain == NULL) goto done;
        uint8_t *p = (uint8_t *)PyBytes_AS_STRING(plain);
        /* The first block is already in `head`: decrypt only from the second one on. */
        memcpy(p, head, first);
        int rc = 0;
        if (first < (size_t)(n - 8)) {
            if (sk != NULL)
                rc = chacha20_xor_ic(&c, p + sizeof head, d + 8 + sizeof head,
                                     (size_t)(n - 8) - sizeof head, pid8, 1, sk);
            else memcpy(p + sizeof head, d + 8 + sizeof head, (size_t)(n - 8) - sizeof head);
        }
        if (rc == 0) rc = poly1305(&c, tag, p + HEAD_PLAIN, (size_t)body_len, pk);
        if (rc < 0) {
            Py_DECREF(plain);
            crypto_raise(&c);
            goto done;
        }
        if (crypto_verify_16(tag, p + 16) != 0) {
            Py_DECREF(plain);
            result = PyLong_FromLong(3);
            goto done;
        }
        if ((Py_ssize_t)load32(p + 32) != body_len) {
            Py_DECREF(plain);
            result = PyLong_FromLong(4);
            goto done;
        }
        PyObject *body = PyBytes_FromStringAndSize((const char *)p + HEAD_PLAIN, body_len);
        Py_DECREF(plain);
        if (body == NULL) goto done;
        result = Py_BuildValue("KnN", (unsigned long long)pid, i, body);
        goto done;
    }
    result = PyLong_FromLong(2);
done:
    sodium_memzero(pk, sizeof pk);
    sodium_memzero(head, sizeof head);
    crypto_release(&c);
    PyBuffer_Release(&data);
    return result;
}

/*
 * seal_fragments(stream_key | None, mac_seed, first_packet_id, packet_id_mask, msg_type,
 *                payload, chain_id, max_payload) -> (buffer, count, segment_size)
 *
 * Why: a 64 KiB TSO segment is ~48 fragments; sealing them one Python call each (plus
 * fragment_message's slicing and a join for UDP GSO) costs about as much as the crypto.
 * Here the whole message is cut as reassembly.fragment_message cuts it (chunks of
 * E - 24 bytes, flags CONFIDENTIAL|FRAGMENTED, header ChainID || StartPos || Total) and
 * each fragment is sealed as accel_seal seals it, PacketIDs first_packet_id,
 * first_packet_id + 1, ..., back to back in ONE buffer: every datagram segment_size
 * bytes but the last (shorter or equal), which is exactly the UDP GSO layout. The crypto
 * runs with the GIL released: the output is not shared yet and the input buffer is held.
 */
#define FRAG_HEADER 24
#define MSG_HEADER 9
#define FRAG_OVERHEAD (HEADER + MSG_HEADER + FRAG_HEADER) /* 77 */
#define MAX_BATCH_PAYLOAD (1 << 17) /* a TSO segment (64 KiB + vnet header) with room */
#define MAX_BATCH_E 65535
#define JOBS 16 /* fragments encrypted together by chacha16_xor (16 x 1,437 B: 23 KB) */

static PyObject *accel_seal_fragments(PyObject *self, PyObject *args) {
    PyObject *stream, *seed, *o_pid, *o_mask, *o_type, *o_chain;
    unsigned long long pid0, mask, mtype, chain;
    Py_ssize_t e;
    Py_buffer msg;
    if (!PyArg_ParseTuple(args, "OOOOOy*On", &stream, &seed, &o_pid, &o_mask, &o_type, &msg,
                          &o_chain, &e))
        return NULL;
    const uint8_t *sk, *ms;
    if (get_u64(o_pid, &pid0) < 0 || get_u64(o_mask, &mask) < 0 || get_u64(o_type, &mtype) < 0 ||
        get_u64(o_chain, &chain) < 0 || parse_key(stream, seed, &sk, &ms) < 0) {
        PyBuffer_Release(&msg);
        return NULL;
    }
    const char *bad = NULL;
    if (mtype > 0xFFFFFFFFull) bad = "message type must fit 32 bits";
    else if (e <= FRAG_HEADER || e > MAX_BATCH_E) bad = "max_payload must be in 25..65535";
    else if (msg.len <= 0 || msg.len > MAX_BATCH_PAYLOAD) bad = "payload must be 1..131072 bytes";
    if (bad != NULL) {
        PyErr_SetString(PyExc_ValueError, bad);
        PyBuffer_Release(&msg);
        return NULL;
    }
    /* All sizes below are bounded by the checks above: no overflow in size_t. */
    size_t total = (size_t)msg.len, chunk = (size_t)e - FRAG_HEADER;
    size_t count = (total + chunk - 1) / chunk;
    if (pid0 == 0 || pid0 - 1 > 0xFFFFFFFFFFFFFFFFull - count) {
        PyErr_SetString(PyExc_ValueError, "packet ids must stay in 1..2^64-1");
        PyBuffer_Release(&msg);
        return NULL;
    }
    size_t size = count * FRAG_OVERHEAD + total;
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)size);
    if (out == NULL) {
        PyBuffer_Release(&msg);
        return NULL;
    }
    uint8_t *o = (uint8_t *)PyBytes_AS_STRING(out);
    const uint8_t *src = (const uint8_t *)msg.buf;
    uint8_t pid8[8], pks[KEY_LANES][32];
    uint64_t lane_pid[KEY_LANES];
    crypto_t c;
    crypto_init(&c, PyModule_GetState(self), 0);
    /* With chacha16: each fragment is MACed as it is written, and every JOBS fragments are
       encrypted together (while they are still in the cache). */
    int multi = sk != NULL && HAVE_CHACHA16;
    chacha_job_t jobs[JOBS];
    size_t njobs = 0;
    Py_BEGIN_ALLOW_THREADS
    for (size_t i = 0; i < count && c.error == CRYPTO_OK; i++) {
        /* Poly1305 keys KEY_LANES fragments at a time; one by one for a short tail. */
        const uint8_t *pk = pks[i % KEY_LANES];
        if (count - (i - i % KEY_LANES) < 3) {
            poly_key(ms, pid0 + i, pks[0]);
            pk = pks[0];
        } else if (i % KEY_LANES == 0) {
            for (int l = 0; l < KEY_LANES; l++) lane_pid[l] = pid0 + i + (uint64_t)l;
            poly_keys(ms, lane_pid, pks);
        }
        size_t start = i * chunk;
        size_t n = total - start < chunk ? total - start : chunk;
        size_t mlen = MSG_HEADER + FRAG_HEADER + n; /* the messages area: <= 65535 */
        uint64_t pid = pid0 + i;
        uint8_t *m = o + HEADER;
        store32(m, (uint32_t)mtype);
        store32(m + 4, (uint32_t)(FRAG_HEADER + n));
        m[8] = 0x03; /* MESSAGE_FLAG_CONFIDENTIAL | MESSAGE_FLAG_FRAGMENTED */
        store64(m + MSG_HEADER, chain);
        store64(m + MSG_HEADER + 8, (uint64_t)start);
        store64(m + MSG_HEADER + 16, (uint64_t)total);
        memcpy(m + MSG_HEADER + FRAG_HEADER, src + start, n);
        store64(o, pid ^ mask);
        store64(pid8, pid);
        store32(o + 8 + 32, (uint32_t)mlen);
        crypto_onetimeauth_poly1305(o + 8, o + 8 + 32, 4, pk);
        if (poly1305(&c, o + 8 + 16, m, mlen, pk) == 0 && sk != NULL) {
            if (multi) {
                jobs[njobs++] = (chacha_job_t){o + 8, o + 8, HEAD_PLAIN + mlen, pid};
                if (njobs == JOBS || i + 1 == count) {
                    chacha16_xor(sk, jobs, njobs, 0);
                    njobs = 0;
                }
            } else {
                chacha20_xor_ic(&c, o + 8, o + 8, HEAD_PLAIN + mlen, pid8, 0, sk);
            }
        }
        o += HEADER + mlen;
    }
    sodium_memzero(pks, sizeof pks);
    if (multi) sodium_stackzero(CHACHA16_SCRUB);
    crypto_release(&c);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&msg);
    if (c.error != CRYPTO_OK) {
        Py_DECREF(out);
        return crypto_raise(&c);
    }
    size_t segment = count > 1 ? chunk + FRAG_OVERHEAD : size;
    return Py_BuildValue("Nnn", out, (Py_ssize_t)count, (Py_ssize_t)segment);
}

/* split_messages(messages) -> (list[(type, flags, payload bytes)], complete): the
 * message framing of an opened packet (PROTOCOL.md sections 5.1 and 5.4;
 * wire.split_messages is the reference). Why in C: walking the 9-byte headers in a Python
 * generator, a Message object per message, was a fifth of the receiving daemon's CPU per
 * small packet (issue 13: 6.0 -> 4.7 us per 64-byte packet). Hostile input: each header
 * and length is checked against the buffer before use; a truncated header or a length
 * that runs past the end stops the walk with complete=False, after the messages before
 * it. */
static PyObject *accel_split_messages(PyObject *self, PyObject *args) {
    Py_buffer in;
    if (!PyArg_ParseTuple(args, "y*", &in)) return NULL;
    const uint8_t *p = (const uint8_t *)in.buf;
    size_t end = (size_t)in.len, pos = 0;
    int complete = 1;
    PyObject *list = PyList_New(0);
    if (list == NULL) goto fail;
    while (pos < end) {
        if (end - pos < 9) {
            complete = 0;
            break;
        }
        uint32_t mtype, length;
        memcpy(&mtype, p + pos, 4);
        memcpy(&length, p + pos + 4, 4);
        mtype = le32toh(mtype);
        length = le32toh(length);
        uint8_t flags = p[pos + 8];
        size_t start = pos + 9;
        if ((size_t)length > end - start) {
            complete = 0;
            break;
        }
        PyObject *item = Py_BuildValue("(kBy#)", (unsigned long)mtype, flags,
                                       (const char *)p + start, (Py_ssize_t)length);
        if (item == NULL) goto fail;
        int rc = PyList_Append(list, item);
        Py_DECREF(item);
        if (rc < 0) goto fail;
        pos = start + length;
    }
    PyBuffer_Release(&in);
    return Py_BuildValue("(NO)", list, complete ? Py_True : Py_False);
fail:
    Py_XDECREF(list);
    PyBuffer_Release(&in);
    return NULL;
}

/* blake3_32(data) -> bytes: exposed so tests can check the C BLAKE3 against the package. */
static PyObject *accel_blake3_32(PyObject *self, PyObject *args) {
    Py_buffer in;
    if (!PyArg_ParseTuple(args, "y*", &in)) return NULL;
    if (in.len != 32) {
        PyBuffer_Release(&in);
        PyErr_SetString(PyExc_ValueError, "input must be 32 bytes");
        return NULL;
    }
    uint8_t out[32];
    blake3_32((const uint8_t *)in.buf, out);
    PyBuffer_Release(&in);
    return PyBytes_FromStringAndSize((const char *)out, 32);
}

static PyMethodDef methods[] = {
    {"seal", accel_seal, METH_VARARGS, "Seal one packet (see packet.seal)."},
    {"open", accel_open, METH_VARARGS, "Open one datagram (see packet.open_packet)."},
    {"seal_fragments", accel_seal_fragments, METH_VARARGS,
     "Fragment and seal one message into one UDP GSO buffer (see packet.seal_fragments)."},
    {"split_messages", accel_split_messages, METH_VARARGS,
     "Split an opened packet's message area (see wire.split_messages)."},
    {"blake3_32", accel_blake3_32, METH_VARARGS, "BLAKE3-256 of a 32-byte input."},
    {NULL, NULL, 0, NULL},
};

static void module_free(void *m) {
    algorithms_t *alg = PyModule_GetState((PyObject *)m);
    if (alg != NULL) algorithms_free(alg);
}

/* The module state is the fetched OpenSSL algorithms (_construction.h). */
static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_accel", NULL, sizeof(algorithms_t), methods, NULL, NULL, NULL,
    module_free};

PyMODINIT_FUNC PyInit__accel(void) { return construction_module(&module); }
