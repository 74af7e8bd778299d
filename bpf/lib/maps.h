/* Every map of every zeroproxy program, with its key and value structs. Keys and values are
 * mirrored by ctypes structures in dataplane/maps.py and scaletozero/sklookup.py (tests check
 * sizes and offsets against bcc's generated types).
 *
 * bcc creates every map whose definition it compiles, so each program states which groups it
 * uses before its first #include, and only those are defined (structs are always visible):
 *   ZP_MAPS_LB        service, backend, reverse-NAT and affinity maps, zp_stats (sock.c, nodeport.c)
 *   ZP_MAPS_NODEPORT  conntrack, SNAT, devices, settings, zp_np_stats (nodeport.c)
 *   ZP_MAPS_S2Z       scale to zero's per-pod maps and sockmap (sk_lookup.c)
 * Without that, loading the socket programs alone would allocate the TC path's preallocated LRU
 * maps (tens of MiB) on a node without NodePort devices, and every program would get a private,
 * unused copy of scale to zero's unpinned maps.
 *
 * The LB and NODEPORT maps are pinned under ZP_PIN_DIR, so a restarted agent (or a new program
 * version) adopts them and traffic never notices. A map whose layout changes must get a new _vN
 * name. The S2Z maps are not pinned: they, the links and the proxy's listeners all belong to
 * the agent process and go away with it. */
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

#define ZP_SVC_F_SRC_RANGE 0x10 /* LoadBalancer frontend with loadBalancerSourceRanges: only sources
				 * in zp_lb4_src / zp_lb6_src under its rev_nat_id may use it */

#define ZP_SVC_F_MAGLEV    0x20 /* external frontend whose new flows take their backend from the
				 * Maglev table of (rev_nat_id, scope) in zp_maglev (TC path) */

/* lb4_key.scope / lb6_key.scope. Every frontend has an internal entry; only ZP_SVC_F_SCOPED ones
 * also have an external entry (its own slot 0 and backend slots). */
#define ZP_SCOPE_INTERNAL 0
#define ZP_SCOPE_EXTERNAL 1

/* Value of both service maps. The union has the same four bytes as the plain __u32 backend_id
 * of earlier versions, so a running agent's pinned zp_lb*_svc_v1 maps stay valid. */
