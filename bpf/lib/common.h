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

/* Inner functions return 0 or one of these negative codes, each with one meaning. */
#define ZP_OK            0
#define ZP_ENOTSVC       (-ENXIO)    /* the destination is not a service frontend */
#define ZP_ENOBACKEND    (-ENOENT)   /* the service exists but has no backend */
#define ZP_ESTALE        (-ESTALE)   /* a slot or backend vanished between two lookups */
#define ZP_EMAPWRITE     (-ENOSPC)   /* a map update failed */

/* Per-reason counters (index into zp_stats). Userspace mirrors this list in dataplane/maps.py. */
enum zp_stat {
	ZP_STAT_XLATE_OK = 0,      /* a service address was rewritten to a backend */
	ZP_STAT_NO_BACKEND = 1,    /* rejected with ECONNREFUSED: service has zero backends */
	ZP_STAT_STALE_BACKEND = 2, /* rejected: slot/backend disappeared mid-lookup */
	ZP_STAT_RNAT_WRITE = 3,    /* reverse-NAT entry could not be written (reply/peer shows backend) */
	ZP_STAT_RNAT_HIT = 4,      /* a reply source / peer name was restored to the service address */
	ZP_STAT_MAX = 8,
};

#endif
