/* Service lookup and backend selection, shared by the socket hooks (and later the TC programs).
 * The kernel only looks up: userspace owns ids, slots and counts. */
#ifndef ZP_LB_H
#define ZP_LB_H

#include "maps.h"

/* Pick a slot in 1..count at random; count must be > 0. */
static __always_inline __u16 __lb_pick_slot(__u16 count)
{
	return (__u16)(bpf_get_prandom_u32() % count) + 1;
}

/* Look up the frontend (slot 0) of addr:port/proto. */
static __always_inline struct lb_service *
lb4_lookup_service(__be32 addr, __be16 port, __u8 proto, struct lb4_key *key)
{
	__builtin_memset(key, 0, sizeof(*key));
	key->address = addr;
	key->dport = port;
	key->proto = proto;
	return zp_lb4_svc.lookup(key);
}

/* Choose a backend of the service found by lb4_lookup_service (key still holds its frontend).
 * Returns ZP_OK and fills *be, or ZP_ENOBACKEND / ZP_ESTALE. */
static __always_inline int
lb4_select_backend(struct lb4_key *key, const struct lb_service *svc, struct lb4_backend *be)
{
	struct lb_service *slot;
	struct lb4_backend *found;
	__u32 backend_id;

	if (svc->count == 0)
		return ZP_ENOBACKEND;
	key->slot = __lb_pick_slot(svc->count);
	slot = zp_lb4_svc.lookup(key);
	if (!slot)
		return ZP_ESTALE;
	backend_id = slot->backend_id;
	found = zp_lb4_be.lookup(&backend_id);
	if (!found)
		return ZP_ESTALE;
	*be = *found;
	return ZP_OK;
}

static __always_inline struct lb_service *
lb6_lookup_service(const __u32 addr[4], __be16 port, __u8 proto, struct lb6_key *key)
{
	__builtin_memset(key, 0, sizeof(*key));
	__builtin_memcpy(key->address, addr, 16);
	key->dport = port;
	key->proto = proto;
	return zp_lb6_svc.lookup(key);
}

static __always_inline int
lb6_select_backend(struct lb6_key *key, const struct lb_service *svc, struct lb6_backend *be)
{
	struct lb_service *slot;
	struct lb6_backend *found;
	__u32 backend_id;

	if (svc->count == 0)
		return ZP_ENOBACKEND;
	key->slot = __lb_pick_slot(svc->count);
	slot = zp_lb6_svc.lookup(key);
	if (!slot)
		return ZP_ESTALE;
	backend_id = slot->backend_id;
	found = zp_lb6_be.lookup(&backend_id);
	if (!found)
		return ZP_ESTALE;
	*be = *found;
	return ZP_OK;
}

#endif