struct lb_service {
	union {
		__u32 backend_id;       /* slot > 0: key into the backend map */
		__u32 affinity_timeout; /* slot 0: ClientIP affinity timeout in seconds, 0 = no affinity */
	};
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

/* Session affinity (sessionAffinity: ClientIP): who the client is. The socket hooks know its
 * network namespace (a pod) by bpf_get_netns_cookie(), which counts up from 1 and never has bit
 * 63 set; the TC path knows only the client's IPv4 address, and marks its ids with bit 63.
 * The union has the byte layout of the plain __u64 netns_cookie of earlier versions
 * ((1 << 63) | address), so a running agent's pinned zp_lb_affinity_v1 stays valid. */
#define ZP_AFFINITY_TC_CLIENT 0x80000000U /* lb_affinity_key.tc_client: bit 63 of netns_cookie */

struct lb_affinity_key {
	union {
		__u64 netns_cookie;    /* socket hooks: bpf_get_netns_cookie() of the connecting socket */
		struct {               /* TC path, as netns_cookie = (1 << 63) | address on little-endian */
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
			__be32 client_ip4; /* the client's IPv4 address, network byte order */
			__u32 tc_client;   /* ZP_AFFINITY_TC_CLIENT */
#else
			__u32 tc_client;
			__be32 client_ip4;
#endif
		};
	};
	__u16 rev_nat_id;   /* service-port id */
	__u8 family;        /* 4 or 6: backend ids are looked up in that family's map */
	__u8 pad[5];        /* explicit padding, always 0 */
};

struct lb_affinity_value {
	__u64 last_used_ns; /* bpf_ktime_get_ns() of the last connection that used it */
	__u32 backend_id;   /* the backend this client sticks to */
	__u32 pad;          /* explicit padding, always 0 */
};

/* loadBalancerSourceRanges: (service port, source CIDR), longest-prefix keys. The prefix length
 * counts rev_nat_id and pad (32 bits, always matched in full) plus the CIDR's own length. */
#define ZP_SRC_RANGE_PREFIX 32

struct lb4_src_key {
	__u32 prefixlen;   /* ZP_SRC_RANGE_PREFIX + the CIDR's prefix length */
	__u16 rev_nat_id;  /* service-port id of the frontends the range applies to */
	__u16 pad;         /* explicit padding, always 0 */
	__u8 address[4];   /* CIDR address (a lookup: the source), network byte order */
};

struct lb6_src_key {
	__u32 prefixlen;   /* ZP_SRC_RANGE_PREFIX + the CIDR's prefix length */
	__u16 rev_nat_id;  /* service-port id of the frontends the range applies to */
	__u16 pad;         /* explicit padding, always 0 */
	__u8 address[16];  /* CIDR address (a lookup: the source), network byte order */
};

/* ---- TC path (lib/conntrack.h, lib/nat.h, lib/nodeport.h) ---------------------------------- */

/* One direction of a flow, as its packets carry it. Key of zp_ct4 and zp_snat4. */
struct tuple4 {
	__be32 saddr;     /* source IPv4 address, network byte order */
	__be32 daddr;     /* destination IPv4 address, network byte order */
	__be16 sport;     /* source port, network byte order */
	__be16 dport;     /* destination port, network byte order */
	__u8 proto;       /* IPPROTO_TCP / IPPROTO_UDP */
	__u8 pad[3];      /* explicit padding, always 0 */
};

/* ct4_entry.state; mirrored by dataplane.maps.CtState. */
enum zp_ct_state {
	ZP_CT_SYN = 1,         /* TCP: SYN seen, no reply yet */
	ZP_CT_ESTABLISHED = 2, /* TCP: the backend answered */
	ZP_CT_CLOSING = 3,     /* TCP: RST, or FIN both ways; kept briefly for late packets */
	ZP_CT_UDP = 4,         /* UDP: no states, one idle timeout */
};

/* ct4_entry.flags; mirrored by dataplane.maps.CtFlag. */
#define ZP_CT_F_SNAT    0x01 /* the source was rewritten to snat_addr:snat_port */
#define ZP_CT_F_FIN_FWD 0x02 /* the client sent FIN */
#define ZP_CT_F_FIN_REV 0x04 /* the backend sent FIN */

struct ct4_entry {
	__u64 expires;       /* bpf_ktime_get_ns() (CLOCK_MONOTONIC) after which the entry is dead */
	__be32 backend_addr; /* chosen backend IPv4, network byte order */
	__be32 snat_addr;    /* source towards the backend, network byte order; 0 = not SNATed */
	__u32 backend_id;    /* key in zp_lb4_be when chosen; a different entry there = deleted */
	__be16 backend_port; /* backend port, network byte order */
	__be16 snat_port;    /* source port towards the backend, network byte order; 0 = not SNATed */
	__u16 rev_nat_id;    /* service-port id of the frontend (for the CLI) */
	__u8 state;          /* enum zp_ct_state */
	__u8 flags;          /* ZP_CT_F_* */
	__u32 pad;           /* explicit padding, always 0 */
};

/* Run-time settings of the TC path, written by userspace before attaching (slot 0). */
struct np_config {
	__u16 snat_port_min; /* first SNAT source port, host byte order; 0 = not configured yet */
	__u16 snat_port_max; /* last SNAT source port, host byte order, >= snat_port_min */
	__u32 syn_timeout;   /* seconds a TCP flow lives until the backend answers */
	__u32 est_timeout;   /* seconds an established TCP flow lives without a packet */
	__u32 close_timeout; /* seconds a closed TCP flow (and its SNAT port) stays reserved */
	__u32 udp_timeout;   /* seconds a UDP flow lives without a packet */
};

#define ZP_NAT_F_SNAT 0x01 /* nat4_entry.flags: the key's destination is a node address and SNAT port */

struct nat4_entry {
	__be32 client_addr;   /* the client's IPv4 (the reply's new destination), network byte order */
	__be32 frontend_addr; /* the frontend IPv4 the client used (the reply's new source), network order */
	__be16 client_port;   /* the client's port, network byte order */
	__be16 frontend_port; /* the frontend port, network byte order */
	__u8 flags;           /* ZP_NAT_F_* */
	__u8 pad[3];          /* explicit padding, always 0 */
};

/* A device whose traffic leaves the node: a backend reached through it is remote and its
 * flows are SNATed to addr. */
struct np_dev4 {
	__be32 addr;      /* the node's IPv4 address on this device, network byte order */
	__u32 flags;      /* reserved, 0 */
};

/* Key of zp_maglev: one Maglev table per service port and map view. */
struct maglev_key {
	__u16 rev_nat_id; /* service-port id */
	__u8 scope;       /* ZP_SCOPE_*: the view whose backends the table spreads over */
	__u8 pad;         /* explicit padding, always 0 */
};

/* IPv6 twins of the TC path's tuple, conntrack, reverse-NAT and device structs (lib/nodeport6.h);
 * the same fields with 16-byte addresses. */
struct tuple6 {
	__u8 saddr[16];   /* source IPv6 address, network byte order */
	__u8 daddr[16];   /* destination IPv6 address, network byte order */
	__be16 sport;     /* source port, network byte order */
	__be16 dport;     /* destination port, network byte order */
	__u8 proto;       /* IPPROTO_TCP / IPPROTO_UDP */
	__u8 pad[3];      /* explicit padding, always 0 */
};

struct ct6_entry {
	__u64 expires;       /* bpf_ktime_get_ns() after which the entry is dead */
	__u8 backend_addr[16]; /* chosen backend IPv6, network byte order */
	__u8 snat_addr[16];  /* source towards the backend; all 0 = not SNATed */
	__u32 backend_id;    /* key in zp_lb6_be when chosen */
	__be16 backend_port; /* backend port, network byte order */
	__be16 snat_port;    /* source port towards the backend, network byte order; 0 = not SNATed */
	__u16 rev_nat_id;    /* service-port id of the frontend */
	__u8 state;          /* enum zp_ct_state */
	__u8 flags;          /* ZP_CT_F_* */
	__u32 pad;           /* explicit padding, always 0 */
};

struct nat6_entry {
	__u8 client_addr[16];   /* the client's IPv6 (the reply's new destination) */
	__u8 frontend_addr[16]; /* the frontend IPv6 the client used (the reply's new source) */
	__be16 client_port;     /* the client's port, network byte order */
	__be16 frontend_port;   /* the frontend port, network byte order */
	__u8 flags;             /* ZP_NAT_F_* */
	__u8 pad[3];            /* explicit padding, always 0 */
};

struct np_dev6 {
	__u8 addr[16];    /* the node's IPv6 address on this device (remote backends are SNATed to it) */
	__u32 flags;      /* reserved, 0 */
};

/* ---- scale to zero (lib/activation.h) -------------------------------------------------------- */

/* One (address, port) of an opted-in pod. */
struct s2z_port_key {
	__u8 address[16]; /* local address, network byte order; IPv4 in bytes 0..3, rest 0 */
	__u16 port;       /* local port, host byte order (as bpf_sk_lookup.local_port) */
	__u8 family;      /* ZP_AF_INET / ZP_AF_INET6 */
	__u8 proto;       /* IPPROTO_TCP (UDP is not taken over) */
};

struct s2z_port_value {
	__u32 pod;        /* slot: index into zp_s2z_pods / zp_s2z_stats; sockmap index 2*pod+is_v6 */
	__u32 pad;        /* explicit padding, always 0 */
};

/* Per-pod switch, written only by userspace (a whole-value write is atomic per entry). */
struct s2z_pod {
	__u32 redirect;   /* 1 = hand new connections to the proxy; 0 = let them reach the app */
	__u32 pad;        /* explicit padding, always 0 */
};

/* Per-pod, per-CPU counters (userspace sums them), one per ZP_REASON_S2Z_* reason. */
struct s2z_stats {
	__u64 lookups;     /* ZP_REASON_S2Z_LOOKUPS: attempts to an app port, in either mode (idle detection) */
	__u64 assigned;    /* ZP_REASON_S2Z_ASSIGNED: attempts handed to the proxy's listener */
	__u64 no_listener; /* ZP_REASON_S2Z_NO_LISTENER: redirect on but no listener (the kernel answers RST) */
	__u64 assign_fail; /* ZP_REASON_S2Z_ASSIGN_FAIL: bpf_sk_assign failed: passed on */
	__u64 from_node;   /* ZP_REASON_S2Z_FROM_NODE: of lookups, those from one of the node's own
			    * addresses (kubelet probes): idle detection may leave them out */
};

/* A node address (where the kubelet's probes come from). */
struct s2z_addr_key {
	__u8 address[16]; /* network byte order; IPv4 in bytes 0..3, rest 0 */
	__u8 family;      /* ZP_AF_INET / ZP_AF_INET6 */
	__u8 pad[3];      /* explicit padding, always 0 */
};

/* ---- the maps ---------------------------------------------------------------------------------- */

#if !defined(ZP_MAPS_LB) && !defined(ZP_MAPS_NODEPORT) && !defined(ZP_MAPS_S2Z)
#error "define ZP_MAPS_LB, ZP_MAPS_NODEPORT and/or ZP_MAPS_S2Z (the maps the program uses) before including"
#endif
#if defined(ZP_MAPS_NODEPORT) && !defined(ZP_MAPS_LB)
#error "the TC path uses the service maps too: ZP_MAPS_NODEPORT needs ZP_MAPS_LB"
#endif

#ifdef ZP_MAPS_LB
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
/* loadBalancerSourceRanges (a set): which sources may use a ZP_SVC_F_SRC_RANGE frontend. */
BPF_TABLE_PINNED("lpm_trie", struct lb4_src_key, __u8, zp_lb4_src, ZP_SRC_RANGE_MAP_SIZE,
		 ZP_PIN_DIR "zp_lb4_src_v1", BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("lpm_trie", struct lb6_src_key, __u8, zp_lb6_src, ZP_SRC_RANGE_MAP_SIZE,
		 ZP_PIN_DIR "zp_lb6_src_v1", BPF_F_NO_PREALLOC);
/* Outcome and drop-reason counters of the socket hooks, indexed by enum zp_reason. _v2: 32
 * entries (v1 had 8, too few for ZP_REASON_SRC_RANGE). */
BPF_TABLE_PINNED("percpu_array", __u32, __u64, zp_stats, ZP_STAT_MAX, ZP_PIN_DIR "zp_stats_v2");

static __always_inline void zp_count(__u32 reason)
{
	__u64 *val = zp_stats.lookup(&reason);

	if (val)
		*val += 1;
}

#endif /* ZP_MAPS_LB */

#ifdef ZP_MAPS_NODEPORT
/* Flows by client tuple; LRU so a flood of new flows evicts the oldest instead of failing. */
BPF_TABLE_PINNED("lru_hash", struct tuple4, struct ct4_entry, zp_ct4, ZP_CT_MAP_SIZE,
		 ZP_PIN_DIR "zp_ct4_v1");
/* Settings (one slot). */
BPF_TABLE_PINNED("array", __u32, struct np_config, zp_np_cfg, 1, ZP_PIN_DIR "zp_np_cfg_v1");
/* Reply tuple -> original client and frontend; LRU, entries are validated against zp_ct4. */
BPF_TABLE_PINNED("lru_hash", struct tuple4, struct nat4_entry, zp_snat4, ZP_NAT_MAP_SIZE,
		 ZP_PIN_DIR "zp_snat4_v1");
/* External devices by ifindex. */
BPF_TABLE_PINNED("hash", __u32, struct np_dev4, zp_np_dev4, ZP_NP_DEV_MAP_SIZE,
		 ZP_PIN_DIR "zp_np_dev4_v1");
/* Outcome and drop-reason counters of the TC path, indexed by enum zp_reason. _v3: 32 entries
 * (v2 had 16, too few for ZP_REASON_SRC_RANGE; v1's indexes were those of its own enum). */
BPF_TABLE_PINNED("percpu_array", __u32, __u64, zp_np_stats, ZP_NP_STAT_MAX, ZP_PIN_DIR "zp_np_stats_v3");

/* The IPv6 twins of zp_ct4, zp_snat4 and zp_np_dev4 (lib/nodeport6.h). */
BPF_TABLE_PINNED("lru_hash", struct tuple6, struct ct6_entry, zp_ct6, ZP_CT_MAP_SIZE, ZP_PIN_DIR "zp_ct6_v1");
BPF_TABLE_PINNED("lru_hash", struct tuple6, struct nat6_entry, zp_snat6, ZP_NAT_MAP_SIZE,
		 ZP_PIN_DIR "zp_snat6_v1");
BPF_TABLE_PINNED("hash", __u32, struct np_dev6, zp_np_dev6, ZP_NP_DEV_MAP_SIZE, ZP_PIN_DIR "zp_np_dev6_v1");

/* Maglev: the template of every inner table (ZP_MAGLEV_M backend ids, index = flow hash % M;
 * never used itself), and the pinned outer map userspace swaps whole tables into. */
BPF_ARRAY(zp_maglev_inner, __u32, ZP_MAGLEV_M);
BPF_TABLE_PINNED("hash_of_maps$zp_maglev_inner", struct maglev_key, int, zp_maglev, ZP_MAGLEV_MAX_TABLES,
		 ZP_PIN_DIR "zp_maglev_v1");

static __always_inline void np_count(__u32 reason)
{
	__u64 *val = zp_np_stats.lookup(&reason);

	if (val)
		*val += 1;
}
#endif /* ZP_MAPS_NODEPORT */

#ifdef ZP_MAPS_S2Z
/* (pod address, port, family, proto) -> pod slot. */
BPF_TABLE("hash", struct s2z_port_key, struct s2z_port_value, zp_s2z_ports, ZP_S2Z_MAX_PORTS);
/* pod slot -> redirect switch. */
BPF_TABLE("array", __u32, struct s2z_pod, zp_s2z_pods, ZP_S2Z_MAX_PODS);
/* pod slot -> counters. */
BPF_TABLE("percpu_array", __u32, struct s2z_stats, zp_s2z_stats, ZP_S2Z_MAX_PODS);
/* The node's own addresses -> 1 (a set). */
BPF_TABLE("hash", struct s2z_addr_key, __u8, zp_s2z_nodes, 256);
/* 2*slot + (IPv6 ? 1 : 0) -> the proxy's listening socket in that pod's namespace. */
BPF_TABLE("sockmap", __u32, int, zp_s2z_socks, 2 * ZP_S2Z_MAX_PODS);
#endif /* ZP_MAPS_S2Z */

#endif
