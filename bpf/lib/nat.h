/* Reverse translation of replies, and SNAT source-port allocation.
 *
 * zp_snat4 is keyed by the tuple a reply carries when it comes back (backend -> client for a
 * local backend, backend -> node address:SNAT port for a SNATed one) and says what to restore.
 * For SNATed flows the entry is also the port reservation: inserting it with BPF_NOEXIST is the
 * atomic "take this port", and an entry whose flow has expired may be taken over. The map and
 * struct nat4_entry are in maps.h. */
#ifndef ZP_NAT_H
#define ZP_NAT_H

#include "conntrack.h"

/* Attempts to find a free SNAT port: one hashed, the rest random. Bounded for the verifier.
 * With a fraction f of a backend's ports held, a new flow fails with probability f^tries: at 16
 * tries and f = 0.6 that was one SYN in 3 500 (measured in the bench: a stalled client every
 * few thousand connections); at 32 it is one in 10^7. */
#ifndef ZP_SNAT_TRIES
#define ZP_SNAT_TRIES 32
#endif

/* The client tuple of the flow a reverse entry belongs to. */
static __always_inline void nat4_ct_key(const struct nat4_entry *nat, __u8 proto, struct tuple4 *key)
{
	__builtin_memset(key, 0, sizeof(*key));
	key->saddr = nat->client_addr;
	key->daddr = nat->frontend_addr;
	key->sport = nat->client_port;
	key->dport = nat->frontend_port;
	key->proto = proto;
}

/* Whether the reservation rkey -> nat belongs to no live flow any more. */
static __always_inline bool __snat4_stale(const struct tuple4 *rkey, __u64 now)
{
	struct nat4_entry *old = zp_snat4.lookup((void *)rkey);
	struct ct4_entry *ct;
	struct tuple4 ckey;

	if (!old)
		return true; /* evicted meanwhile */
	nat4_ct_key(old, rkey->proto, &ckey);
	ct = zp_ct4.lookup(&ckey);
	return !ct || ct->expires <= now || ct->snat_addr != rkey->daddr || ct->snat_port != rkey->dport;
}

/* A 32-bit finaliser (lowbias32): spreads a folded tuple over the SNAT port range. */
static __always_inline __u32 __mix32(__u32 h)
{
	h ^= h >> 16;
	h *= 0x7feb352d;
	h ^= h >> 15;
	h *= 0x846ca68b;
	h ^= h >> 16;
	return h;
}

static __always_inline __u32 __snat4_hash(const struct tuple4 *fwd)
{
	return __mix32(fwd->saddr ^ fwd->daddr ^ ((__u32)fwd->sport << 16 | fwd->dport) ^ fwd->proto);
}

/* Reserve a source port on rkey->daddr towards rkey->saddr:sport for the flow fwd; on success
 * rkey->dport holds it. The first try is a hash of the flow (stable across retransmits), then
 * random ports; a port held by a dead flow is taken over. ZP_ENOSNATPORT when all tries fail. */
static __always_inline int snat4_alloc(const struct np_config *cfg, const struct tuple4 *fwd,
				       struct tuple4 *rkey, const struct nat4_entry *nat, __u64 now)
{
	__u32 min = cfg->snat_port_min;
	__u32 range = (__u32)cfg->snat_port_max - min + 1;
	__u32 port = __snat4_hash(fwd) % range;

	for (int i = 0; i < ZP_SNAT_TRIES; i++) {
		rkey->dport = bpf_htons((__u16)(min + port));
		if (zp_snat4.insert(rkey, (struct nat4_entry *)nat) == 0)
			return ZP_OK;
		if (__snat4_stale(rkey, now) && zp_snat4.update(rkey, (struct nat4_entry *)nat) == 0)
			return ZP_OK;
		port = bpf_get_prandom_u32() % range;
	}
	return ZP_ENOSNATPORT;
}

/* The reply tuple under which a flow's reverse entry is stored. */
static __always_inline void nat4_reply_key(const struct tuple4 *fwd, const struct ct4_entry *ct,
					   struct tuple4 *rkey)
{
	__builtin_memset(rkey, 0, sizeof(*rkey));
	rkey->saddr = ct->backend_addr;
	rkey->sport = ct->backend_port;
	rkey->proto = fwd->proto;
	if (ct->flags & ZP_CT_F_SNAT) {
		rkey->daddr = ct->snat_addr;
		rkey->dport = ct->snat_port;
	} else {
		rkey->daddr = fwd->saddr;
		rkey->dport = fwd->sport;
	}
}

/* Forget a flow: its entry and its reverse entry (which frees a SNAT port at once). */
static __always_inline void nat4_forget(const struct tuple4 *fwd, const struct ct4_entry *ct)
{
	struct tuple4 rkey;

	nat4_reply_key(fwd, ct, &rkey);
	zp_snat4.delete(&rkey);
	zp_ct4.delete((void *)fwd);
}

#endif
