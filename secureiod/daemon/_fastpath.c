/*
 * secureiod.daemon._fastpath: the lone packet's hop inside the event loop's wait, TUN to
 * UDP and UDP to TUN, without returning to Python (daemon/lone.py says why and how it is
 * armed; README "How the daemon is built").
 *
 * Why: a ping's wake-up in the daemon that reads it from TUN cost ~275 us, of which only
 * ~90 us were the read and sendto system calls: the rest was Python running with cold
 * caches after the process slept (issue 13; the receiving daemon's wake-up was the same).
 * Only C that does the whole hop between two epoll_waits removes that. So FastPath.wait is
 * select.epoll.poll plus this:
 *
 * The send hop: when the one ready descriptor is the TUN and its packet is routed to an
 * armed Lane, the packet is sealed as packet.seal seals it and sent. With a receive lane
 * armed the wait then goes on for a while (the answer is on its way back); otherwise it
 * returns.
 *
 * The receive hop: when the one ready descriptor is the UDP socket and its datagram comes
 * from a peer armed for receive, it is opened as _accel.open opens it, checked (PacketID
 * above the window, exactly one message of the armed type and flags, a consistent IP
 * packet whose source routes back to the same peer) and written to the TUN. With a send
 * lane armed the wait then goes on (the answer is about to come from the TUN); otherwise
 * it returns.
 *
 * Everything else is returned to Python untouched, or "handed back" (take_pending,
 * take_pending_datagram) when the hop already read it: nothing read is ever lost, and a
 * datagram is handed back byte for byte as it arrived, for Session.receive_datagram to
 * judge.
 *
 * Python decides everything that needs state: it arms a Lane per peer with one reserved
 * PacketID and the session's keys (send), or with the receive keys and the replay
 * window's latest PacketID (receive); the hop spends an arm per packet and records the
 * result for Python to account for (take_used, Lane.take_result,
 * Lane.take_receive_result). Routes are an exact address cache, bounded, filled by Python
 * from its routing decisions; the receive hop uses it for the inner-source check.
 *
 * Inputs from the TUN and the network are hostile as far as this module is concerned:
 * every length is checked before use, a packet that is not plainly routable is handed
 * back, and nothing reaches the TUN that did not pass every check.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <netinet/in.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

/* The header serves three modules; this one uses neither the batch keys nor crypto_raise. */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#include "../secureio/_construction.h"
#pragma GCC diagnostic pop

#define HEADER 44     /* secureio container header */
#define MSG_HEADER 9  /* struct "<IIB": type, length, flags */
#define VNET_HDR 10   /* struct virtio_net_hdr */
#define IP_MAX 65535  /* as much as tun.read_batch reads after the vnet header */
#define HOP_BUF (HEADER + MSG_HEADER + IP_MAX)
#define ROUTE_CACHE_MAX 256
#define ROUTE_SLOTS 512 /* a power of two, twice the bound: probe runs stay short */
#define MAX_EVENTS (INT_MAX / (int)sizeof(struct epoll_event))
#define RX_MAX 1024        /* lanes armed for receive per FastPath */
#define RX_KEYS 4          /* keys one receive arm may try */
#define RX_BUF (IP_MAX + 64) /* a UDP read: any datagram (<= 65535) with room */
#define SA_KEY 28          /* a normalised sockaddr_in (16) or sockaddr_in6 (28) */
#ifndef SOL_UDP
#define SOL_UDP 17
#endif
#ifndef UDP_GRO
#define UDP_GRO 104
#endif

/* Module state: the OpenSSL algorithms first (construction_module fetches into them). */
typedef struct {
    algorithms_t alg;
    PyTypeObject *lane_type; /* strong; for FastPath.route's type check */
    Py_ssize_t armed_lanes;  /* Lanes of this module now armed: the hop reads only if > 0 */
} module_state;

/* ---------------------------------------------------------------------------------------- */
/* Lane                                                                                     */

enum { LANE_IDLE = 0, LANE_ARMED = 1, LANE_USED = 2 };

struct FastPath;

typedef struct {
    PyObject_HEAD
    module_state *st;
    int state;
    int queued;          /* on a FastPath's used list, not yet taken */
    PyObject *stream_key; /* bytes (32) or NULL: CLEAR; only while armed */
    PyObject *mac_seed;  /* bytes (24); only while armed */
    uint64_t packet_id, mask;
    uint32_t message_type, max_payload;
    uint8_t flags;
    socklen_t salen;
    struct sockaddr_storage sa;
    /* The result of the hop that used the lane (state LANE_USED). */
    uint64_t r_packet_id;
    double r_sent_at;
    Py_ssize_t r_datagram_size, r_payload_size;
    int r_errno;
    PyObject *r_failed; /* the sealed datagram when sendto failed */
    /* The receive arm (FastPath.arm_receive): its own state, independent of the send's. */
    int rx_state;                /* LANE_IDLE / LANE_ARMED / LANE_USED */
    struct FastPath *rx_owner;   /* borrowed: the FastPath whose table holds this lane */
    int rx_index;                /* its slot in rx_owner's table */
    int rx_nkeys;
    PyObject *rx_sk[RX_KEYS];    /* bytes (32) or NULL: CLEAR; only while armed */
    PyObject *rx_ms[RX_KEYS];    /* bytes (24); only while armed */
    uint64_t rx_mask, rx_latest;
    uint32_t rx_mtype;
    uint8_t rx_flags;
    uint8_t rx_key[SA_KEY];      /* the peer's normalised sockaddr */
    int rx_keylen;
    /* The result of the receive hop that used the arm (rx_state LANE_USED). */
    uint64_t rr_packet_id;
    double rr_at;
    Py_ssize_t rr_datagram_size, rr_payload_size;
    int rr_errno;
} Lane;

static void lane_release_rx_keys(Lane *l) {
    for (int i = 0; i < RX_KEYS; i++) {
        Py_CLEAR(l->rx_sk[i]);
        Py_CLEAR(l->rx_ms[i]);
    }
    l->rx_nkeys = 0;
}

static void lane_release_keys(Lane *l) {
    Py_CLEAR(l->stream_key);
    Py_CLEAR(l->mac_seed);
}

static PyObject *lane_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    if (PyTuple_GET_SIZE(args) != 0 || (kwds != NULL && PyDict_GET_SIZE(kwds) != 0)) {
        PyErr_SetString(PyExc_TypeError, "Lane() takes no arguments");
        return NULL;
    }
    Lane *l = (Lane *)type->tp_alloc(type, 0);
    if (l == NULL) return NULL;
    l->st = PyType_GetModuleState(type);
    return (PyObject *)l;
}

static void lane_dealloc(Lane *l) {
    PyTypeObject *tp = Py_TYPE(l);
    if (l->state == LANE_ARMED) l->st->armed_lanes--;
    lane_release_keys(l);
    lane_release_rx_keys(l); /* never armed here: an armed lane is held by its table */
    Py_CLEAR(l->r_failed);
    tp->tp_free((PyObject *)l);
    Py_DECREF(tp);
}

/* An int in 0..2^64-1, else TypeError/OverflowError ("K" would wrap -1 and 2^64 silently). */
static int get_u64(PyObject *o, const char *name, unsigned long long *out) {
    if (!PyLong_Check(o)) {
        PyErr_Format(PyExc_TypeError, "%s must be an int", name);
        return -1;
    }
    *out = PyLong_AsUnsignedLongLong(o);
    return (*out == (unsigned long long)-1 && PyErr_Occurred()) ? -1 : 0;
}

static int check_range(unsigned long long v, unsigned long long lo, unsigned long long hi,
                       const char *name) {
    if (v >= lo && v <= hi) return 0;
    PyErr_Format(PyExc_ValueError, "%s must be in %llu..%llu, got %llu", name, lo, hi, v);
    return -1;
}

