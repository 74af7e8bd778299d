/* Scale to zero: which connections of an opted-in pod the activation proxy takes over.
 *
 * One sk_lookup program (bpf/sk_lookup.c) is linked into the network namespace of every
 * opted-in pod of the node. For a SYN to one of the app's ports it looks up the pod's slot; if
 * the pod's redirect flag is on (checkpointed, dumping or restoring) it assigns the connection
 * to the activation proxy's listener, which lives in the same namespace. With the flag off it
 * only counts the attempt (idle detection) and the kernel's normal lookup finds the app.
 *
 * Userspace (scaletozero/sklookup.py) owns slots and every write; ctypes mirrors of the structs
 * below live there and a test checks their sizes against bcc's. The maps are not pinned: they,
 * the links and the proxy's listeners all belong to the agent process and go away with it. */
#ifndef ZP_ACTIVATION_H
#define ZP_ACTIVATION_H

#include "common.h"

#ifndef ZP_S2Z_MAX_PODS
#define ZP_S2Z_MAX_PODS 1024
#endif
#ifndef ZP_S2Z_MAX_PORTS
#define ZP_S2Z_MAX_PORTS 8192
#endif

#define ZP_AF_INET 2
#define ZP_AF_INET6 10

/* Inner results of the lookup program, one meaning each; __s2z_verdict turns them into counters. */
#define ZP_S2Z_ASSIGNED    0          /* the SYN goes to the proxy's listener */
#define ZP_S2Z_NOTOURS     (-ENXIO)   /* not a port of an opted-in pod: not counted */
#define ZP_S2Z_DIRECT      (-EAGAIN)  /* an app port, redirect off: the app gets it */
#define ZP_S2Z_NOLISTENER  (-ENOENT)  /* redirect on, but no proxy listener in the sockmap */
#define ZP_S2Z_ASSIGNFAIL  (-EINVAL)  /* bpf_sk_assign refused the proxy's listener */

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

/* Per-pod, per-CPU counters: userspace sums them. */
struct s2z_stats {
	__u64 lookups;     /* connection attempts to an app port, in either mode (idle detection) */
	__u64 assigned;    /* attempts handed to the proxy's listener */
	__u64 no_listener; /* redirect on but no listener: passed on (the kernel answers RST) */
	__u64 assign_fail; /* bpf_sk_assign failed: passed on */
	__u64 from_node;   /* of lookups, those from one of the node's own addresses (kubelet
			    * probes): idle detection may leave them out */
};

/* A node address (where the kubelet's probes come from). */
struct s2z_addr_key {
	__u8 address[16]; /* network byte order; IPv4 in bytes 0..3, rest 0 */
	__u8 family;      /* ZP_AF_INET / ZP_AF_INET6 */
	__u8 pad[3];      /* explicit padding, always 0 */
};

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

#endif
