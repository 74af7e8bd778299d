/* Every map of the socket-level load balancer. Keys and values are mirrored by ctypes
 * structures in dataplane/maps.py (a test checks the sizes against bcc's generated types).
 *
 * The maps are pinned under ZP_PIN_DIR, so a restarted agent (or a new program version) adopts
 * them and traffic never notices. A map whose layout changes must get a new _vN name. */
#ifndef ZP_MAPS_H
#define ZP_MAPS_H

#include "common.h"

struct lb4_key {
	__be32 address;   /* frontend IPv4 address, network byte order */
	__be16 dport;     /* frontend port, network byte order */
	__u16 slot;       /* 0 = the frontend itself (holds backend count), 1..count = backends */
	__u8 proto;       /* IPPROTO_TCP / IPPROTO_UDP / IPPROTO_SCTP */
	__u8 scope;       /* ZP_SCOPE_*: which view of a frontend with two (see ZP_SVC_F_SCOPED) */
	__u8 pad[2];      /* explicit padding, always 0 */
};

struct lb6_key {
	__u8 address[16]; /* frontend IPv6 address, network byte order */
	__be16 dport;     /* frontend port, network byte order */
	__u16 slot;       /* 0 = the frontend itself (holds backend count), 1..count = backends */
	__u8 proto;       /* IPPROTO_TCP / IPPROTO_UDP / IPPROTO_SCTP */
	__u8 scope;       /* ZP_SCOPE_*: which view of a frontend with two (see ZP_SVC_F_SCOPED) */
	__u8 pad[2];      /* explicit padding, always 0 */
};

/* lb_service.flags of a frontend's slot 0; mirrored by dataplane.maps.SvcFlag. */
#define ZP_SVC_F_EXTERNAL 0x1 /* served by the TC path: NodePort, ExternalIP or LoadBalancer IP */
#define ZP_SVC_F_LOCAL    0x2 /* externalTrafficPolicy Local: backends are local; never SNAT */
#define ZP_SVC_F_NODEPORT 0x4 /* the address is a node address (a NodePort) */
#define ZP_SVC_F_SCOPED   0x8 /* external frontend whose traffic from outside the node takes other
			       * backends than traffic from the node and its pods
			       * (externalTrafficPolicy Local): this ZP_SCOPE_INTERNAL entry is the
			       * view of the socket hooks, the TC path uses the ZP_SCOPE_EXTERNAL one */

/* lb4_key.scope / lb6_key.scope. Every frontend has an internal entry; only ZP_SVC_F_SCOPED ones
 * also have an external entry (its own slot 0 and backend slots). */
#define ZP_SCOPE_INTERNAL 0
#define ZP_SCOPE_EXTERNAL 1

/* Value of both service maps. */
struct lb_service {
	__u32 backend_id; /* slot > 0: key into the backend map; slot 0: ClientIP affinity
			   * timeout in seconds (0 = no session affinity) */
	__u16 count;      /* slot 0: number of backend slots (0 = reject); slot > 0: 0 */
	__u16 rev_nat_id; /* service-port id chosen by userspace, same for every slot; never 0 */
	__u32 flags;      /* ZP_SVC_F_* bits, slot 0 only */
};

struct lb4_backend {
	__be32 address;   /* backend IPv4 address, network byte order */
	__be16 port;      /* backend port, network byte order */
	__u8 proto;       /* IPPROTO_* */
	__u8 flags;       /* reserved, 0 */
};

struct lb6_backend {
	__u8 address[16]; /* backend IPv6 address, network byte order */
	__be16 port;      /* backend port, network byte order */
	__u8 proto;       /* IPPROTO_* */
	__u8 flags;       /* reserved, 0 */
};

/* Reverse translation of one socket's peer: which backend it was sent to stands for which
 * service address. Keyed by the backend too, so only replies from the chosen backend are
 * rewritten. */
struct rnat4_key {
	__u64 cookie;     /* bpf_get_socket_cookie() of the client socket */
	__be32 address;   /* backend IPv4 address, network byte order */
	__be16 port;      /* backend port, network byte order */
	__u16 pad;        /* explicit padding, always 0 */
};