/* A key as PacketKey holds it: stream key None or 32 bytes, mac seed 24 bytes. */
static int check_key(PyObject *sk, PyObject *ms) {
    if (sk != Py_None && !PyBytes_Check(sk)) {
        PyErr_SetString(PyExc_TypeError, "stream_key must be None or bytes");
        return -1;
    }
    if (sk != Py_None && PyBytes_GET_SIZE(sk) != 32) {
        PyErr_SetString(PyExc_ValueError, "stream_key must be 32 bytes");
        return -1;
    }
    if (!PyBytes_Check(ms)) {
        PyErr_SetString(PyExc_TypeError, "mac_seed must be bytes");
        return -1;
    }
    if (PyBytes_GET_SIZE(ms) != 24) {
        PyErr_SetString(PyExc_ValueError, "mac_seed must be 24 bytes");
        return -1;
    }
    return 0;
}

/* arm(stream_key, mac_seed, packet_id, packet_id_mask, message_type, flags, max_payload,
 *     sockaddr): everything is checked before anything changes. */
static PyObject *lane_arm(Lane *l, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 8) {
        PyErr_Format(PyExc_TypeError, "arm() takes 8 arguments (%zd given)", nargs);
        return NULL;
    }
    if (l->state == LANE_USED) {
        PyErr_SetString(PyExc_RuntimeError,
                        "lane has an unreported result: call take_result() before arm()");
        return NULL;
    }
    PyObject *sk = args[0], *ms = args[1];
    if (check_key(sk, ms) < 0) return NULL;
    unsigned long long pid, mask, mtype, flags, maxp;
    if (get_u64(args[2], "packet_id", &pid) < 0 || get_u64(args[3], "packet_id_mask", &mask) < 0 ||
        get_u64(args[4], "message_type", &mtype) < 0 || get_u64(args[5], "flags", &flags) < 0 ||
        get_u64(args[6], "max_payload", &maxp) < 0)
        return NULL;
    if (check_range(pid, 1, UINT64_MAX, "packet_id") < 0 ||
        check_range(mtype, 0, UINT32_MAX, "message_type") < 0 ||
        check_range(flags, 0, 255, "flags") < 0 || check_range(maxp, 1, IP_MAX, "max_payload") < 0)
        return NULL;
    Py_buffer sa;
    if (PyObject_GetBuffer(args[7], &sa, PyBUF_SIMPLE) < 0) return NULL;
    sa_family_t family = 0;
    if (sa.len >= (Py_ssize_t)sizeof family) memcpy(&family, sa.buf, sizeof family);
    if (!((family == AF_INET && sa.len == (Py_ssize_t)sizeof(struct sockaddr_in)) ||
          (family == AF_INET6 && sa.len == (Py_ssize_t)sizeof(struct sockaddr_in6)))) {
        PyBuffer_Release(&sa);
        PyErr_SetString(PyExc_ValueError,
                        "sockaddr must be a packed sockaddr_in (16 bytes, AF_INET) or "
                        "sockaddr_in6 (28 bytes, AF_INET6)");
        return NULL;
    }
    memset(&l->sa, 0, sizeof l->sa);
    memcpy(&l->sa, sa.buf, (size_t)sa.len);
    l->salen = (socklen_t)sa.len;
    PyBuffer_Release(&sa);
    Py_XINCREF(sk == Py_None ? NULL : sk);
    Py_INCREF(ms);
    lane_release_keys(l);
    l->stream_key = sk == Py_None ? NULL : sk;
    l->mac_seed = ms;
    l->packet_id = pid;
    l->mask = mask;
    l->message_type = (uint32_t)mtype;
    l->flags = (uint8_t)flags;
    l->max_payload = (uint32_t)maxp;
    if (l->state != LANE_ARMED) l->st->armed_lanes++;
    l->state = LANE_ARMED;
    Py_RETURN_NONE;
}

static PyObject *lane_disarm(Lane *l, PyObject *unused) {
    int was = l->state == LANE_ARMED;
    if (was) {
        l->state = LANE_IDLE;
        l->st->armed_lanes--;
    }
    lane_release_keys(l);
    return PyBool_FromLong(was);
}

static PyObject *lane_take_result(Lane *l, PyObject *unused) {
    if (l->state != LANE_USED) Py_RETURN_NONE;
    PyObject *failed = l->r_failed != NULL ? l->r_failed : Py_None;
    PyObject *r = Py_BuildValue("KdnniO", (unsigned long long)l->r_packet_id, l->r_sent_at,
                                l->r_datagram_size, l->r_payload_size, l->r_errno, failed);
    if (r == NULL) return NULL;
    Py_CLEAR(l->r_failed);
    l->state = LANE_IDLE;
    return r;
}

static PyObject *lane_get_armed(Lane *l, void *unused) {
    return PyBool_FromLong(l->state == LANE_ARMED);
}

static PyObject *lane_take_receive_result(Lane *l, PyObject *unused) {
    if (l->rx_state != LANE_USED) Py_RETURN_NONE;
    PyObject *r = Py_BuildValue("Kdnni", (unsigned long long)l->rr_packet_id, l->rr_at,
                                l->rr_datagram_size, l->rr_payload_size, l->rr_errno);
    if (r != NULL) l->rx_state = LANE_IDLE;
    return r;
}

static PyObject *lane_get_receive_armed(Lane *l, void *unused) {
    return PyBool_FromLong(l->rx_state == LANE_ARMED);
}

