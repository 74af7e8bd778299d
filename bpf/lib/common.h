/* Constants shared by every zeroproxy program. One home for each. */
#ifndef ZP_COMMON_H
#define ZP_COMMON_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include <uapi/linux/in6.h>
#include <uapi/linux/errno.h>

/* linux/net.h is not uapi-clean for BPF; the two socket types we need. */
#ifndef SOCK_STREAM
#define SOCK_STREAM 1
#define SOCK_DGRAM 2
#endif

/* Where pinned maps live; the loader passes -DZP_PIN_DIR="/sys/fs/bpf/<dir>/". */
#ifndef ZP_PIN_DIR
#define ZP_PIN_DIR "/sys/fs/bpf/zeroproxy/"
#endif

/* Map sizes; the loader may override them, but a pinned map keeps the size it was made with. */
#ifndef ZP_SVC_MAP_SIZE
#define ZP_SVC_MAP_SIZE 262144
#endif
#ifndef ZP_BACKEND_MAP_SIZE
#define ZP_BACKEND_MAP_SIZE 131072
#endif
#ifndef ZP_AFFINITY_MAP_SIZE
#define ZP_AFFINITY_MAP_SIZE 65536
#endif
#ifndef ZP_RNAT_MAP_SIZE
#define ZP_RNAT_MAP_SIZE 262144
#endif
#ifndef ZP_SRC_RANGE_MAP_SIZE
#define ZP_SRC_RANGE_MAP_SIZE 16384 /* loadBalancerSourceRanges entries, all services together */
#endif

/* Map sizes of the TC path and of scale to zero (loader -D overrides, as above). */
#ifndef ZP_CT_MAP_SIZE
#define ZP_CT_MAP_SIZE 131072
#endif
#ifndef ZP_NAT_MAP_SIZE
#define ZP_NAT_MAP_SIZE 131072
#endif
#ifndef ZP_NP_DEV_MAP_SIZE
#define ZP_NP_DEV_MAP_SIZE 256
#endif
/* Maglev (loadBalancer algorithm "maglev"): entries of each lookup table (a prime, Cilium's
 * default) and how many tables (service ports x views) the outer map holds. Fixed, not -D:
 * the pinned outer map accepts only inner maps of the size it was made with. */
#define ZP_MAGLEV_M 16381
#ifndef ZP_MAGLEV_MAX_TABLES
#define ZP_MAGLEV_MAX_TABLES 4096
#endif
#ifndef ZP_S2Z_MAX_PODS
#define ZP_S2Z_MAX_PODS 1024
#endif
#ifndef ZP_S2Z_MAX_PORTS
#define ZP_S2Z_MAX_PORTS 8192
#endif

#define ZP_AF_INET 2   /* AF_INET / AF_INET6 (linux/socket.h is not uapi-clean either) */
#define ZP_AF_INET6 10

/* Inner results, the one list for every program: an inner function returns ZP_OK or one of
 * these negative codes, each with one meaning, and exactly one verdict function per entry point
 * turns it into a verdict and a counter (a code it does not know counts as ZP_REASON_UNKNOWN).
 * Mirrored by dataplane.maps.Code; a test parses this list and compares names and values. */
#define ZP_OK            0
#define ZP_ENOTSVC       (-ENXIO)         /* not ours: not a service frontend (socket, TC), not a
					   * port of an opted-in pod (sk_lookup); untouched, not counted */
#define ZP_ENOBACKEND    (-ENOENT)        /* the service exists but has no backend */
#define ZP_ESTALE        (-ESTALE)        /* a slot or backend vanished between two lookups */
#define ZP_EMAPWRITE     (-ENOSPC)        /* a map update failed */
#define ZP_EREWRITE      (-EFAULT)        /* a packet store or checksum helper failed; the packet is damaged */
#define ZP_EFIB          (-EHOSTUNREACH)  /* no usable route to the new destination */
#define ZP_ECTMISS       (-ENOTCONN)      /* a mid-stream TCP packet of a flow we do not track */
#define ZP_ECTGONE       (-EPIPE)         /* a tracked TCP flow whose backend was deleted */
#define ZP_ECTSTALE      (-ETIMEDOUT)     /* a reply of a flow whose entry expired or was replaced */
#define ZP_ENOSNATPORT   (-EADDRNOTAVAIL) /* every SNAT port tried was in use */
#define ZP_EREFUSE       (-ECONNREFUSED)  /* no backend behind a node address: the stack refuses */
#define ZP_EDIRECT       (-EAGAIN)        /* an opted-in pod's port with redirect off: the app gets it */
#define ZP_ENOLISTENER   (-ENOTSOCK)      /* redirect on, but no proxy listener in the sockmap */
#define ZP_EASSIGN       (-EINVAL)        /* bpf_sk_assign refused the proxy's listener */
#define ZP_ESRCRANGE     (-EACCES)        /* a LoadBalancer frontend's source ranges leave this source out */