struct rnat6_key {
	__u64 cookie;     /* bpf_get_socket_cookie() of the client socket */
	__u8 address[16]; /* backend IPv6 address, network byte order */
	__be16 port;      /* backend port, network byte order */
	__u16 pad[3];     /* explicit padding, always 0 */
};

struct rnat4_value {
	__be32 address;   /* service frontend IPv4 address, network byte order */
	__be16 port;      /* service frontend port, network byte order */
	__u16 rev_nat_id; /* service-port id (for accounting) */
};

struct rnat6_value {
	__u8 address[16]; /* service frontend IPv6 address, network byte order */
	__be16 port;      /* service frontend port, network byte order */
	__u16 rev_nat_id; /* service-port id (for accounting) */
};

/* Session affinity (sessionAffinity: ClientIP) at the socket: the client is its network
 * namespace (a pod), identified by bpf_get_netns_cookie(). */
/* lb_affinity_key.netns_cookie of a client seen by the TC path: this bit (never set in a netns
 * cookie, which counts up from 1) plus the client's IPv4 address as the packet carries it. */
#define ZP_AFFINITY_CLIENT_IP4 (1ULL << 63)

struct lb_affinity_key {
	__u64 netns_cookie; /* bpf_get_netns_cookie() of the connecting socket, or a TC client
			     * (ZP_AFFINITY_CLIENT_IP4 | address) */
	__u16 rev_nat_id;   /* service-port id */
	__u8 family;        /* 4 or 6: backend ids are looked up in that family's map */
	__u8 pad[5];        /* explicit padding, always 0 */
};

struct lb_affinity_value {
	__u64 last_used_ns; /* bpf_ktime_get_ns() of the last connection that used it */
	__u32 backend_id;   /* the backend this client sticks to */
	__u32 pad;          /* explicit padding, always 0 */
};

/* Services: frontend (+ slot) -> backend count or backend id. */
BPF_TABLE_PINNED("hash", struct lb4_key, struct lb_service, zp_lb4_svc, ZP_SVC_MAP_SIZE,
		 ZP_PIN_DIR "zp_lb4_svc_v1", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct lb6_key, struct lb_service, zp_lb6_svc, ZP_SVC_MAP_SIZE,
		 ZP_PIN_DIR "zp_lb6_svc_v1", BPF_F_NO_PREALLOC);
/* Backends: backend id (userspace-assigned, never 0) -> address. */
BPF_TABLE_PINNED("hash", __u32, struct lb4_backend, zp_lb4_be, ZP_BACKEND_MAP_SIZE,
		 ZP_PIN_DIR "zp_lb4_be_v1", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", __u32, struct lb6_backend, zp_lb6_be, ZP_BACKEND_MAP_SIZE,
		 ZP_PIN_DIR "zp_lb6_be_v1", BPF_F_NO_PREALLOC);
/* Socket reverse translation for recvmsg and getpeername; LRU so it never fills up. */
BPF_TABLE_PINNED("lru_hash", struct rnat4_key, struct rnat4_value, zp_rnat4, ZP_RNAT_MAP_SIZE,
		 ZP_PIN_DIR "zp_rnat4_v1");
BPF_TABLE_PINNED("lru_hash", struct rnat6_key, struct rnat6_value, zp_rnat6, ZP_RNAT_MAP_SIZE,
		 ZP_PIN_DIR "zp_rnat6_v1");
/* Session affinity: client + service -> backend; LRU, and userspace removes entries whose
 * backend left the service. */
BPF_TABLE_PINNED("lru_hash", struct lb_affinity_key, struct lb_affinity_value, zp_lb_affinity,
		 ZP_AFFINITY_MAP_SIZE, ZP_PIN_DIR "zp_lb_affinity_v1");
/* Outcome and drop-reason counters, indexed by enum zp_stat. */
BPF_TABLE_PINNED("percpu_array", __u32, __u64, zp_stats, ZP_STAT_MAX, ZP_PIN_DIR "zp_stats_v1");

static __always_inline void zp_count(__u32 reason)
{
	__u64 *val = zp_stats.lookup(&reason);

	if (val)
		*val += 1;
}

#endif