static PyMethodDef lane_methods[] = {
    {"arm", (PyCFunction)(void (*)(void))lane_arm, METH_FASTCALL,
     "arm(stream_key, mac_seed, packet_id, packet_id_mask, message_type, flags, max_payload, "
     "sockaddr): let the hop send one packet with this PacketID to this address."},
    {"disarm", (PyCFunction)lane_disarm, METH_NOARGS,
     "Take the arm back: True if it was armed and unused (its PacketID is free again)."},
    {"take_result", (PyCFunction)lane_take_result, METH_NOARGS,
     "(packet_id, sent_at, datagram_size, payload_size, send_errno, failed_datagram) of the "
     "hop that used the lane, once; None if unused."},
    {"take_receive_result", (PyCFunction)lane_take_receive_result, METH_NOARGS,
     "(packet_id, received_at, datagram_size, payload_size, tun_errno) of the receive hop "
     "that used the lane's receive arm, once; None if unused."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef lane_getset[] = {
    {"armed", (getter)lane_get_armed, NULL, "The hop may use this lane.", NULL},
    {"receive_armed", (getter)lane_get_receive_armed, NULL,
     "The receive hop may deliver one datagram from this lane's peer.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot lane_slots[] = {
    {Py_tp_doc, "One peer's permission for the hop to send one packet (see arm)."},
    {Py_tp_new, lane_new},
    {Py_tp_dealloc, lane_dealloc},
    {Py_tp_methods, lane_methods},
    {Py_tp_getset, lane_getset},
    {0, NULL},
};

static PyType_Spec lane_spec = {
    "secureiod.daemon._fastpath.Lane", sizeof(Lane), 0,
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE, lane_slots};

/* ---------------------------------------------------------------------------------------- */
/* FastPath                                                                                 */

typedef struct {
    uint8_t len; /* 4 or 16; 0: empty slot */
    uint8_t addr[16];
    Lane *lane;  /* strong */
} route_t;

typedef struct FastPath {
    PyObject_HEAD
    module_state *st;
    int epoll_fd, tun_fd, udp_fd, vnet_hdr;
    int busy;                 /* in wait: a second thread's wait is refused */
    struct epoll_event *events;
    int events_cap;
    uint8_t *buf;             /* HOP_BUF: container header, message header, IP packet */
    uint8_t vnet[VNET_HDR];   /* the read's virtio-net header */
    PyObject *pending;        /* bytes handed back, or NULL */
    PyObject *used;           /* list of Lanes, or NULL when empty */
    route_t *routes;          /* ROUTE_SLOTS, open addressing, linear probing */
    int route_count;
    unsigned long long tun_packets, tun_bytes;
    unsigned long long sends, send_failures, handed_back;
    /* The receive hop. Lanes armed for receive, dense (swap-remove), strong references;
     * rx_hash[i] is rx_lanes[i]'s sockaddr hash, scanned before any memcmp. */
    Lane *rx_lanes[RX_MAX];
    uint64_t rx_hash[RX_MAX];
    int rx_count;
    uint8_t *rbuf;            /* RX_BUF: the datagram as recvmsg returned it */
    PyObject *pending_dgram;  /* (bytes, segment_size, address) handed back, or NULL */
    unsigned long long udp_datagrams, udp_bytes, receives, receive_handed_back;
    /* The poll after a hop (see SPIN_NS): off after SPIN_MISSES_OFF polls in a row missed
     * their answers, on again with an answer; spin_budget bounds its share of the CPU. */
    int spin_off, spin_missed; /* off; polls missed in a row */
    int64_t spin_budget, spin_budget_at;
    unsigned long long spins, spin_answers, spin_ns;
} FastPath;

/* The comparison key of a sockaddr: family, port, address (and for IPv6 flowinfo and
 * scope id) laid out as the struct lays them out, every other byte zero, so kernel
 * padding and a caller's sin_zero never decide a match. Returns its length (16 or 28),
 * or 0 for another family or a short sockaddr. */
static int sa_key(const void *sa, size_t len, uint8_t out[SA_KEY]) {
    sa_family_t family;
    if (len < sizeof family) return 0;
    memcpy(&family, sa, sizeof family);
    memset(out, 0, SA_KEY);
    if (family == AF_INET && len >= sizeof(struct sockaddr_in)) {
        struct sockaddr_in in, k;
        memcpy(&in, sa, sizeof in);
        memset(&k, 0, sizeof k);
        k.sin_family = AF_INET;
        k.sin_port = in.sin_port;
        k.sin_addr = in.sin_addr;
        memcpy(out, &k, sizeof k);
        return (int)sizeof k;
    }
    if (family == AF_INET6 && len >= sizeof(struct sockaddr_in6)) {
        struct sockaddr_in6 in, k;
        memcpy(&in, sa, sizeof in);
        memset(&k, 0, sizeof k);
        k.sin6_family = AF_INET6;
        k.sin6_port = in.sin6_port;
        k.sin6_flowinfo = in.sin6_flowinfo;
        k.sin6_addr = in.sin6_addr;
        k.sin6_scope_id = in.sin6_scope_id;
        memcpy(out, &k, sizeof k);
        return (int)sizeof k;
    }
    return 0;
}

static inline uint64_t sa_hash(const uint8_t *key, int len) {
    uint64_t h = (uint64_t)len;
    for (int i = 0; i < len; i += 4) h = (h ^ load32(key + i)) * 0x9E3779B97F4A7C15ull;
    return h ^ (h >> 29);
}

/* Take `l` out of its owner's receive table: keys released, state left to the caller.
 * Drops the table's reference last (it may be the lane's last one). */
static void rx_remove(Lane *l) {
    FastPath *f = l->rx_owner;
    if (f == NULL) return;
    int i = l->rx_index, last = --f->rx_count;
    if (i != last) {
        f->rx_lanes[i] = f->rx_lanes[last];
        f->rx_hash[i] = f->rx_hash[last];
        f->rx_lanes[i]->rx_index = i;
    }
    f->rx_lanes[last] = NULL;
    l->rx_owner = NULL;
    lane_release_rx_keys(l);
    Py_DECREF(l);
}

/* The lane armed for receive whose peer is this normalised sockaddr, or NULL. */
static Lane *rx_lookup(FastPath *f, const uint8_t *key, int keylen) {
    uint64_t h = sa_hash(key, keylen);
    for (int i = 0; i < f->rx_count; i++)
        if (f->rx_hash[i] == h && f->rx_lanes[i]->rx_keylen == keylen &&
            memcmp(f->rx_lanes[i]->rx_key, key, (size_t)keylen) == 0)
            return f->rx_lanes[i];
    return NULL;
}

static inline size_t route_slot(const uint8_t *addr, size_t len) {
    uint64_t h = len;
    for (size_t i = 0; i < len; i += 4) h = (h ^ load32(addr + i)) * 0x9E3779B97F4A7C15ull;
    return (size_t)(h >> 40) & (ROUTE_SLOTS - 1);
}

/* The slot of `addr`, or the empty slot where it would go (there is always one: the
 * cache holds at most ROUTE_CACHE_MAX < ROUTE_SLOTS entries). */
static route_t *route_probe(route_t *routes, const uint8_t *addr, size_t len) {
    size_t i = route_slot(addr, len);
    for (;;) {
        route_t *r = &routes[i];
        if (r->len == 0 || (r->len == len && memcmp(r->addr, addr, len) == 0)) return r;
        i = (i + 1) & (ROUTE_SLOTS - 1);
    }
}

static void routes_clear(FastPath *f) {
    for (size_t i = 0; i < ROUTE_SLOTS; i++) {
        route_t *r = &f->routes[i];
        if (r->len == 0) continue;
        Lane *lane = r->lane;
        r->len = 0;
        r->lane = NULL;
        Py_DECREF(lane);
    }
    f->route_count = 0;
}

static PyObject *fp_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"epoll_fd", "tun_fd", "vnet_hdr", "udp_fd", NULL};
    int epfd, tunfd, vnet, udpfd;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iipi:FastPath", kwlist, &epfd, &tunfd, &vnet,
                                     &udpfd))
        return NULL;
    if (epfd < 0 || tunfd < 0 || udpfd < 0) {
        PyErr_SetString(PyExc_ValueError, "file descriptors must be >= 0");
        return NULL;
    }
    FastPath *f = (FastPath *)type->tp_alloc(type, 0);
    if (f == NULL) return NULL;
    f->st = PyType_GetModuleState(type);
    f->epoll_fd = epfd;
    f->tun_fd = tunfd;
    f->vnet_hdr = vnet;
    f->udp_fd = udpfd;
    f->events_cap = 64;
    f->events = PyMem_New(struct epoll_event, f->events_cap);
    f->buf = PyMem_Malloc(HOP_BUF);
    f->routes = PyMem_Calloc(ROUTE_SLOTS, sizeof(route_t));
    f->rbuf = PyMem_Malloc(RX_BUF);
    if (f->events == NULL || f->buf == NULL || f->routes == NULL || f->rbuf == NULL) {
        Py_DECREF(f);
        return PyErr_NoMemory();
    }
    return (PyObject *)f;
}

static void fp_dealloc(FastPath *f) {
    PyTypeObject *tp = Py_TYPE(f);
    while (f->rx_count > 0) {
        Lane *l = f->rx_lanes[f->rx_count - 1];
        l->rx_state = LANE_IDLE;
        rx_remove(l);
    }
    Py_CLEAR(f->pending_dgram);
    if (f->rbuf != NULL) sodium_memzero(f->rbuf, RX_BUF);
    PyMem_Free(f->rbuf);
    if (f->routes != NULL) routes_clear(f);
    PyMem_Free(f->routes);
    Py_CLEAR(f->used);
    Py_CLEAR(f->pending);
    PyMem_Free(f->events);
    if (f->buf != NULL) sodium_memzero(f->buf, HOP_BUF); /* the last packet, plaintext */
    PyMem_Free(f->buf);
    sodium_memzero(f->vnet, sizeof f->vnet);
    tp->tp_free((PyObject *)f);
    Py_DECREF(tp);
}

static int64_t monotonic_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

enum { HOP_AGAIN, HOP_SENT, HOP_SEND_FAILED, HOP_HANDED_BACK, HOP_READ_ERROR, HOP_ERROR };

