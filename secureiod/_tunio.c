/*
 * secureiod._tunio: read and write many TUN packets in one call.
 *
 * Why: a small packet costs a few hundred nanoseconds in the kernel but several
 * microseconds of Python around it when every read and write is its own call (os.readv,
 * the BlockingIOError that ends every batch, os.writev and its result). Here a whole batch
 * is one call: the reads run with the GIL released into one scratch arena (up to CHUNK
 * packets per release), the writes of a batch all run in one release.
 *
 * This module decides nothing about the errors it meets: it reports the errno and tun.py
 * keeps the accounting (counters, rate-limited logs, TunError for a dead descriptor).
 * secureiod/tunio.py holds the pure-Python twin that defines the behaviour; the tests
 * check that both give the same results on a real TUN device.
 *
 * Inputs are hostile: max_packets, bufsize, the header and the number of packets are
 * bounded, every buffer is taken through the buffer protocol with its own length, and a
 * packet the kernel reports longer than the buffer is cut to the buffer.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

/* Bounds shared with tunio.py (MAX_PACKETS, MAX_BUFSIZE, MAX_HEADER). */
#define MAX_PACKETS 65536
#define MAX_BUFSIZE (1 << 20)
#define MAX_HEADER 256
/* Packets read per GIL release, and the arena room beyond one full buffer: small packets
 * share the arena, a full-size one still always fits (the arena is bufsize + SLACK). */
#define CHUNK 64
#define SLACK (32 * 1024)

static int is_fatal(int code) { return code == EBADF || code == EBADFD; }

static PyObject *tunio_read_many(PyObject *self, PyObject *args) {
    int fd;
    Py_ssize_t max_packets, bufsize;
    if (!PyArg_ParseTuple(args, "inn:read_many", &fd, &max_packets, &bufsize))
        return NULL;
    if (max_packets < 0 || max_packets > MAX_PACKETS) {
        PyErr_Format(PyExc_ValueError, "max_packets must be 0..%d", MAX_PACKETS);
        return NULL;
    }
    if (bufsize < 1 || bufsize > MAX_BUFSIZE) {
        PyErr_Format(PyExc_ValueError, "bufsize must be 1..%d", MAX_BUFSIZE);
        return NULL;
    }
    PyObject *out = PyList_New(0);
    if (out == NULL)
        return NULL;
    if (max_packets == 0)
        return Py_BuildValue("(Nni)", out, (Py_ssize_t)0, 0);
    size_t arena_size = (size_t)bufsize + SLACK;
    char *arena = PyMem_RawMalloc(arena_size);
    if (arena == NULL) {
        Py_DECREF(out);
        return PyErr_NoMemory();
    }
    Py_ssize_t total = 0, count = 0;
    int err = 0;
    for (;;) {
        size_t offs[CHUNK], lens[CHUNK];
        int got = 0, interrupted = 0, dry = 0;
        size_t off = 0;
        Py_ssize_t want = max_packets - count;
        if (want > CHUNK)
            want = CHUNK;
        Py_BEGIN_ALLOW_THREADS
        while (got < want && off + (size_t)bufsize <= arena_size) {
            ssize_t n = read(fd, arena + off, (size_t)bufsize);
            if (n < 0) {
                if (errno == EINTR)
                    interrupted = 1;
                else if (errno == EAGAIN || errno == EWOULDBLOCK)
                    dry = 1;
                else
                    err = errno;
                break;
            }
            size_t len = (size_t)n < (size_t)bufsize ? (size_t)n : (size_t)bufsize;
            offs[got] = off;
            lens[got] = len;
            got++;
            off += len;
        }
        Py_END_ALLOW_THREADS
        for (int i = 0; i < got; i++) {
            PyObject *packet = PyBytes_FromStringAndSize(arena + offs[i], (Py_ssize_t)lens[i]);
            if (packet == NULL || PyList_Append(out, packet) < 0) {
                Py_XDECREF(packet);
                goto fail;
            }
            Py_DECREF(packet);
            total += (Py_ssize_t)lens[i];
        }
        count += got;
        /* A signal during read: run its handlers (they may raise) and go on, as os.readv
         * does (PEP 475). */
        if (interrupted && PyErr_CheckSignals() < 0)
            goto fail;
        if (dry || err || count >= max_packets)
            break;
    }
    PyMem_RawFree(arena);
    return Py_BuildValue("(Nni)", out, total, err);
fail:
    PyMem_RawFree(arena);
    Py_DECREF(out);
    return NULL;
}