/* Verdicts of the cgroup sock_addr hooks (the kernel's values, under Cilium's names). */
#define SYS_REJECT  0 /* fail the call, with the errno bpf_set_retval() set */
#define SYS_PROCEED 1 /* let the call go on, to the (possibly rewritten) address */

/* Why a counter moved: one vocabulary for the three counter shapes. The value is the index in
 * the per-CPU array of the path that counts it: zp_stats (socket hooks, ZP_STAT_MAX entries,
 * so their reasons come first and keep the indices they always had) and zp_np_stats (TC path).
 * Scale to zero counts per pod in struct s2z_stats, one field named after each ZP_REASON_S2Z_*
 * reason (the value there is no index). Mirrored by dataplane.maps.Reason (a test compares). */
enum zp_reason {
	/* socket hooks; NO_BACKEND, STALE_BACKEND and UNKNOWN also the TC path */
	ZP_REASON_XLATE_OK = 0,        /* socket: a service address was rewritten to a backend */
	ZP_REASON_NO_BACKEND = 1,      /* the service has zero backends (socket: ECONNREFUSED;
					* TC: refused for a NodePort, else dropped) */
	ZP_REASON_STALE_BACKEND = 2,   /* rejected/dropped: a slot or backend vanished mid-lookup */
	ZP_REASON_RNAT_WRITE = 3,      /* socket: reverse-NAT entry not written (peer shows the backend) */
	ZP_REASON_RNAT_HIT = 4,        /* socket: a reply source / peer name got the service address */
	ZP_REASON_UNKNOWN = 5,         /* rejected/dropped: an inner code the verdict does not know */
	/* TC path */
	ZP_REASON_NEW_FLOW = 6,        /* a new flow was translated to a backend */
	ZP_REASON_FWD = 7,             /* a packet of a tracked flow was translated */
	ZP_REASON_REPLY = 8,           /* a reply got its frontend/client addresses back */
	ZP_REASON_SNAT_EXHAUSTED = 9,  /* dropped: no free SNAT port after every try */
	ZP_REASON_BACKEND_GONE = 10,   /* dropped: mid-stream TCP packet whose backend was deleted */
	ZP_REASON_CT_MISS = 11,        /* dropped: mid-stream TCP packet of an untracked flow */
	ZP_REASON_FIB_FAIL = 12,       /* dropped: no route to the translated destination */
	ZP_REASON_REWRITE_FAIL = 13,   /* dropped: a header rewrite failed */
	ZP_REASON_MAP_WRITE = 14,      /* dropped: a conntrack/NAT entry could not be written */
	ZP_REASON_STALE_REPLY = 15,    /* passed untranslated: a reply of an expired flow */
	/* scale to zero (fields of struct s2z_stats) */
	ZP_REASON_S2Z_LOOKUPS = 16,    /* a connection attempt to an app port, in either mode */
	ZP_REASON_S2Z_ASSIGNED = 17,   /* handed to the activation proxy's listener */
	ZP_REASON_S2Z_NO_LISTENER = 18, /* redirect on but no listener: passed on (the kernel answers RST) */
	ZP_REASON_S2Z_ASSIGN_FAIL = 19, /* bpf_sk_assign failed: passed on */
	ZP_REASON_S2Z_FROM_NODE = 20,  /* of the lookups, one from a node address (a kubelet probe) */
	/* socket hooks and TC path */
	ZP_REASON_SRC_RANGE = 21,      /* dropped: the source is outside loadBalancerSourceRanges */
};

/* Entries of the two counter arrays (pinned: a map keeps the size it was made with). */
#define ZP_STAT_MAX 32    /* zp_stats: the socket hooks' reasons (8 up to zp_stats_v1) */
#define ZP_NP_STAT_MAX 32 /* zp_np_stats: the TC path's reasons (16 up to zp_np_stats_v2) */
_Static_assert(ZP_REASON_SRC_RANGE < ZP_STAT_MAX, "the socket hooks' reasons must fit zp_stats");
_Static_assert(ZP_REASON_SRC_RANGE < ZP_NP_STAT_MAX, "the TC path's reasons must fit zp_np_stats");

#endif