/* Put `lane` on the used list once (until take_used). -1 with an exception set. */
static int queue_used(FastPath *f, Lane *lane) {
    if (lane->queued) return 0;
    if (f->used == NULL && (f->used = PyList_New(0)) == NULL) return -1;
    if (PyList_Append(f->used, (PyObject *)lane) < 0) return -1;
    lane->queued = 1;
    return 0;
}

/* Keep the whole read (`n` bytes, vnet header included) as the pending packet. */
static int hand_back(FastPath *f, size_t n) {
    PyObject *p = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)n);
    if (p == NULL) return HOP_ERROR;
    uint8_t *o = (uint8_t *)PyBytes_AS_STRING(p);
    const uint8_t *ip = f->buf + HEADER + MSG_HEADER;
    if (f->vnet_hdr) {
        size_t h = n < VNET_HDR ? n : VNET_HDR;
        memcpy(o, f->vnet, h);
        memcpy(o + h, ip, n - h);
    } else {
        memcpy(o, ip, n);
    }
    f->pending = p;
    f->handed_back++;
    return HOP_HANDED_BACK;
}

/*
 * Read one packet from the TUN and send it through its lane, or hand it back. GIL held
 * (the lane's key objects are read and released here). Returns HOP_*; HOP_ERROR with a
 * Python exception set.
 */
static int hop(FastPath *f) {
    uint8_t *ip = f->buf + HEADER + MSG_HEADER;
    struct iovec iov[2];
    int k = 0;
    if (f->vnet_hdr) {
        iov[k].iov_base = f->vnet;
        iov[k++].iov_len = VNET_HDR;
    }
    iov[k].iov_base = ip;
    iov[k++].iov_len = IP_MAX;
    ssize_t got = readv(f->tun_fd, iov, k);
    if (got < 0) return errno == EAGAIN || errno == EWOULDBLOCK ? HOP_AGAIN : HOP_READ_ERROR;
    size_t n = (size_t)got, len = n;
    f->tun_packets++;
    f->tun_bytes += n;
    if (f->vnet_hdr) {
        /* No offload work wanted (flags, gso_type 0): the packet is just what follows. */
        if (n < VNET_HDR + 1 || f->vnet[0] != 0 || f->vnet[1] != 0) return hand_back(f, n);
        len = n - VNET_HDR;
    }
    Lane *lane = NULL;
    if (len >= 20 && ip[0] >> 4 == 4) lane = route_probe(f->routes, ip + 16, 4)->lane;
    else if (len >= 40 && ip[0] >> 4 == 6) lane = route_probe(f->routes, ip + 24, 16)->lane;
    if (lane == NULL || lane->state != LANE_ARMED || len > lane->max_payload)
        return hand_back(f, n);

    uint8_t *m = f->buf + HEADER;
    store32(m, lane->message_type);
    store32(m + 4, (uint32_t)len);
    m[8] = lane->flags;
    crypto_t c;
    crypto_init(&c, &f->st->alg, 1);
    /* ChaCha20 from libsodium only: it cannot fail half way through the in-place
     * encryption, so after an OpenSSL (Poly1305) failure the packet is intact to hand
     * back. It costs ~0.3 us on a lone 1,400-byte packet, nothing below 1,024 bytes. */
    c.chacha_min = SIZE_MAX;
    const uint8_t *sk =
        lane->stream_key != NULL ? (const uint8_t *)PyBytes_AS_STRING(lane->stream_key) : NULL;
    int rc = seal_in_place(&c, f->buf, MSG_HEADER + len, sk,
                           (const uint8_t *)PyBytes_AS_STRING(lane->mac_seed), lane->packet_id,
                           lane->mask);
    crypto_release(&c);
    if (rc < 0) {
        ERR_clear_error(); /* never send a bad tag: Python's own seal raises or works */
        return hand_back(f, n);
    }
    size_t dlen = HEADER + MSG_HEADER + len;
    ssize_t s =
        sendto(f->udp_fd, f->buf, dlen, MSG_DONTWAIT, (const struct sockaddr *)&lane->sa, lane->salen);
    int err = s < 0 ? errno : 0;
    int64_t now = monotonic_ns();

    lane->state = LANE_USED;
    f->st->armed_lanes--;
    lane_release_keys(lane);
    lane->r_packet_id = lane->packet_id;
    lane->r_sent_at = (double)now / 1e9;
    lane->r_datagram_size = (Py_ssize_t)dlen;
    lane->r_payload_size = (Py_ssize_t)len;
    lane->r_errno = err;
    Py_CLEAR(lane->r_failed);
    if (err != 0) {
        f->send_failures++;
        lane->r_failed = PyBytes_FromStringAndSize((const char *)f->buf, (Py_ssize_t)dlen);
    } else {
        f->sends++;
    }
    if (queue_used(f, lane) < 0) return HOP_ERROR;
    if (err != 0 && lane->r_failed == NULL) return HOP_ERROR;
    return err != 0 ? HOP_SEND_FAILED : HOP_SENT;
}

/* ---------------------------------------------------------------------------------------- */
/* The receive hop                                                                          */

enum { RX_AGAIN, RX_DELIVERED, RX_HANDED_BACK, RX_READ_ERROR, RX_ERROR };

/* What Python's socket.recvfrom gives as the address: (host, port) or
 * (host, port, flowinfo, scope_id); None for a family a UDP socket never reports. */
static PyObject *py_address(const struct sockaddr_storage *sa, socklen_t len) {
    char host[INET6_ADDRSTRLEN];
    if (sa->ss_family == AF_INET && len >= (socklen_t)sizeof(struct sockaddr_in)) {
        const struct sockaddr_in *a = (const struct sockaddr_in *)sa;
        if (inet_ntop(AF_INET, &a->sin_addr, host, sizeof host) == NULL) host[0] = 0;
        return Py_BuildValue("(si)", host, (int)ntohs(a->sin_port));
    }
    if (sa->ss_family == AF_INET6 && len >= (socklen_t)sizeof(struct sockaddr_in6)) {
        const struct sockaddr_in6 *a = (const struct sockaddr_in6 *)sa;
        if (inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host) == NULL) host[0] = 0;
        return Py_BuildValue("(siII)", host, (int)ntohs(a->sin6_port),
                             (unsigned int)ntohl(a->sin6_flowinfo),
                             (unsigned int)a->sin6_scope_id);
    }
    Py_RETURN_NONE;
}

/* Keep the datagram exactly as read as the pending one. */
static int rx_hand_back(FastPath *f, size_t n, size_t segment, const struct sockaddr_storage *sa,
                        socklen_t salen) {
    PyObject *addr = py_address(sa, salen);
    if (addr == NULL) return RX_ERROR;
    PyObject *p = Py_BuildValue("(y#nN)", (const char *)f->rbuf, (Py_ssize_t)n,
                                (Py_ssize_t)segment, addr);
    if (p == NULL) return RX_ERROR;
    f->pending_dgram = p;
    f->receive_handed_back++;
    return RX_HANDED_BACK;
}

/*
 * Open the datagram d[0:n] (n >= HEADER) under the lane's keys exactly as _accel.open
 * does: the first key whose header tag verifies decides; then the messages tag and the
 * Length. The plaintext goes to f->buf + 8 (the messages at f->buf + HEADER); `d` is
 * never written. Returns 0 when it opened, -1 otherwise (no Python exception).
 */