static PyObject *tunio_write_many(PyObject *self, PyObject *args) {
    int fd;
    Py_buffer header;
    PyObject *packets;
    if (!PyArg_ParseTuple(args, "iy*O:write_many", &fd, &header, &packets))
        return NULL;
    PyObject *seq = NULL, *result = NULL;
    Py_buffer *views = NULL;
    int *errs = NULL;
    Py_ssize_t held = 0;
    if (header.len > MAX_HEADER) {
        PyErr_Format(PyExc_ValueError, "header must be at most %d bytes", MAX_HEADER);
        goto done;
    }
    seq = PySequence_Fast(packets, "packets must be a sequence of buffers");
    if (seq == NULL)
        goto done;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > MAX_PACKETS) {
        PyErr_Format(PyExc_ValueError, "at most %d packets per call", MAX_PACKETS);
        goto done;
    }
    if (n == 0) {
        result = Py_BuildValue("(nnN)", (Py_ssize_t)0, (Py_ssize_t)0, PyList_New(0));
        goto done;
    }
    views = PyMem_Calloc((size_t)n, sizeof(Py_buffer));
    errs = PyMem_Calloc((size_t)n, sizeof(int));
    if (views == NULL || errs == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    /* Every buffer is exported before the GIL goes, so none can move or shrink while the
     * kernel reads it. */
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (; held < n; held++)
        if (PyObject_GetBuffer(items[held], &views[held], PyBUF_SIMPLE) < 0)
            goto done;
    Py_ssize_t written = 0, nbytes = 0, done_count = 0;
    int interrupted;
    do {
        interrupted = 0;
        Py_BEGIN_ALLOW_THREADS
        struct iovec iov[2];
        iov[0].iov_base = header.buf;
        iov[0].iov_len = (size_t)header.len;
        for (; done_count < n; done_count++) {
            ssize_t r;
            /* Without a header, write() as os.write does: writev() of nothing returns 0
             * without asking the device, write() of nothing is refused (EINVAL). */
            if (header.len == 0) {
                r = write(fd, views[done_count].buf, (size_t)views[done_count].len);
            } else {
                iov[1].iov_base = views[done_count].buf;
                iov[1].iov_len = (size_t)views[done_count].len;
                r = writev(fd, iov, 2);
            }
            if (r < 0) {
                if (errno == EINTR) {
                    interrupted = 1;
                    break;
                }
                errs[done_count] = errno;
                if (is_fatal(errno)) {
                    done_count++;
                    break;
                }
                continue;
            }
            written++;
            nbytes += r;
        }
        Py_END_ALLOW_THREADS
        if (interrupted && PyErr_CheckSignals() < 0)
            goto done;
    } while (interrupted);
    /* (index, errno) of every refused packet, in order; a fatal one ends the list (and
     * the batch: the packets after it were not tried). */
    PyObject *errors = PyList_New(0);
    if (errors == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < done_count; i++) {
        if (errs[i] == 0)
            continue;
        PyObject *code = Py_BuildValue("(ni)", i, errs[i]);
        if (code == NULL || PyList_Append(errors, code) < 0) {
            Py_XDECREF(code);
            Py_DECREF(errors);
            goto done;
        }
        Py_DECREF(code);
    }
    result = Py_BuildValue("(nnN)", written, nbytes, errors);
done:
    for (Py_ssize_t i = 0; i < held; i++)
        PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    PyMem_Free(errs);
    Py_XDECREF(seq);
    PyBuffer_Release(&header);
    return result;
}

static PyMethodDef methods[] = {
    {"read_many", tunio_read_many, METH_VARARGS,
     "read_many(fd, max_packets, bufsize) -> (packets, total_bytes, errno_or_0)"},
    {"write_many", tunio_write_many, METH_VARARGS,
     "write_many(fd, header, packets) -> (written, bytes_written, [(index, errno) refused])"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_tunio", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__tunio(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "MAX_PACKETS", MAX_PACKETS) < 0 ||
        PyModule_AddIntConstant(m, "MAX_BUFSIZE", MAX_BUFSIZE) < 0 ||
        PyModule_AddIntConstant(m, "MAX_HEADER", MAX_HEADER) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
