/* Connection tracking of the flows the TC programs translate (NodePort, ExternalIP, LB IP).
 *
 * One entry per flow, keyed by the tuple the client sends (client -> frontend). It pins the
 * backend chosen for the first packet, so later packets of the flow never re-balance, and says
 * whether and how the flow is SNATed. Its lifetime depends on the TCP state (or UDP) and is
 * checked on every lookup: an expired entry is dead even before the LRU evicts it. The map
 * (zp_ct4), its key and value, and the settings (zp_np_cfg) are in maps.h. */
#ifndef ZP_CONNTRACK_H
#define ZP_CONNTRACK_H

#include "csum.h"
#include "maps.h"

#define ZP_NSEC_PER_SEC 1000000000ULL

static __always_inline bool __tcp_syn(__u8 proto, __u8 tcp_flags)
{
	return proto == IPPROTO_TCP && (tcp_flags & (ZP_TCP_SYN | ZP_TCP_ACK)) == ZP_TCP_SYN;
}

static __always_inline bool __tcp_new_syn(const struct pkt4 *p)
{
	return __tcp_syn(p->proto, p->tcp_flags);
}

/* Advance a flow's state by one packet and return its new lifetime in seconds; the one state
 * machine of both families (ct4_update, ct6_update). */
static __always_inline __u32 __ct_advance(__u8 *state_p, __u8 *flags_p, const struct np_config *cfg,
					  __u8 proto, __u8 tcp_flags, bool reply)
{
	__u8 state = *state_p;
	__u8 flags = *flags_p;
	__u32 secs;

	if (proto != IPPROTO_TCP) {
		state = ZP_CT_UDP;
	} else if (tcp_flags & ZP_TCP_RST) {
		state = ZP_CT_CLOSING;
	} else {
		if (tcp_flags & ZP_TCP_FIN)
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
	*state_p = state;
	*flags_p = flags;
	return secs;
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
	__u32 secs = __ct_advance(&ct->state, &ct->flags, cfg, p->proto, p->tcp_flags, reply);

	ct->expires = now + (__u64)secs * ZP_NSEC_PER_SEC;
}

#endif