static int rx_open(FastPath *f, const Lane *lane, const uint8_t *d, size_t n, uint64_t pid) {
    uint8_t pid8[8], pk[32], tag[16];
    uint8_t *p = f->buf + 8;
    size_t rest = n - 8, first = rest < 64 ? rest : 64, body = n - HEADER;
    int ok = -1;
    store64(pid8, pid);
    for (int i = 0; i < lane->rx_nkeys; i++) {
        const uint8_t *sk = lane->rx_sk[i] != NULL
                                ? (const uint8_t *)PyBytes_AS_STRING(lane->rx_sk[i])
                                : NULL;
        poly_key((const uint8_t *)PyBytes_AS_STRING(lane->rx_ms[i]), pid, pk);
        if (sk != NULL) crypto_stream_chacha20_xor_ic(p, d + 8, first, pid8, 0, sk);
        else memcpy(p, d + 8, first);
        crypto_onetimeauth_poly1305(tag, p + 32, 4, pk);
        if (crypto_verify_16(tag, p) != 0) continue;
        /* This key decides, as in _accel.open: a bad messages tag is not a wrong key. */
        crypto_t c;
        crypto_init(&c, &f->st->alg, 1);
        int rc = 0;
        if (first < rest) {
            if (sk != NULL) rc = chacha20_xor_ic(&c, p + 64, d + 8 + 64, rest - 64, pid8, 1, sk);
            else memcpy(p + 64, d + 8 + 64, rest - 64);
        }
        if (rc == 0) rc = poly1305(&c, tag, p + 36, body, pk);
        crypto_release(&c);
        if (rc < 0) ERR_clear_error(); /* Python's own open raises or works */
        else if (crypto_verify_16(tag, p + 16) == 0 && (size_t)load32(p + 32) == body) ok = 0;
        break;
    }
    sodium_memzero(pk, sizeof pk);
    sodium_memzero(tag, sizeof tag);
    return ok;
}

/* inner.inner_packet_problem's checks: the IP packet is consistent with its size. */
static int inner_ok(const uint8_t *ip, size_t size) {
    if (size < 1) return 0;
    int version = ip[0] >> 4;
    if (version == 4) {
        if (size < 20) return 0;
        size_t header = (size_t)(ip[0] & 0x0F) << 2, total = ((size_t)ip[2] << 8) | ip[3];
        return header >= 20 && header <= total && total == size;
    }
    if (version == 6) return size >= 40 && 40 + (((size_t)ip[4] << 8) | ip[5]) == size;
    return 0;
}

/*
 * Read one datagram from the UDP socket and deliver it to the TUN through its lane, or
 * hand it back untouched. GIL held. Returns RX_*; RX_ERROR with a Python exception set.
 */
static int rx_hop(FastPath *f) {
    struct sockaddr_storage from;
    union {
        char buf[256]; /* UDP_GRO's int, with room for cmsgs other options may add */
        struct cmsghdr align;
    } ctl;
    struct iovec iov = {f->rbuf, RX_BUF};
    struct msghdr mh;
    memset(&mh, 0, sizeof mh);
    memset(&from, 0, sizeof from);
    mh.msg_name = &from;
    mh.msg_namelen = sizeof from;
    mh.msg_iov = &iov;
    mh.msg_iovlen = 1;
    mh.msg_control = ctl.buf;
    mh.msg_controllen = sizeof ctl.buf;
    ssize_t got = recvmsg(f->udp_fd, &mh, MSG_DONTWAIT);
    if (got < 0) return errno == EAGAIN || errno == EWOULDBLOCK ? RX_AGAIN : RX_READ_ERROR;
    size_t n = (size_t)got, segment = n;
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(&mh); cm != NULL; cm = CMSG_NXTHDR(&mh, cm)) {
        if (cm->cmsg_level == SOL_UDP && cm->cmsg_type == UDP_GRO &&
            cm->cmsg_len >= CMSG_LEN(sizeof(int))) {
            int gso;
            memcpy(&gso, CMSG_DATA(cm), sizeof gso);
            if (gso > 0 && (size_t)gso < n) segment = (size_t)gso;
        }
    }
    /* as udp.recv_runs counts: every datagram of a coalesced read */
    f->udp_datagrams += n == 0 ? 1 : (n + segment - 1) / segment;
    f->udp_bytes += n;
    socklen_t salen = mh.msg_namelen;
#define BACK() rx_hand_back(f, n, segment, &from, salen)
    if (segment != n || (mh.msg_flags & (MSG_TRUNC | MSG_CTRUNC)) != 0) return BACK();
    if (n < HEADER + MSG_HEADER || n > HOP_BUF) return BACK();
    uint8_t key[SA_KEY];
    int keylen = sa_key(&from, salen, key);
    if (keylen == 0) return BACK();
    Lane *lane = rx_lookup(f, key, keylen);
    if (lane == NULL) return BACK();
    uint64_t pid = load64(f->rbuf) ^ lane->rx_mask;
    if (pid <= lane->rx_latest) return BACK();
    if (rx_open(f, lane, f->rbuf, n, pid) < 0) return BACK();
    const uint8_t *m = f->buf + HEADER, *ip = m + MSG_HEADER;
    size_t size = n - HEADER - MSG_HEADER;
    if (load32(m) != lane->rx_mtype || (size_t)load32(m + 4) != size || m[8] != lane->rx_flags ||
        !inner_ok(ip, size))
        return BACK();
    const route_t *r = ip[0] >> 4 == 4 ? route_probe(f->routes, ip + 12, 4)
                                       : route_probe(f->routes, ip + 8, 16);
    if (r->lane != lane) return BACK();
#undef BACK
    int64_t now = monotonic_ns();
    ssize_t w;
    if (f->vnet_hdr) {
        static const uint8_t zero[VNET_HDR];
        struct iovec out[2] = {{(void *)zero, VNET_HDR}, {(void *)ip, size}};
        w = writev(f->tun_fd, out, 2);
    } else {
        w = write(f->tun_fd, ip, size);
    }
    int err = w < 0 ? errno : 0;

    lane->rr_packet_id = pid;
    lane->rr_at = (double)now / 1e9;
    lane->rr_datagram_size = (Py_ssize_t)n;
    lane->rr_payload_size = (Py_ssize_t)size;
    lane->rr_errno = err;
    f->receives += err == 0;
    /* Queued first: the used list's reference keeps the lane alive past rx_remove. */
    int q = queue_used(f, lane);
    lane->rx_state = LANE_USED;
    rx_remove(lane);
    return q < 0 ? RX_ERROR : RX_DELIVERED;
}

static PyObject *ready_list(const struct epoll_event *ev, int n) {
    PyObject *list = PyList_New(n);
    if (list == NULL) return NULL;
    for (int i = 0; i < n; i++) {
        PyObject *t = Py_BuildValue("iI", ev[i].data.fd, ev[i].events);
        if (t == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, i, t);
    }
    return list;
}

static PyObject *one_ready(int fd, uint32_t events) {
    struct epoll_event ev;
    ev.events = events;
    ev.data.fd = fd;
    return ready_list(&ev, 1);
}

/* How long a wait goes on after a hop for the answer (a ping's reply comes from the TUN
 * within ~0.1 ms after a receive hop, from the peer within a round trip after a send hop):
 * then it returns, and Python settles what the hop did (counters, last_received, which the
 * metrics thread reads without waking the loop). */
#define SETTLE_WITHIN_NS 2000000LL

/*
 * After a hop whose answer is expected (a send with a receive lane armed, or a delivery with
 * a send lane armed), the wait first polls without sleeping for up to SPIN_NS: a ping's
 * answer then finds this process running, where a sleeping one costs a wake-up (0.1-0.5 ms
 * on a VM: the slow tail of a ping's RTT). SPIN_MISSES_OFF polls in a row that their
 * answers missed (they timed out, or another event came first) turn it off, so a one-way
 * stream of lone packets pays three polls, not one per packet. An answer that comes later
 * in the settle wait turns it on again (until one more miss; a caught answer clears the
 * misses). A poll never outlasts the first hop's settle limit or the caller's deadline, and
 * none starts after them. Whatever the traffic, at most 1/SPIN_SHARE of the time goes to
 * polling (a budget of up to SPIN_BUDGET_NS).
 */
