/* Connection tracking of the flows the TC programs translate (NodePort, ExternalIP, LB IP).
 *
 * One entry per flow, keyed by the tuple the client sends (client -> frontend). It pins the
 * backend chosen for the first packet, so later packets of the flow never re-balance, and says
 * whether and how the flow is SNATed. Its lifetime depends on the TCP state (or UDP) and is
 * checked on every lookup: an expired entry is dead even before the LRU evicts it. */
#ifndef ZP_CONNTRACK_H
#define ZP_CONNTRACK_H

#include "csum.h"
#include "maps.h"

#define ZP_ECTMISS      (-ENOTCONN)  /* a mid-stream TCP packet of a flow we do not track */
#define ZP_ECTGONE      (-EPIPE)     /* a tracked TCP flow whose backend was deleted */
#define ZP_ECTSTALE     (-ETIMEDOUT) /* a reply of a flow whose entry expired or was replaced */

#ifndef ZP_CT_MAP_SIZE
#define ZP_CT_MAP_SIZE 131072
#endif

#define ZP_NSEC_PER_SEC 1000000000ULL

/* One direction of a flow, as its packets carry it. Key of zp_ct4 and zp_snat4. */
struct tuple4 {
	__be32 saddr;     /* source IPv4 address, network byte order */
	__be32 daddr;     /* destination IPv4 address, network byte order */
	__be16 sport;     /* source port, network byte order */
	__be16 dport;     /* destination port, network byte order */
	__u8 proto;       /* IPPROTO_TCP / IPPROTO_UDP */
	__u8 pad[3];      /* explicit padding, always 0 */
};

enum zp_ct_state {
	ZP_CT_SYN = 1,         /* TCP: SYN seen, no reply yet */
	ZP_CT_ESTABLISHED = 2, /* TCP: the backend answered */
	ZP_CT_CLOSING = 3,     /* TCP: RST, or FIN both ways; kept briefly for late packets */
	ZP_CT_UDP = 4,         /* UDP: no states, one idle timeout */
};

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

/* Flows by client tuple; LRU so a flood of new flows evicts the oldest instead of failing. */
BPF_TABLE_PINNED("lru_hash", struct tuple4, struct ct4_entry, zp_ct4, ZP_CT_MAP_SIZE,
		 ZP_PIN_DIR "zp_ct4_v1");
/* Settings (one slot). */
BPF_TABLE_PINNED("array", __u32, struct np_config, zp_np_cfg, 1, ZP_PIN_DIR "zp_np_cfg_v1");

static __always_inline bool __tcp_new_syn(const struct pkt4 *p)
{
	return p->proto == IPPROTO_TCP && (p->tcp_flags & (ZP_TCP_SYN | ZP_TCP_ACK)) == ZP_TCP_SYN;
}

/* Whether a looked-up entry still stands for this packet's flow. A new SYN on a closing entry
 * is a new connection that reuses the client port (TIME_WAIT reuse): it gets a new backend. */
static __always_inline bool ct4_live(const struct ct4_entry *ct, const struct pkt4 *p, __u64 now)
{
	if (ct->expires <= now)
		return false;
	return !(ct->state == ZP_CT_CLOSING && __tcp_new_syn(p));
}

/* Advance the state by one packet (reply = sent by the backend) and extend the lifetime. */
static __always_inline void ct4_update(struct ct4_entry *ct, const struct np_config *cfg,
				       const struct pkt4 *p, bool reply, __u64 now)
{
	__u8 state = ct->state;
	__u8 flags = ct->flags;
	__u32 secs;

	if (p->proto != IPPROTO_TCP) {
		state = ZP_CT_UDP;
	} else if (p->tcp_flags & ZP_TCP_RST) {
		state = ZP_CT_CLOSING;
	} else {
		if (p->tcp_flags & ZP_TCP_FIN)
			flags |= reply ? ZP_CT_F_FIN_REV : ZP_CT_F_FIN_FWD;
		if ((flags & (ZP_CT_F_FIN_FWD | ZP_CT_F_FIN_REV)) == (ZP_CT_F_FIN_FWD | ZP_CT_F_FIN_REV))
			state = ZP_CT_CLOSING;
		else if (state == 0)
			state = ZP_CT_SYN;
		else if (reply && state == ZP_CT_SYN)
			state = ZP_CT_ESTABLISHED;
	}
	switch (state) {
	case ZP_CT_SYN:
		secs = cfg->syn_timeout;
		break;
	case ZP_CT_ESTABLISHED:
		secs = cfg->est_timeout;
		break;
	case ZP_CT_CLOSING:
		secs = cfg->close_timeout;
		break;
	default:
		secs = cfg->udp_timeout;
		break;
	}
	ct->state = state;
	ct->flags = flags;
	ct->expires = now + (__u64)secs * ZP_NSEC_PER_SEC;
}

#endif