#define SPIN_NS 300000LL
#define SPIN_MISSES_OFF 3
#define SPIN_SHARE 20
#define SPIN_BUDGET_NS 20000000LL

/* A poll from `now` if it is on, `now` is before `limit` (the settle limit or the caller's
 * deadline) and the budget has it: returns its end, or 0. */
static int64_t spin_start(FastPath *f, int64_t now, int64_t limit) {
    if (f->spin_off || now >= limit) return 0;
    int64_t refill = (now - f->spin_budget_at) / SPIN_SHARE;
    f->spin_budget_at = now;
    f->spin_budget = refill >= SPIN_BUDGET_NS - f->spin_budget ? SPIN_BUDGET_NS
                                                                : f->spin_budget + refill;
    if (f->spin_budget < SPIN_NS) return 0;
    f->spins++;
    return now + SPIN_NS;
}

enum { SPIN_MISSED, SPIN_ANSWERED, SPIN_CUT };

/* The poll that began at `started` ended at `now`: with the answer; without it (SPIN_NS
 * passed, or another event came first: the next packet of a one-way stream); or cut short
 * by the caller's deadline or the settle limit, which says nothing about answers. */
static void spin_end(FastPath *f, int64_t started, int64_t now, int how) {
    int64_t spent = now > started ? now - started : 0;
    f->spin_budget -= spent;
    f->spin_ns += (unsigned long long)spent;
    if (how == SPIN_ANSWERED) {
        f->spin_answers++;
        f->spin_missed = 0;
    } else if (how == SPIN_MISSED && ++f->spin_missed >= SPIN_MISSES_OFF) {
        f->spin_off = 1;
    }
}

/* When a wait with a hop to settle must return: its settle limit, or the caller's deadline
 * if that comes first. */
static inline int64_t settle_limit(int forever, int64_t deadline, int64_t settle_by) {
    return !forever && deadline < settle_by ? deadline : settle_by;
}

static inline int ms_ceil(int64_t ns) {
    int64_t ms = (ns + 999999) / 1000000;
    return ms > INT_MAX ? INT_MAX : (int)ms;
}

static PyObject *fp_wait_inner(FastPath *f, double timeout, int maxevents) {
    int forever = timeout < 0;
    int64_t total_ns = 0, deadline = 0;
    if (!forever) {
        total_ns = timeout >= 9.2e9 ? INT64_MAX / 2 : (int64_t)ceil(timeout * 1e9);
        deadline = monotonic_ns() + total_ns;
    }
    int first = 1;
    int64_t settle_by = 0; /* after a hop: when Python must settle it at the latest */
    int64_t hop_at = 0;    /* the last hop that expects an answer (from expect_fd) */
    int64_t spin_until = 0; /* while polling after it (SPIN_NS) */
    int expect_fd = -1;
    for (;;) {
        int ms = -1, polling = 0;
        int64_t limit = settle_limit(forever, deadline, settle_by); /* once settle_by is set */
        if (spin_until != 0) {
            int64_t now = monotonic_ns();
            if (now < spin_until && now < limit) {
                polling = 1;
            } else {
                spin_end(f, hop_at, now, now < spin_until ? SPIN_CUT : SPIN_MISSED);
                spin_until = 0;
            }
        }
        if (polling) {
            ms = 0; /* not worth releasing the GIL for */
        } else if (settle_by != 0) {
            int64_t now = monotonic_ns();
            if (limit - now <= 0) return PyList_New(0);
            ms = ms_ceil(limit - now);
        } else if (!forever) {
            if (first) {
                ms = ms_ceil(total_ns);
            } else {
                int64_t left = deadline - monotonic_ns();
                if (left <= 0) return PyList_New(0);
                ms = ms_ceil(left);
            }
        }
        first = 0;
        int n, err;
        if (polling) {
            n = epoll_wait(f->epoll_fd, f->events, maxevents, 0);
            err = errno;
            if (n == 0) continue;
        } else {
            Py_BEGIN_ALLOW_THREADS
            n = epoll_wait(f->epoll_fd, f->events, maxevents, ms);
            err = errno;
            Py_END_ALLOW_THREADS
        }
        const struct epoll_event *ev = f->events;
        if (n != 0 && hop_at != 0) {
            int answered = 0;
            for (int i = 0; i < n; i++) answered |= ev[i].data.fd == expect_fd;
            if (spin_until != 0) {
                spin_end(f, hop_at, monotonic_ns(), answered ? SPIN_ANSWERED : SPIN_MISSED);
                spin_until = 0;
            } else if (answered) {
                f->spin_off = 0; /* answers come: poll for the next one */
            }
            hop_at = 0;
        }
        if (n < 0) {
            if (err != EINTR) {
                errno = err;
                return PyErr_SetFromErrno(PyExc_OSError);
            }
            if (PyErr_CheckSignals() < 0) return NULL;
            return PyList_New(0);
        }
        if (n != 1 || ev->events != EPOLLIN) return ready_list(ev, n);
        if (ev->data.fd == f->udp_fd && f->pending_dgram == NULL && f->rx_count > 0) {
            switch (rx_hop(f)) {
            case RX_AGAIN:
                continue;
            case RX_DELIVERED:
                /* With a send lane armed, wait on: the answer (a ping's reply) is about to
                 * come from the TUN and the send half may take it at once; Python settles
                 * both after it. Otherwise Python settles the lane now... */
                if (f->st->armed_lanes <= 0) return PyList_New(0);
                /* ... but not for long: counters and last_received wait for the settle */
                hop_at = monotonic_ns();
                if (settle_by == 0) settle_by = hop_at + SETTLE_WITHIN_NS;
                expect_fd = f->tun_fd;
                spin_until = spin_start(f, hop_at, settle_limit(forever, deadline, settle_by));
                continue;
            case RX_HANDED_BACK:
                return one_ready(f->udp_fd, EPOLLIN);
            case RX_READ_ERROR:
                return one_ready(f->udp_fd, ev->events);
            default:
                return NULL;
            }
        }
        if (ev->data.fd != f->tun_fd || f->pending != NULL || f->st->armed_lanes <= 0)
            return ready_list(ev, n);
        switch (hop(f)) {
        case HOP_AGAIN:
            continue;
        case HOP_SENT:
            /* With a receive lane armed, wait on: the answer (a ping's reply) comes back
             * within a round trip and the receive half may take it at once; Python then
             * settles both, instead of running (cold) while the answer waits for it. But
             * not for long, as after a receive hop. */
            if (f->rx_count <= 0) return PyList_New(0);
            hop_at = monotonic_ns();
            if (settle_by == 0) settle_by = hop_at + SETTLE_WITHIN_NS;
            expect_fd = f->udp_fd;
            spin_until = spin_start(f, hop_at, settle_limit(forever, deadline, settle_by));
            continue;
        case HOP_SEND_FAILED:
            return PyList_New(0); /* Python deals with the failure */
        case HOP_HANDED_BACK:
            return one_ready(f->tun_fd, EPOLLIN);
        case HOP_READ_ERROR:
            return one_ready(f->tun_fd, ev->events);
        default:
            return NULL;
        }
    }
}

/* wait(timeout, maxevents) -> [(fd, events), ...]: epoll.poll with the hop inside. */
static PyObject *fp_wait(FastPath *f, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "wait() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    double timeout = -1.0;
    if (args[0] != Py_None) {
        timeout = PyFloat_AsDouble(args[0]);
        if (timeout == -1.0 && PyErr_Occurred()) return NULL;
        if (isnan(timeout)) {
            PyErr_SetString(PyExc_ValueError, "timeout must not be NaN");
            return NULL;
        }
    }
    long maxevents = PyLong_AsLong(args[1]);
    if (maxevents == -1 && PyErr_Occurred()) return NULL;
    if (maxevents < 1 || maxevents > MAX_EVENTS) {
        PyErr_Format(PyExc_ValueError, "maxevents must be in 1..%d, got %ld", MAX_EVENTS, maxevents);
        return NULL;
    }
    if (f->busy) {
        PyErr_SetString(PyExc_RuntimeError, "FastPath.wait is already running in another thread");
        return NULL;
    }
    if (maxevents > f->events_cap) {
        struct epoll_event *e = PyMem_Resize(f->events, struct epoll_event, maxevents);
        if (e == NULL) return PyErr_NoMemory();
        f->events = e;
        f->events_cap = (int)maxevents;
    }
    f->busy = 1;
    PyObject *r = fp_wait_inner(f, timeout, (int)maxevents);
    f->busy = 0;
    return r;
}

static PyObject *fp_take_pending(FastPath *f, PyObject *unused) {
    PyObject *p = f->pending;
    if (p == NULL) Py_RETURN_NONE;
    f->pending = NULL;
    return p;
}

static PyObject *fp_route(FastPath *f, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "route() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    if (!PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "destination must be bytes");
        return NULL;
    }
    Py_ssize_t len = PyBytes_GET_SIZE(args[0]);
    if (len != 4 && len != 16) {
        PyErr_Format(PyExc_ValueError, "destination must be 4 or 16 bytes, got %zd", len);
        return NULL;
    }
    if (!PyObject_TypeCheck(args[1], f->st->lane_type)) {
        PyErr_SetString(PyExc_TypeError, "lane must be a Lane");
        return NULL;
    }
    const uint8_t *addr = (const uint8_t *)PyBytes_AS_STRING(args[0]);
    Lane *lane = (Lane *)args[1];
    route_t *r = route_probe(f->routes, addr, (size_t)len);
    if (r->len == 0 && f->route_count >= ROUTE_CACHE_MAX) {
        routes_clear(f); /* bounded: forget everything, Python refills what it uses */
        r = route_probe(f->routes, addr, (size_t)len);
    }
    Py_INCREF(lane);
    if (r->len != 0) {
        Lane *old = r->lane;
        r->lane = lane;
        Py_DECREF(old);
    } else {
        memcpy(r->addr, addr, (size_t)len);
        r->len = (uint8_t)len;
        r->lane = lane;
        f->route_count++;
    }
    Py_RETURN_NONE;
}

static PyObject *fp_clear_routes(FastPath *f, PyObject *unused) {
    routes_clear(f);
    Py_RETURN_NONE;
}

static PyObject *fp_take_used(FastPath *f, PyObject *unused) {
    PyObject *used = f->used;
    if (used == NULL) return PyList_New(0);
    f->used = NULL;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(used); i++)
        ((Lane *)PyList_GET_ITEM(used, i))->queued = 0;
    return used;
}

static PyObject *fp_take_tun_reads(FastPath *f, PyObject *unused) {
    PyObject *r = Py_BuildValue("KK", f->tun_packets, f->tun_bytes);
    if (r != NULL) f->tun_packets = f->tun_bytes = 0;
    return r;
}

/* arm_receive(lane, keys, packet_id_mask, latest, message_type, flags, sockaddr): every
 * argument is checked before anything changes. */
static PyObject *fp_arm_receive(FastPath *f, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 7) {
        PyErr_Format(PyExc_TypeError, "arm_receive() takes 7 arguments (%zd given)", nargs);
        return NULL;
    }
    if (!PyObject_TypeCheck(args[0], f->st->lane_type)) {
        PyErr_SetString(PyExc_TypeError, "lane must be a Lane");
        return NULL;
    }
    Lane *lane = (Lane *)args[0];
    PyObject *keys = args[1];
    if (!PyTuple_Check(keys)) {
        PyErr_SetString(PyExc_TypeError, "keys must be a tuple of (stream_key, mac_seed) pairs");
        return NULL;
    }
    Py_ssize_t nkeys = PyTuple_GET_SIZE(keys);
    if (nkeys < 1 || nkeys > RX_KEYS) {
        PyErr_Format(PyExc_ValueError, "keys must hold 1..%d pairs, got %zd", RX_KEYS, nkeys);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < nkeys; i++) {
        PyObject *pair = PyTuple_GET_ITEM(keys, i);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
            PyErr_SetString(PyExc_TypeError, "keys must be (stream_key, mac_seed) pairs");
            return NULL;
        }
        if (check_key(PyTuple_GET_ITEM(pair, 0), PyTuple_GET_ITEM(pair, 1)) < 0) return NULL;
    }
    unsigned long long mask, latest, mtype, flags;
    if (get_u64(args[2], "packet_id_mask", &mask) < 0 || get_u64(args[3], "latest", &latest) < 0 ||
        get_u64(args[4], "message_type", &mtype) < 0 || get_u64(args[5], "flags", &flags) < 0)
        return NULL;
    if (check_range(mtype, 0, UINT32_MAX, "message_type") < 0 ||
        check_range(flags, 0, 255, "flags") < 0)
        return NULL;
    Py_buffer sa;
    if (PyObject_GetBuffer(args[6], &sa, PyBUF_SIMPLE) < 0) return NULL;
    uint8_t key[SA_KEY];
    sa_family_t family = 0;
    if (sa.len >= (Py_ssize_t)sizeof family) memcpy(&family, sa.buf, sizeof family);
    int keylen = 0;
    if ((family == AF_INET && sa.len == (Py_ssize_t)sizeof(struct sockaddr_in)) ||
        (family == AF_INET6 && sa.len == (Py_ssize_t)sizeof(struct sockaddr_in6)))
        keylen = sa_key(sa.buf, (size_t)sa.len, key);
    PyBuffer_Release(&sa);
    if (keylen == 0) {
        PyErr_SetString(PyExc_ValueError,
                        "sockaddr must be a packed sockaddr_in (16 bytes, AF_INET) or "
                        "sockaddr_in6 (28 bytes, AF_INET6)");
        return NULL;
    }
    if (lane->rx_state == LANE_USED) {
        PyErr_SetString(PyExc_RuntimeError, "lane has an unreported receive result: call "
                                            "take_receive_result() before arm_receive()");
        return NULL;
    }
    if (lane->rx_owner != f && f->rx_count >= RX_MAX) {
        PyErr_Format(PyExc_RuntimeError, "%d lanes are already armed for receive", RX_MAX);
        return NULL;
    }
    /* Checked: from here nothing fails. New references before the old ones go. */
    PyObject *nsk[RX_KEYS] = {NULL}, *nms[RX_KEYS] = {NULL};
    for (Py_ssize_t i = 0; i < nkeys; i++) {
        PyObject *pair = PyTuple_GET_ITEM(keys, i), *sk = PyTuple_GET_ITEM(pair, 0);
        nsk[i] = sk == Py_None ? NULL : Py_NewRef(sk);
        nms[i] = Py_NewRef(PyTuple_GET_ITEM(pair, 1));
    }
    if (lane->rx_owner != NULL && lane->rx_owner != f) rx_remove(lane); /* armed elsewhere */
    if (lane->rx_owner == NULL) {
        lane->rx_owner = f;
        lane->rx_index = f->rx_count;
        f->rx_lanes[f->rx_count++] = (Lane *)Py_NewRef(lane);
    }
    lane_release_rx_keys(lane);
    for (int i = 0; i < RX_KEYS; i++) {
        lane->rx_sk[i] = nsk[i];
        lane->rx_ms[i] = nms[i];
    }
    lane->rx_nkeys = (int)nkeys;
    lane->rx_mask = mask;
    lane->rx_latest = latest;
    lane->rx_mtype = (uint32_t)mtype;
    lane->rx_flags = (uint8_t)flags;
    memcpy(lane->rx_key, key, SA_KEY);
    lane->rx_keylen = keylen;
    f->rx_hash[lane->rx_index] = sa_hash(key, keylen);
    lane->rx_state = LANE_ARMED;
    Py_RETURN_NONE;
}

static PyObject *fp_disarm_receive(FastPath *f, PyObject *arg) {
    if (!PyObject_TypeCheck(arg, f->st->lane_type)) {
        PyErr_SetString(PyExc_TypeError, "lane must be a Lane");
        return NULL;
    }
    Lane *lane = (Lane *)arg;
    if (lane->rx_state != LANE_ARMED) Py_RETURN_FALSE;
    lane->rx_state = LANE_IDLE;
    rx_remove(lane); /* the caller's reference keeps it alive */
    Py_RETURN_TRUE;
}

static PyObject *fp_take_pending_datagram(FastPath *f, PyObject *unused) {
    PyObject *p = f->pending_dgram;
    if (p == NULL) Py_RETURN_NONE;
    f->pending_dgram = NULL;
    return p;
}

static PyObject *fp_take_udp_reads(FastPath *f, PyObject *unused) {
    PyObject *r = Py_BuildValue("KK", f->udp_datagrams, f->udp_bytes);
    if (r != NULL) f->udp_datagrams = f->udp_bytes = 0;
    return r;
}

static PyMethodDef fp_methods[] = {
    {"wait", (PyCFunction)(void (*)(void))fp_wait, METH_FASTCALL,
     "wait(timeout, maxevents): epoll.poll on epoll_fd, sending a lone routed TUN packet "
     "or delivering a lone armed datagram itself (then it returns [] at once)."},
    {"take_pending", (PyCFunction)fp_take_pending, METH_NOARGS,
     "The packet the hop read but handed back (bytes, vnet header included), or None."},
    {"route", (PyCFunction)(void (*)(void))fp_route, METH_FASTCALL,
     "route(destination, lane): packets to exactly this 4- or 16-byte address go to lane."},
    {"clear_routes", (PyCFunction)fp_clear_routes, METH_NOARGS, "Forget every route."},
    {"take_used", (PyCFunction)fp_take_used, METH_NOARGS,
     "The lanes either hop used (sent, failed, received) since the last call, each once, "
     "in order."},
    {"take_tun_reads", (PyCFunction)fp_take_tun_reads, METH_NOARGS,
     "(packets, bytes) the hop read from the TUN since the last call."},
    {"arm_receive", (PyCFunction)(void (*)(void))fp_arm_receive, METH_FASTCALL,
     "arm_receive(lane, keys, packet_id_mask, latest, message_type, flags, sockaddr): let "
     "the receive hop deliver one datagram from this peer to the TUN."},
    {"disarm_receive", (PyCFunction)fp_disarm_receive, METH_O,
     "Take the receive arm back: True if it was armed and unused."},
    {"take_pending_datagram", (PyCFunction)fp_take_pending_datagram, METH_NOARGS,
     "(data, segment_size, address) of the datagram the hop read but handed back, or None."},
    {"take_udp_reads", (PyCFunction)fp_take_udp_reads, METH_NOARGS,
     "(datagrams, bytes) the hop read from the UDP socket since the last call."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef fp_members[] = {
    {"sends", T_ULONGLONG, offsetof(FastPath, sends), READONLY, "Datagrams the hop sent."},
    {"send_failures", T_ULONGLONG, offsetof(FastPath, send_failures), READONLY,
     "Datagrams whose sendto failed."},
    {"handed_back", T_ULONGLONG, offsetof(FastPath, handed_back), READONLY,
     "Packets the hop read and handed back."},
    {"receives", T_ULONGLONG, offsetof(FastPath, receives), READONLY,
     "Datagrams the receive hop delivered to the TUN."},
    {"spins", T_ULONGLONG, offsetof(FastPath, spins), READONLY,
     "Polls without sleeping after a hop, for its answer (SPIN_NS)."},
    {"spin_answers", T_ULONGLONG, offsetof(FastPath, spin_answers), READONLY,
     "Polls that the expected answer ended."},
    {"spin_ns", T_ULONGLONG, offsetof(FastPath, spin_ns), READONLY,
     "Nanoseconds spent polling."},
    {"receive_handed_back", T_ULONGLONG, offsetof(FastPath, receive_handed_back), READONLY,
     "Datagrams the receive hop read and handed back."},
    {"rx_count", T_INT, offsetof(FastPath, rx_count), READONLY,
     "Lanes armed for receive (at most RX_MAX)."},
    {"route_count", T_INT, offsetof(FastPath, route_count), READONLY,
     "Entries in the route cache (at most ROUTE_CACHE_MAX)."},
    {NULL, 0, 0, 0, NULL},
};

static PyType_Slot fp_slots[] = {
    {Py_tp_doc, "FastPath(epoll_fd, tun_fd, vnet_hdr, udp_fd): the event loop's wait with the "
                "lone packet's TUN -> UDP and UDP -> TUN hops inside."},
    {Py_tp_new, fp_new},
    {Py_tp_dealloc, fp_dealloc},
    {Py_tp_methods, fp_methods},
    {Py_tp_members, fp_members},
    {0, NULL},
};

static PyType_Spec fp_spec = {
    "secureiod.daemon._fastpath.FastPath", sizeof(FastPath), 0,
    Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE, fp_slots};

/* ---------------------------------------------------------------------------------------- */

static void module_free(void *m) {
    module_state *st = PyModule_GetState((PyObject *)m);
    if (st == NULL) return;
    algorithms_free(&st->alg);
    Py_CLEAR(st->lane_type);
}

/*
 * sched_yield() with the GIL held. Why not os.sched_yield: that releases the GIL, so a
 * Python thread waiting for it (the metrics exposition, collecting thousands of peers) takes
 * the interpreter at every yield and keeps it for a switch interval (5 ms), while the event
 * loop waits: a scrape could stall the data path (review 8 measured 16 times fewer work
 * chunks per second with a busy second thread). Held, the yield lets other processes and
 * threads runnable on this core (the receivers our writes woke) go first, and nothing else.
 */
static PyObject *fp_yield_cpu(PyObject *module, PyObject *unused) {
    (void)sched_yield();
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"yield_cpu", fp_yield_cpu, METH_NOARGS,
     "yield_cpu(): sched_yield() without releasing the GIL."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastpath", NULL, sizeof(module_state), module_methods, NULL, NULL,
    NULL, module_free};

PyMODINIT_FUNC PyInit__fastpath(void) {
    PyObject *m = construction_module(&module);
    if (m == NULL) return NULL;
    module_state *st = PyModule_GetState(m);
    PyObject *lane = PyType_FromModuleAndSpec(m, &lane_spec, NULL);
    if (lane == NULL) goto fail;
    st->lane_type = (PyTypeObject *)lane; /* owned by the state */
    if (PyModule_AddObjectRef(m, "Lane", lane) < 0) goto fail;
    PyObject *fp = PyType_FromModuleAndSpec(m, &fp_spec, NULL);
    if (fp == NULL) goto fail;
    if (PyModule_AddObject(m, "FastPath", fp) < 0) {
        Py_DECREF(fp);
        goto fail;
    }
    if (PyModule_AddIntConstant(m, "ROUTE_CACHE_MAX", ROUTE_CACHE_MAX) < 0 ||
        PyModule_AddIntConstant(m, "MAX_PAYLOAD", IP_MAX) < 0 ||
        PyModule_AddIntConstant(m, "RX_MAX", RX_MAX) < 0 ||
        PyModule_AddIntConstant(m, "SPIN_NS", SPIN_NS) < 0 ||
        PyModule_AddIntConstant(m, "SPIN_MISSES_OFF", SPIN_MISSES_OFF) < 0 ||
        PyModule_AddIntConstant(m, "SPIN_SHARE", SPIN_SHARE) < 0 ||
        PyModule_AddIntConstant(m, "SPIN_BUDGET_NS", SPIN_BUDGET_NS) < 0)
        goto fail;
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
